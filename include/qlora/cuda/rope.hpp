#pragma once
// CUDA rotary position embedding, Hugging Face "rotate half" convention, in place (kernel layer; CPU twin:
// qlora/cpu/rope.hpp). x: (batch, seq, heads, head_dim) contiguous, T in {float, qlora::bf16};
// inv_freq: (head_dim / 2) f32. Token t sits at position pos_offset + t; angle = float(pos) * inv_freq[i]
// computed in f32. Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// For i < half: (a, b) = (x[i], x[i+half]) -> (a cos - b sin, b cos + a sin).
template <class T>
void rope_forward(T* x, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                  std::int64_t head_dim, std::int64_t pos_offset, Stream stream);

// The transpose of rope_forward: rotation by -angle, in place on the gradient.
template <class T>
void rope_backward(T* dx, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                   std::int64_t head_dim, std::int64_t pos_offset, Stream stream);

// q (batch, seq, q_heads, head_dim) and k (batch, seq, k_heads, head_dim) rotated in one launch: exactly
// rope_forward(q) then rope_forward(k) (rope_qk_backward: rope_backward of both).
template <class T>
void rope_qk_forward(T* q, T* k, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t q_heads,
                     std::int64_t k_heads, std::int64_t head_dim, std::int64_t pos_offset, Stream stream);
template <class T>
void rope_qk_backward(T* dq, T* dk, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t q_heads,
                      std::int64_t k_heads, std::int64_t head_dim, std::int64_t pos_offset, Stream stream);

}  // namespace qlora::cuda
