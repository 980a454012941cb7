#pragma once
// Random tensors from the Philox streams (include/qlora/core/philox.hpp): the same (seed, offset) gives
// the same values on the CPU and on any GPU. f32 only; convert afterwards for other dtypes.

#include <cstdint>

#include "qlora/cpu/random.hpp"
#include "qlora/cuda/random.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

namespace detail {
template <class CpuFill, class CudaFill>
void random_fill(std::string_view op, Tensor& x, CpuFill cpu_fill, CudaFill cuda_fill) {
  check_defined(op, x, "x");
  check_dtype(op, x, DType::f32, "x");
  dispatch(op, x, [&](auto, auto backend) {
    if constexpr (is_cpu_v<decltype(backend)>) cpu_fill(x.data<float>(), x.numel());
    else cuda_fill(x.data<float>(), x.numel());
  });
}
}  // namespace detail

// Element i of x gets stream value offset + i: uniform in [lo, hi).
inline void fill_uniform_(Tensor& x, std::uint64_t seed, std::uint64_t offset = 0, float lo = 0.f, float hi = 1.f) {
  detail::random_fill(
      "fill_uniform_", x, [&](float* p, std::int64_t n) { cpu::fill_uniform(p, n, seed, offset, lo, hi); },
      [&](float* p, std::int64_t n) { cuda::fill_uniform(p, n, seed, offset, lo, hi, cuda::current_stream()); });
}

// Element i of x gets normal stream value offset + i, scaled: mean + std * z.
inline void fill_normal_(Tensor& x, std::uint64_t seed, std::uint64_t offset = 0, float mean = 0.f, float std = 1.f) {
  detail::random_fill(
      "fill_normal_", x, [&](float* p, std::int64_t n) { cpu::fill_normal(p, n, seed, offset, mean, std); },
      [&](float* p, std::int64_t n) { cuda::fill_normal(p, n, seed, offset, mean, std, cuda::current_stream()); });
}

inline Tensor randn(Shape shape, std::uint64_t seed, Device device = Device::cpu(), float mean = 0.f, float std = 1.f) {
  Tensor x = Tensor::empty(shape, DType::f32, device);
  fill_normal_(x, seed, 0, mean, std);
  return x;
}

inline Tensor rand(Shape shape, std::uint64_t seed, Device device = Device::cpu(), float lo = 0.f, float hi = 1.f) {
  Tensor x = Tensor::empty(shape, DType::f32, device);
  fill_uniform_(x, seed, 0, lo, hi);
  return x;
}

}  // namespace qlora::ops
