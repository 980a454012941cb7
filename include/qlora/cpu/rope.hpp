#pragma once
// CPU twin of cuda/rope.cu: rotary position embedding (Su et al. 2021) in the Hugging Face Llama
// "rotate half" layout: dimension i pairs with i + head_dim/2 (not with i+1 as in the paper).
// x: (batch, seq, heads, head_dim), rotated in place; inv_freq: (head_dim/2), float.

#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

namespace detail {

// Rotates each pair (x_i, x_{i+half}) by direction * angle, angle = pos * inv_freq[i].
// The angle is a float product as in HF (position_ids.float() @ inv_freq), so CPU, GPU and HF agree
// on it bit for bit; cos/sin are then taken in T so the float64 tests see an exact rotation.
template <class T>
void rope_rotate(T* x, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                 std::int64_t head_dim, std::int64_t pos_offset, int direction) {
  const std::int64_t half = head_dim / 2;
#pragma omp parallel for if (qlora::cpu::worth_parallel(batch * seq * heads * head_dim))
  for (std::int64_t bt = 0; bt < batch * seq; ++bt) {
    const std::int64_t pos = pos_offset + bt % seq;
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = float(pos) * inv_freq[i];
      const T c = std::cos(T(angle));
      const T s = T(direction) * std::sin(T(angle));
      for (std::int64_t h = 0; h < heads; ++h) {
        T* xh = x + (bt * heads + h) * head_dim;
        const T a = xh[i], b = xh[i + half];
        xh[i] = a * c - b * s;
        xh[i + half] = b * c + a * s;
      }
    }
  }
}

}  // namespace detail

template <class T>
void rope_forward(T* x, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                  std::int64_t head_dim, std::int64_t pos_offset) {
  detail::rope_rotate(x, inv_freq, batch, seq, heads, head_dim, pos_offset, +1);
}

// A rotation's transpose is its inverse: the gradient is rotated back by -angle.
template <class T>
void rope_backward(T* dx, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                   std::int64_t head_dim, std::int64_t pos_offset) {
  detail::rope_rotate(dx, inv_freq, batch, seq, heads, head_dim, pos_offset, -1);
}

}  // namespace qlora::cpu
