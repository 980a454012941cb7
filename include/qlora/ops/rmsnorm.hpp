#pragma once
// RMSNorm over the last axis: y = x / sqrt(mean(x^2) + eps) * w. The forward keeps 1/rms per row (rstd)
// for the backward, which returns dx and accumulates dw (f32 on CUDA). add_rmsnorm fuses the residual add
// before the norm (h = x + residual, y = rmsnorm(h)) into one pass, with the same results as add + rmsnorm.

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

struct AddRmsNormResult {
  Tensor sum;   // x + residual: the residual stream
  Tensor y;     // rmsnorm(sum)
  Tensor rstd;  // one per row: x's dtype on the CPU, f32 on CUDA
};

// sum = x + residual, y = rmsnorm(sum, weight): ops::add then ops::rmsnorm in one pass.
inline AddRmsNormResult add_rmsnorm(const Tensor& x, const Tensor& residual, const Tensor& weight, float eps) {
  constexpr std::string_view op = "add_rmsnorm";
  detail::check_same(op, {{&x, "x"}, {&residual, "residual"}, {&weight, "weight"}});
  detail::check_shape(op, residual, x.shape(), "residual");
  detail::check_shape(op, weight, Shape{x.shape().last()}, "weight");
  const std::int64_t rows = x.shape().rows(), cols = x.shape().last();
  AddRmsNormResult r{Tensor::empty(x.shape(), x.dtype(), x.device()), Tensor::empty(x.shape(), x.dtype(), x.device()),
                     Tensor::empty(x.shape().without_last(), detail::accum_dtype(x), x.device())};
  detail::dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::add_rmsnorm_forward(x.data<T>(), residual.data<T>(), weight.data<T>(), r.sum.data<T>(), r.y.data<T>(),
                               r.rstd.data<A>(), rows, cols, eps);
    else
      cuda::add_rmsnorm_forward(x.data<T>(), residual.data<T>(), weight.data<T>(), r.sum.data<T>(), r.y.data<T>(),
                                r.rstd.data<A>(), rows, cols, eps, cuda::current_stream());
  });
  return r;
}

// The gradient of add_rmsnorm's sum (so of x and of residual alike): rmsnorm_backward(sum, weight, rstd, dy)
// + dsum, the gradient reaching the sum along the residual stream, in one pass. Also the backward of any
// norm whose input is a residual stream: rmsnorm_backward then axpy_(dx, 1, dsum). dweight as rmsnorm_backward.
inline Tensor add_rmsnorm_backward(const Tensor& sum, const Tensor& weight, const Tensor& rstd, const Tensor& dy,
                                   const Tensor& dsum, Tensor dweight = {}) {
  constexpr std::string_view op = "add_rmsnorm_backward";
  detail::check_same(op, {{&sum, "sum"}, {&weight, "weight"}, {&dy, "dy"}, {&dsum, "dsum"}});
  detail::check_shape(op, dy, sum.shape(), "dy");
  detail::check_shape(op, dsum, sum.shape(), "dsum");
  detail::check_shape(op, rstd, sum.shape().without_last(), "rstd");
  detail::check_dtype(op, rstd, detail::accum_dtype(sum), "rstd");
  const std::int64_t rows = sum.shape().rows(), cols = sum.shape().last();
  if (dweight.defined()) {
    detail::check_shape(op, dweight, Shape{cols}, "dweight");
    detail::check_dtype(op, dweight, detail::accum_dtype(sum), "dweight");
    detail::check_device(op, dweight, sum.device(), "dweight");
  }
  Tensor dx = Tensor::empty(sum.shape(), sum.dtype(), sum.device());
  detail::dispatch(op, sum, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    A* dw = dweight.defined() ? dweight.data<A>() : nullptr;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::add_rmsnorm_backward(sum.data<T>(), weight.data<T>(), rstd.data<A>(), dy.data<T>(), dsum.data<T>(),
                                dx.data<T>(), dw, rows, cols);
    else
      cuda::add_rmsnorm_backward(sum.data<T>(), weight.data<T>(), rstd.data<A>(), dy.data<T>(), dsum.data<T>(),
                                 dx.data<T>(), dw, rows, cols, cuda::current_stream());
  });
  return dx;
}

}  // namespace qlora::ops
