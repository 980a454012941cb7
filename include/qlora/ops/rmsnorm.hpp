#pragma once
// RMSNorm over the last axis: y = x / sqrt(mean(x^2) + eps) * w. The forward keeps 1/rms per row (rstd)
// for the backward, which returns dx and accumulates dw (f32 on CUDA).

#include "qlora/cpu/rmsnorm.hpp"
#include "qlora/cuda/rmsnorm.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

struct RmsNormResult {
  Tensor y;     // x's shape and dtype
  Tensor rstd;  // one per row: x's dtype on the CPU, f32 on CUDA
};

inline RmsNormResult rmsnorm(const Tensor& x, const Tensor& weight, float eps) {
  constexpr std::string_view op = "rmsnorm";
  detail::check_same(op, {{&x, "x"}, {&weight, "weight"}});
  detail::check_shape(op, weight, Shape{x.shape().last()}, "weight");
  const std::int64_t rows = x.shape().rows(), cols = x.shape().last();
  RmsNormResult r{Tensor::empty(x.shape(), x.dtype(), x.device()),
                  Tensor::empty(x.shape().without_last(), detail::accum_dtype(x), x.device())};
  detail::dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::rmsnorm_forward(x.data<T>(), weight.data<T>(), r.y.data<T>(), r.rstd.data<A>(), rows, cols, eps);
    else
      cuda::rmsnorm_forward(x.data<T>(), weight.data<T>(), r.y.data<T>(), r.rstd.data<A>(), rows, cols, eps,
                            cuda::current_stream());
  });
  return r;
}

// Returns dx. When dweight is defined (shape (cols), dtype accum_dtype(x)), adds this batch's dw into it.
inline Tensor rmsnorm_backward(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy,
                               Tensor dweight = {}) {
  constexpr std::string_view op = "rmsnorm_backward";
  detail::check_same(op, {{&x, "x"}, {&weight, "weight"}, {&dy, "dy"}});
  detail::check_shape(op, dy, x.shape(), "dy");
  detail::check_shape(op, rstd, x.shape().without_last(), "rstd");
  detail::check_dtype(op, rstd, detail::accum_dtype(x), "rstd");
  const std::int64_t rows = x.shape().rows(), cols = x.shape().last();
  if (dweight.defined()) {
    detail::check_shape(op, dweight, Shape{cols}, "dweight");
    detail::check_dtype(op, dweight, detail::accum_dtype(x), "dweight");
    detail::check_device(op, dweight, x.device(), "dweight");
  }
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  detail::dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    A* dw = dweight.defined() ? dweight.data<A>() : nullptr;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::rmsnorm_backward(x.data<T>(), weight.data<T>(), rstd.data<A>(), dy.data<T>(), dx.data<T>(), dw, rows, cols);
    else
      cuda::rmsnorm_backward(x.data<T>(), weight.data<T>(), rstd.data<A>(), dy.data<T>(), dx.data<T>(), dw, rows, cols,
                             cuda::current_stream());
  });
  return dx;
}

}  // namespace qlora::ops
