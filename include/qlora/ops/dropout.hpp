#pragma once
// Inverted dropout whose mask is a pure function of (seed, offset + element index): the backward calls the
// same op on dy with the same seed and offset, so no mask is stored. Kernels: qlora/{cpu,cuda}/dropout.hpp.

#include <string>

#include "qlora/cpu/dropout.hpp"
#include "qlora/cuda/dropout.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

inline Tensor dropout(const Tensor& x, float p, std::uint64_t seed, std::uint64_t offset = 0) {
  constexpr std::string_view op = "dropout";
  detail::check_defined(op, x, "x");
  if (!(p >= 0.f && p < 1.f)) detail::fail(op, "probability must be in [0, 1), got " + std::to_string(p));
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  detail::dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::dropout(x.data<T>(), y.data<T>(), x.numel(), p, seed, offset);
    else
      cuda::dropout(x.data<T>(), y.data<T>(), x.numel(), p, seed, offset, cuda::current_stream());
  });
  return y;
}

}  // namespace qlora::ops
