#pragma once
// Elementwise ops on same-shape tensors: add, mul, scale, axpy (in-place accumulate), SiLU and SwiGLU
// with their backwards. Kernels: include/qlora/{cpu,cuda}/elementwise.hpp.

#include <utility>

#include "qlora/cpu/elementwise.hpp"
#include "qlora/cuda/elementwise.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

namespace detail {
// y = kernel(a, b) for two same-shape, same-dtype tensors.
template <class CpuKernel, class CudaKernel>
Tensor binary(std::string_view op, const Tensor& a, const Tensor& b, CpuKernel cpu_kernel, CudaKernel cuda_kernel) {
  check_same(op, {{&a, "a"}, {&b, "b"}});
  check_shape(op, b, a.shape(), "b");
  Tensor y = Tensor::empty(a.shape(), a.dtype(), a.device());
  dispatch(op, a, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (is_cpu_v<decltype(backend)>) cpu_kernel(a.data<T>(), b.data<T>(), y.data<T>(), a.numel());
    else cuda_kernel(a.data<T>(), b.data<T>(), y.data<T>(), a.numel(), cuda::current_stream());
  });
  return y;
}
}  // namespace detail

inline Tensor add(const Tensor& a, const Tensor& b) {
  return detail::binary("add", a, b, [](auto... args) { cpu::add(args...); }, [](auto... args) { cuda::add(args...); });
}

inline Tensor mul(const Tensor& a, const Tensor& b) {
  return detail::binary("mul", a, b, [](auto... args) { cpu::mul(args...); }, [](auto... args) { cuda::mul(args...); });
}

inline Tensor scale(const Tensor& x, float s) {
  detail::check_defined("scale", x, "x");
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  detail::dispatch("scale", x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>) cpu::scale(x.data<T>(), s, y.data<T>(), x.numel());
    else cuda::scale(x.data<T>(), s, y.data<T>(), x.numel(), cuda::current_stream());
  });
  return y;
}

// x *= s, in place.
inline void scale_(Tensor& x, float s) {
  detail::check_defined("scale_", x, "x");
  detail::dispatch("scale_", x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>) cpu::scale(x.data<T>(), s, x.data<T>(), x.numel());
    else cuda::scale(x.data<T>(), s, x.data<T>(), x.numel(), cuda::current_stream());
  });
}

// y += alpha * x, in place: the gradient accumulation of every backward.
inline void axpy_(Tensor& y, float alpha, const Tensor& x) {
  detail::check_same("axpy_", {{&y, "y"}, {&x, "x"}});
  detail::check_shape("axpy_", x, y.shape(), "x");
  detail::dispatch("axpy_", y, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>) cpu::axpy(alpha, x.data<T>(), y.data<T>(), y.numel());
    else cuda::axpy(alpha, x.data<T>(), y.data<T>(), y.numel(), cuda::current_stream());
  });
}

inline Tensor silu(const Tensor& x) {
  detail::check_defined("silu", x, "x");
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  detail::dispatch("silu", x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>) cpu::silu_forward(x.data<T>(), y.data<T>(), x.numel());
    else cuda::silu_forward(x.data<T>(), y.data<T>(), x.numel(), cuda::current_stream());
  });
  return y;
}

inline Tensor silu_backward(const Tensor& x, const Tensor& dy) {
  return detail::binary("silu_backward", x, dy, [](auto... args) { cpu::silu_backward(args...); },
                        [](auto... args) { cuda::silu_backward(args...); });
}

// SwiGLU: silu(gate) * up, the Llama MLP's gated activation.
inline Tensor swiglu(const Tensor& gate, const Tensor& up) {
  return detail::binary("swiglu", gate, up, [](auto... args) { cpu::swiglu_forward(args...); },
                        [](auto... args) { cuda::swiglu_forward(args...); });
}

struct SwigluGrads {
  Tensor dgate, dup;
};
inline SwigluGrads swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dy) {
  constexpr std::string_view op = "swiglu_backward";
  detail::check_same(op, {{&gate, "gate"}, {&up, "up"}, {&dy, "dy"}});
  detail::check_shape(op, up, gate.shape(), "up");
  detail::check_shape(op, dy, gate.shape(), "dy");
  SwigluGrads g{Tensor::empty(gate.shape(), gate.dtype(), gate.device()),
                Tensor::empty(gate.shape(), gate.dtype(), gate.device())};
  detail::dispatch(op, gate, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::swiglu_backward(gate.data<T>(), up.data<T>(), dy.data<T>(), g.dgate.data<T>(), g.dup.data<T>(), gate.numel());
    else
      cuda::swiglu_backward(gate.data<T>(), up.data<T>(), dy.data<T>(), g.dgate.data<T>(), g.dup.data<T>(),
                            gate.numel(), cuda::current_stream());
  });
  return g;
}

}  // namespace qlora::ops
