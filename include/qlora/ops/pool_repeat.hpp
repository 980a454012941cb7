#pragma once
// The adapter's feature pooling and output repetition along the last axis (methods/qblora.md):
//   group_sum(x, g, alpha)      (..., n)   -> (..., n/g):  alpha * sum of each run of g adjacent features
//   repeat_add_(y, h, g, alpha) y (..., n) += alpha * repeat_interleave(h (..., n/g), g)
// P_p = group_sum(., p, 1/p), E_k^T = group_sum(., k, 1), E_k = repeat_add_(., k, s), P_p^T = repeat_add_(., p, 1/p).
// Kernels: include/qlora/{cpu,cuda}/pool_repeat.hpp.

#include <string>

#include "qlora/cpu/pool_repeat.hpp"
#include "qlora/cuda/pool_repeat.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

namespace detail {
inline void check_group(std::string_view op, const Tensor& t, std::int64_t group, std::string_view name) {
  if (t.rank() < 1) fail(op, std::string(name) + " must have rank >= 1");
  if (group < 1 || t.shape().last() % group != 0)
    fail(op, "the last dimension of " + std::string(name) + " " + t.shape().str() + " is not a multiple of " +
                 std::to_string(group));
}
}  // namespace detail

inline Tensor group_sum(const Tensor& x, std::int64_t group, double alpha) {
  constexpr std::string_view op = "group_sum";
  detail::check_defined(op, x, "x");
  detail::check_group(op, x, group, "x");
  const std::int64_t rows = x.shape().rows(), cols = x.shape().last();
  Tensor y = Tensor::empty(x.shape().with_dim(-1, cols / group), x.dtype(), x.device());
  detail::dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::group_sum(x.data<T>(), y.data<T>(), rows, cols, group, alpha);
    else
      cuda::group_sum(x.data<T>(), y.data<T>(), rows, cols, group, float(alpha), cuda::current_stream());
  });
  return y;
}

inline void repeat_add_(Tensor& y, const Tensor& h, std::int64_t group, double alpha) {
  constexpr std::string_view op = "repeat_add_";
  detail::check_same(op, {{&y, "y"}, {&h, "h"}});
  detail::check_group(op, y, group, "y");
  detail::check_shape(op, h, y.shape().with_dim(-1, y.shape().last() / group), "h");
  const std::int64_t rows = y.shape().rows(), cols = y.shape().last();
  detail::dispatch(op, y, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::repeat_add(h.data<T>(), y.data<T>(), rows, cols, group, alpha);
    else
      cuda::repeat_add(h.data<T>(), y.data<T>(), rows, cols, group, float(alpha), cuda::current_stream());
  });
}

}  // namespace qlora::ops
