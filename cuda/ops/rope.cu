// Rotary position embedding (Hugging Face "rotate half"), forward and backward, in place, on one tensor or on
// q and k of an attention layer together.
// Launch: grid-stride loop over the batch * seq * (heads [+ k_heads]) * head_dim/2 rotation pairs, 256 threads
// per block; one thread rotates the pair (x[i], x[i + half]) of one head of one token. With q and k in one
// launch the flat head index runs over the token's q heads, then its k heads: one launch instead of two,
// the same arithmetic per pair (bit-identical to rotating q, then k). The angle float(pos) * inv_freq[i] is
// formed in f32 as Hugging Face does, and sincosf is the accurate (not the fast-math) version.
// Not done yet: a cos/sin cache, vectorised loads.

#include "common.cuh"
#include "qlora/cuda/rope.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

// Rotates every head of q (q_heads per token) and of k (k_heads per token; k may be nullptr with k_heads 0).
// direction = +1 rotates by +angle (forward), -1 by -angle (backward: the transpose of the rotation).
template <class T>
__global__ void rope_kernel(T* q, std::int64_t q_heads, T* k, std::int64_t k_heads, const float* inv_freq,
                            std::int64_t batch, std::int64_t seq, std::int64_t head_dim, std::int64_t pos_offset,
                            float direction) {
  const std::int64_t half = head_dim / 2;
  const std::int64_t heads = q_heads + k_heads;
  const std::int64_t pairs = batch * seq * heads * half;
  for (std::int64_t p = grid_index(); p < pairs; p += grid_stride()) {
    const std::int64_t i = p % half;
    const std::int64_t token = p / half / heads;  // flat (batch, seq) index
    const std::int64_t h = p / half % heads;      // head within the token: q heads first, then k heads
    const std::int64_t t = token % seq;           // token within its sequence
    const float angle = float(pos_offset + t) * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    s *= direction;

    T* xh = h < q_heads ? q + (token * q_heads + h) * head_dim : k + (token * k_heads + h - q_heads) * head_dim;
    const float a = to_f32(xh[i]);
    const float b = to_f32(xh[i + half]);
    xh[i] = from_f32<T>(a * c - b * s);
    xh[i + half] = from_f32<T>(b * c + a * s);
  }
}

template <class T>
void rope(T* q, std::int64_t q_heads, T* k, std::int64_t k_heads, const float* inv_freq, std::int64_t batch,
          std::int64_t seq, std::int64_t head_dim, std::int64_t pos_offset, float direction, Stream stream) {
  const std::int64_t pairs = batch * seq * (q_heads + k_heads) * (head_dim / 2);
  if (pairs <= 0) return;
  rope_kernel<<<elementwise_grid(pairs), kElementwiseThreads, 0, stream>>>(
      dev(q), q_heads, dev(k), k_heads, inv_freq, batch, seq, head_dim, pos_offset, direction);
  check_launch("rope_kernel");
}

}  // namespace

template <class T>
void rope_forward(T* x, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                  std::int64_t head_dim, std::int64_t pos_offset, Stream stream) {
  rope(x, heads, static_cast<T*>(nullptr), 0, inv_freq, batch, seq, head_dim, pos_offset, 1.0f, stream);
}

template <class T>
void rope_backward(T* dx, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                   std::int64_t head_dim, std::int64_t pos_offset, Stream stream) {
  rope(dx, heads, static_cast<T*>(nullptr), 0, inv_freq, batch, seq, head_dim, pos_offset, -1.0f, stream);
}

template <class T>
void rope_qk_forward(T* q, T* k, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t q_heads,
                     std::int64_t k_heads, std::int64_t head_dim, std::int64_t pos_offset, Stream stream) {
  rope(q, q_heads, k, k_heads, inv_freq, batch, seq, head_dim, pos_offset, 1.0f, stream);
}

template <class T>
void rope_qk_backward(T* dq, T* dk, const float* inv_freq, std::int64_t batch, std::int64_t seq, std::int64_t q_heads,
                      std::int64_t k_heads, std::int64_t head_dim, std::int64_t pos_offset, Stream stream) {
  rope(dq, q_heads, dk, k_heads, inv_freq, batch, seq, head_dim, pos_offset, -1.0f, stream);
}

#define QLORA_INSTANTIATE(T)                                                                                   \
  template void rope_forward<T>(T*, const float*, std::int64_t, std::int64_t, std::int64_t, std::int64_t,      \
                                std::int64_t, Stream);                                                         \
  template void rope_backward<T>(T*, const float*, std::int64_t, std::int64_t, std::int64_t, std::int64_t,     \
                                 std::int64_t, Stream);                                                        \
  template void rope_qk_forward<T>(T*, T*, const float*, std::int64_t, std::int64_t, std::int64_t,             \
                                   std::int64_t, std::int64_t, std::int64_t, Stream);                          \
  template void rope_qk_backward<T>(T*, T*, const float*, std::int64_t, std::int64_t, std::int64_t,            \
                                    std::int64_t, std::int64_t, std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
