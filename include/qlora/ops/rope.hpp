#pragma once
// Rotary position embedding, Hugging Face "rotate half" convention, applied in place to q or k of layout
// (batch, seq, heads, head_dim), or to q and k together in one pass (rope_qk_). Token t sits at position
// pos_offset + t (the KV-cache length when decoding).

#include <cmath>
#include <vector>

#include "qlora/cpu/rope.hpp"
#include "qlora/cuda/rope.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

// inv_freq[i] = theta^(-2i/head_dim), i < head_dim/2, as an f32 host tensor (move it .to(device) once).
// Computed in double and rounded once; rope_scaling (Llama 3) rescales this vector in the model layer.
inline Tensor rope_inv_freq(std::int64_t head_dim, double theta) {
  QLORA_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be positive and even, got " + std::to_string(head_dim));
  std::vector<float> inv(std::size_t(head_dim / 2));
  for (std::size_t i = 0; i < inv.size(); ++i) inv[i] = float(std::pow(theta, -2.0 * double(i) / double(head_dim)));
  return Tensor::from(inv, {head_dim / 2});
}

namespace detail {
inline void rope_apply(std::string_view op, Tensor& x, const Tensor& inv_freq, std::int64_t pos_offset, bool backward) {
  check_defined(op, x, "x");
  if (x.rank() != 4) fail(op, "x must be (batch, seq, heads, head_dim), got " + x.shape().str());
  const std::int64_t batch = x.dim(0), seq = x.dim(1), heads = x.dim(2), head_dim = x.dim(3);
  if (head_dim % 2) fail(op, "head_dim must be even, got " + std::to_string(head_dim));
  check_shape(op, inv_freq, Shape{head_dim / 2}, "inv_freq");
  check_dtype(op, inv_freq, DType::f32, "inv_freq");
  check_device(op, inv_freq, x.device(), "inv_freq");
  if (pos_offset < 0) fail(op, "negative position offset " + std::to_string(pos_offset));
  dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    const float* f = inv_freq.data<float>();
    if constexpr (is_cpu_v<decltype(backend)>) {
      if (backward) cpu::rope_backward(x.data<T>(), f, batch, seq, heads, head_dim, pos_offset);
      else cpu::rope_forward(x.data<T>(), f, batch, seq, heads, head_dim, pos_offset);
    } else {
      if (backward) cuda::rope_backward(x.data<T>(), f, batch, seq, heads, head_dim, pos_offset, cuda::current_stream());
      else cuda::rope_forward(x.data<T>(), f, batch, seq, heads, head_dim, pos_offset, cuda::current_stream());
    }
  });
}

// q (batch, seq, q_heads, head_dim) and k (batch, seq, k_heads, head_dim): the checks of rope_apply for both.
inline void rope_qk_apply(std::string_view op, Tensor& q, Tensor& k, const Tensor& inv_freq, std::int64_t pos_offset,
                          bool backward) {
  check_same(op, {{&q, "q"}, {&k, "k"}});
  if (q.rank() != 4 || k.rank() != 4 || q.dim(0) != k.dim(0) || q.dim(1) != k.dim(1) || q.dim(3) != k.dim(3))
    fail(op, "q and k must be (batch, seq, heads, head_dim) with the same batch, seq and head_dim, got " +
                 q.shape().str() + " and " + k.shape().str());
  const std::int64_t batch = q.dim(0), seq = q.dim(1), q_heads = q.dim(2), k_heads = k.dim(2), head_dim = q.dim(3);
  if (head_dim % 2) fail(op, "head_dim must be even, got " + std::to_string(head_dim));
  check_shape(op, inv_freq, Shape{head_dim / 2}, "inv_freq");
  check_dtype(op, inv_freq, DType::f32, "inv_freq");
  check_device(op, inv_freq, q.device(), "inv_freq");
  if (pos_offset < 0) fail(op, "negative position offset " + std::to_string(pos_offset));
  dispatch(op, q, [&](auto t, auto backend) {
    using T = decltype(t);
    const float* f = inv_freq.data<float>();
    T* qp = q.data<T>();
    T* kp = k.data<T>();
    if constexpr (is_cpu_v<decltype(backend)>) {
      if (backward) cpu::rope_qk_backward(qp, kp, f, batch, seq, q_heads, k_heads, head_dim, pos_offset);
      else cpu::rope_qk_forward(qp, kp, f, batch, seq, q_heads, k_heads, head_dim, pos_offset);
    } else {
      if (backward)
        cuda::rope_qk_backward(qp, kp, f, batch, seq, q_heads, k_heads, head_dim, pos_offset, cuda::current_stream());
      else cuda::rope_qk_forward(qp, kp, f, batch, seq, q_heads, k_heads, head_dim, pos_offset, cuda::current_stream());
    }
  });
}
}  // namespace detail

inline void rope_(Tensor& x, const Tensor& inv_freq, std::int64_t pos_offset = 0) {
  detail::rope_apply("rope_", x, inv_freq, pos_offset, false);
}
// The backward of a rotation is the inverse rotation, applied in place to the gradient.
inline void rope_backward_(Tensor& dx, const Tensor& inv_freq, std::int64_t pos_offset = 0) {
  detail::rope_apply("rope_backward_", dx, inv_freq, pos_offset, true);
}

// rope_(q) and rope_(k) in one pass (one launch on CUDA), with the same results.
inline void rope_qk_(Tensor& q, Tensor& k, const Tensor& inv_freq, std::int64_t pos_offset = 0) {
  detail::rope_qk_apply("rope_qk_", q, k, inv_freq, pos_offset, false);
}
inline void rope_qk_backward_(Tensor& dq, Tensor& dk, const Tensor& inv_freq, std::int64_t pos_offset = 0) {
  detail::rope_qk_apply("rope_qk_backward_", dq, dk, inv_freq, pos_offset, true);
}

}  // namespace qlora::ops
