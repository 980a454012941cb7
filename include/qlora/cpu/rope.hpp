#pragma once
// CPU twin of cuda/rope.cu: rotary position embedding (Su et al. 2021) in the Hugging Face Llama
// "rotate half" layout: dimension i pairs with i + head_dim/2 (not with i+1 as in the paper).
// x: (batch, seq, heads, head_dim), rotated in place; inv_freq: (head_dim/2), float.
// rope_qk_* rotate q and k of one attention layer together (one pass, each angle's cos/sin formed once),
// giving exactly what rope_* on q and then on k gives.

#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

namespace detail {

// Rotates each pair (x_i, x_{i+half}) of every head of x (x_heads of them) and of x2 (x2_heads; x2 may be
// nullptr) by direction * angle, angle = pos * inv_freq[i]. The angle is a float product as in HF
// (position_ids.float() @ inv_freq), so CPU, GPU and HF agree on it bit for bit; cos/sin are then taken in
// T so the float64 tests see an exact rotation.
template <class T>
void rope_rotate(T* x, std::int64_t x_heads, T* x2, std::int64_t x2_heads, const float* inv_freq, std::int64_t batch,
                 std::int64_t seq, std::int64_t head_dim, std::int64_t pos_offset, int direction) {
  const std::int64_t half = head_dim / 2;
  const auto rotate = [half](T* xh, std::int64_t i, T c, T s) {
    const T a = xh[i], b = xh[i + half];
    xh[i] = a * c - b * s;
    xh[i + half] = b * c + a * s;
  };
#pragma omp parallel for if (qlora::cpu::worth_parallel(batch * seq * (x_heads + x2_heads) * head_dim))
  for (std::int64_t bt = 0; bt < batch * seq; ++bt) {
    const std::int64_t pos = pos_offset + bt % seq;
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = float(pos) * inv_freq[i];
      const T c = std::cos(T(angle));
      const T s = T(direction) * std::sin(T(angle));
      for (std::int64_t h = 0; h < x_heads; ++h) rotate(x + (bt * x_heads + h) * head_dim, i, c, s);
      for (std::int64_t h = 0; h < x2_heads; ++h) rotate(x2 + (bt * x2_heads + h) * head_dim, i, c, s);
    }
  }
}

}  // namespace detail

template <class T>
void rope_forward(T* x, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                  std::int64_t head_dim, std::int64_t pos_offset) {
  detail::rope_rotate(x, heads, static_cast<T*>(nullptr), 0, inv_freq, batch, seq, head_dim, pos_offset, +1);
}

// A rotation's transpose is its inverse: the gradient is rotated back by -angle.
template <class T>
void rope_backward(T* dx, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                   std::int64_t head_dim, std::int64_t pos_offset) {
  detail::rope_rotate(dx, heads, static_cast<T*>(nullptr), 0, inv_freq, batch, seq, head_dim, pos_offset, -1);
}

// q: (batch, seq, q_heads, head_dim), k: (batch, seq, k_heads, head_dim), both rotated in place.
template <class T>
void rope_qk_forward(T* q, T* k, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t q_heads,
                     std::int64_t k_heads, std::int64_t head_dim, std::int64_t pos_offset) {
  detail::rope_rotate(q, q_heads, k, k_heads, inv_freq, batch, seq, head_dim, pos_offset, +1);
}

template <class T>
void rope_qk_backward(T* dq, T* dk, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t q_heads,
                      std::int64_t k_heads, std::int64_t head_dim, std::int64_t pos_offset) {
  detail::rope_rotate(dq, q_heads, dk, k_heads, inv_freq, batch, seq, head_dim, pos_offset, -1);
}

}  // namespace qlora::cpu
