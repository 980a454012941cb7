// Causal grouped-query attention, plain version: forward and backward.
// Launch: one block of 256 threads (8 warps) per (query t, query head h, batch b) row: grid (tq, hq, batch).
// A head vector of d <= 256 channels is spread over a warp, lane l holding channels l, l+32, ..., l+224 in
// registers, so q.k_j is a per-lane partial sum and a warp shuffle reduction; warps take keys j = warp,
// warp + 8, ... . Query t sits at absolute position tk - tq + t (KV cache) and sees keys 0 .. tk - tq + t.
// Forward: S_j = scale q.k_j into dynamic shared memory (tk floats: 32 KiB at tk = 8192, opting in above 48 KiB),
// then P_j = exp(S_j - max) and l = sum_j P_j with block reductions, then O = sum_j P_j v_j / l from per-warp
// partial sums, and lse = max + log l.
// Backward recomputes P_j = exp(scale q.k_j - lse) key by key (no shared row), with D = dO.O:
// dS_j = P_j (dO.v_j - D); dq = scale sum_j dS_j k_j (overwritten); dk_j += scale dS_j q and dv_j += P_j dO
// with f32 atomics (one per channel per key per query: slow, but simple and exact up to f32 ordering).
// Not done yet (a later fused kernel): tiling queries per block, tensor cores, a non-atomic dk/dv reduction.

#include "common.cuh"
#include "qlora/cuda/attention.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

constexpr int kAttentionThreads = 256;
constexpr int kAttentionWarps = kAttentionThreads / kWarpSize;
constexpr int kMaxHeadDim = 256;
constexpr int kLaneChannels = kMaxHeadDim / kWarpSize;  // lane l holds channels l + 32 i, i < kLaneChannels

using HeadFragment = float[kLaneChannels];  // this lane's channels of one head vector

// Loads this lane's channels of a head vector (zero beyond d).
template <class T>
__device__ __forceinline__ void load_head(const T* src, std::int64_t d, int lane, HeadFragment& dst) {
#pragma unroll
  for (int i = 0; i < kLaneChannels; ++i) {
    const int c = lane + kWarpSize * i;
    dst[i] = c < d ? to_f32(src[c]) : 0.0f;
  }
}

// a . b over the whole head: every lane of the warp gets the result.
__device__ __forceinline__ float warp_dot(const HeadFragment& a, const HeadFragment& b) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kLaneChannels; ++i) sum += a[i] * b[i];
  return warp_sum(sum);
}

// Where the rows of one (batch, head) live. q-like tensors are (batch, tq, hq, d), k-like (batch, tk, hkv, d).
struct RowCoordinates {
  std::int64_t q_offset;    // start of query row (b, t, h) in q, out, dout, dq
  std::int64_t kv_offset;   // start of key 0 of kv head g in batch b, in k, v, dk, dv
  std::int64_t kv_stride;   // elements from key j to key j + 1 of the same head: hkv * d
  std::int64_t lse_offset;  // (b, h, t) in lse
  std::int64_t kv_len;      // keys this query attends: tk - tq + t + 1
};

__device__ __forceinline__ RowCoordinates row_coordinates(std::int64_t tq, std::int64_t tk, std::int64_t hq,
                                                          std::int64_t hkv, std::int64_t d) {
  const std::int64_t t = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const std::int64_t g = h / (hq / hkv);
  return RowCoordinates{((b * tq + t) * hq + h) * d, (b * tk * hkv + g) * d, hkv * d, (b * hq + h) * tq + t,
                        tk - tq + t + 1};
}

template <class T>
__global__ void attention_forward_kernel(const T* q, const T* k, const T* v, T* out, float* lse, std::int64_t tq,
                                         std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
                                         float scale) {
  extern __shared__ float scores[];  // S_j, then P_j, for j < kv_len
  __shared__ float partial_out[kAttentionWarps][kMaxHeadDim];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const RowCoordinates row = row_coordinates(tq, tk, hq, hkv, d);

  HeadFragment q_frag;
  load_head(q + row.q_offset, d, lane, q_frag);

  // S_j = scale q . k_j
  for (std::int64_t j = warp; j < row.kv_len; j += kAttentionWarps) {
    HeadFragment k_frag;
    load_head(k + row.kv_offset + j * row.kv_stride, d, lane, k_frag);
    const float s = scale * warp_dot(q_frag, k_frag);
    if (lane == 0) scores[j] = s;
  }
  __syncthreads();

  // P_j = exp(S_j - max_j S_j),  l = sum_j P_j
  float max = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < row.kv_len; j += blockDim.x) max = fmaxf(max, scores[j]);
  max = block_max(max);
  float l = 0.0f;
  for (std::int64_t j = threadIdx.x; j < row.kv_len; j += blockDim.x) {
    const float p = expf(scores[j] - max);
    scores[j] = p;
    l += p;
  }
  l = block_sum(l);  // its __syncthreads also publish every P_j to the block

  // O = sum_j P_j v_j / l: each warp sums its keys, then the warps' partial sums are added.
  float o[kLaneChannels] = {};
  for (std::int64_t j = warp; j < row.kv_len; j += kAttentionWarps) {
    const float p = scores[j];
    const T* vj = v + row.kv_offset + j * row.kv_stride;
#pragma unroll
    for (int i = 0; i < kLaneChannels; ++i) {
      const int c = lane + kWarpSize * i;
      if (c < d) o[i] += p * to_f32(vj[c]);
    }
  }
#pragma unroll
  for (int i = 0; i < kLaneChannels; ++i) {
    const int c = lane + kWarpSize * i;
    if (c < d) partial_out[warp][c] = o[i];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) sum += partial_out[w][c];
    out[row.q_offset + c] = from_f32<T>(sum / l);
  }
  if (threadIdx.x == 0) lse[row.lse_offset] = max + logf(l);
}

template <class T>
__global__ void attention_backward_kernel(const T* q, const T* k, const T* v, const T* out, const float* lse,
                                          const T* dout, T* dq, float* dk, float* dv, std::int64_t tq,
                                          std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
                                          float scale) {
  __shared__ float partial_dq[kAttentionWarps][kMaxHeadDim];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const RowCoordinates row = row_coordinates(tq, tk, hq, hkv, d);

  HeadFragment q_frag, o_frag, do_frag;
  load_head(q + row.q_offset, d, lane, q_frag);
  load_head(out + row.q_offset, d, lane, o_frag);
  load_head(dout + row.q_offset, d, lane, do_frag);
  const float D = warp_dot(do_frag, o_frag);  // D = dO . O, computed by every warp
  const float row_lse = lse[row.lse_offset];

  float dq_acc[kLaneChannels] = {};
  for (std::int64_t j = warp; j < row.kv_len; j += kAttentionWarps) {
    const std::int64_t kv_j = row.kv_offset + j * row.kv_stride;
    HeadFragment k_frag, v_frag;
    load_head(k + kv_j, d, lane, k_frag);
    load_head(v + kv_j, d, lane, v_frag);
    const float p = expf(scale * warp_dot(q_frag, k_frag) - row_lse);  // P_j
    const float ds = p * (warp_dot(do_frag, v_frag) - D);               // dS_j = P_j (dP_j - D)
#pragma unroll
    for (int i = 0; i < kLaneChannels; ++i) {
      const int c = lane + kWarpSize * i;
      if (c < d) {
        dq_acc[i] += ds * k_frag[i];
        atomicAdd(dk + kv_j + c, scale * ds * q_frag[i]);
        atomicAdd(dv + kv_j + c, p * do_frag[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kLaneChannels; ++i) {
    const int c = lane + kWarpSize * i;
    if (c < d) partial_dq[warp][c] = dq_acc[i];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float sum = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) sum += partial_dq[w][c];
    dq[row.q_offset + c] = from_f32<T>(scale * sum);
  }
}

// The limits of this plain path, as errors naming the offending size.
void check_shape(const char* name, std::int64_t batch, std::int64_t tq, std::int64_t tk, std::int64_t hq,
                 std::int64_t hkv, std::int64_t d) {
  const std::string where = std::string(name) + ": ";
  QLORA_CHECK(d >= 1 && d <= kMaxHeadDim, where + "head dim " + std::to_string(d) + " is outside [1, 256]");
  QLORA_CHECK(tk >= tq, where + "tk " + std::to_string(tk) + " < tq " + std::to_string(tq));
  QLORA_CHECK(hkv >= 1 && hq % hkv == 0,
              where + "hq " + std::to_string(hq) + " is not a multiple of hkv " + std::to_string(hkv));
  QLORA_CHECK(hq <= 65535 && batch <= 65535 && tq <= 0x7fffffff,
              where + "grid too large (tq " + std::to_string(tq) + ", hq " + std::to_string(hq) + ", batch " +
                  std::to_string(batch) + ")");
}

}  // namespace

template <class T>
void attention_forward(const T* q, const T* k, const T* v, T* out, float* lse, std::int64_t batch, std::int64_t tq,
                       std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d, Stream stream) {
  if (batch <= 0 || tq <= 0 || hq <= 0) return;
  check_shape("attention_forward", batch, tq, tk, hq, hkv, d);
  auto* kernel = &attention_forward_kernel<device_t<T>>;
  const std::size_t shared_bytes = std::size_t(tk) * sizeof(float);
  allow_dynamic_shared_memory(kernel, shared_bytes, "attention_forward_kernel");
  const dim3 grid(static_cast<unsigned>(tq), static_cast<unsigned>(hq), static_cast<unsigned>(batch));
  const float scale = 1.0f / std::sqrt(float(d));
  kernel<<<grid, kAttentionThreads, shared_bytes, stream>>>(dev(q), dev(k), dev(v), dev(out), lse, tq, tk, hq, hkv, d,
                                                            scale);
  check_launch("attention_forward_kernel");
}

template <class T>
void attention_backward(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dout, T* dq,
                        float* dk, float* dv, std::int64_t batch, std::int64_t tq, std::int64_t tk, std::int64_t hq,
                        std::int64_t hkv, std::int64_t d, Stream stream) {
  if (batch <= 0 || tq <= 0 || hq <= 0) return;
  check_shape("attention_backward", batch, tq, tk, hq, hkv, d);
  const dim3 grid(static_cast<unsigned>(tq), static_cast<unsigned>(hq), static_cast<unsigned>(batch));
  const float scale = 1.0f / std::sqrt(float(d));
  attention_backward_kernel<<<grid, kAttentionThreads, 0, stream>>>(dev(q), dev(k), dev(v), dev(out), lse, dev(dout),
                                                                    dev(dq), dk, dv, tq, tk, hq, hkv, d, scale);
  check_launch("attention_backward_kernel");
}

#define QLORA_INSTANTIATE(T)                                                                                    \
  template void attention_forward<T>(const T*, const T*, const T*, T*, float*, std::int64_t, std::int64_t,      \
                                     std::int64_t, std::int64_t, std::int64_t, std::int64_t, Stream);           \
  template void attention_backward<T>(const T*, const T*, const T*, const T*, const float*, const T*, T*, float*, \
                                      float*, std::int64_t, std::int64_t, std::int64_t, std::int64_t,            \
                                      std::int64_t, std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
