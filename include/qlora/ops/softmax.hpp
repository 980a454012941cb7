#pragma once
// Softmax over the last axis and its backward dx = y * (dy - sum(dy * y)).

#include "qlora/cpu/softmax.hpp"
#include "qlora/cuda/softmax.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

inline Tensor softmax(const Tensor& x) {
  detail::check_defined("softmax", x, "x");
  const std::int64_t rows = x.shape().rows(), cols = x.shape().last();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  detail::dispatch("softmax", x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>) cpu::softmax_forward(x.data<T>(), y.data<T>(), rows, cols);
    else cuda::softmax_forward(x.data<T>(), y.data<T>(), rows, cols, cuda::current_stream());
  });
  return y;
}

inline Tensor softmax_backward(const Tensor& y, const Tensor& dy) {
  detail::check_same("softmax_backward", {{&y, "y"}, {&dy, "dy"}});
  detail::check_shape("softmax_backward", dy, y.shape(), "dy");
  const std::int64_t rows = y.shape().rows(), cols = y.shape().last();
  Tensor dx = Tensor::empty(y.shape(), y.dtype(), y.device());
  detail::dispatch("softmax_backward", y, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::softmax_backward(y.data<T>(), dy.data<T>(), dx.data<T>(), rows, cols);
    else cuda::softmax_backward(y.data<T>(), dy.data<T>(), dx.data<T>(), rows, cols, cuda::current_stream());
  });
  return dx;
}

}  // namespace qlora::ops
