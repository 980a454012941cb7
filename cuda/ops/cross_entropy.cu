// Cross-entropy over a vocabulary, whole or one vocabulary chunk at a time: forward (per-row loss and
// logsumexp) and backward (softmax minus one-hot).
// Forward launch: one block of 256 threads per row; threads stride over the row's columns keeping an online
// (max, sum of exp) pair each (Milakov & Gimelshein 2018: a new maximum rescales the sum), so the logits are
// read once; a block max then a block sum of the rescaled sums give the row's pair. Over the whole vocabulary
// thread 0 writes lse and the loss; over a chunk it merges the pair into the row's running statistics
// (cpu/cross_entropy.hpp gives the merge) and records the target's logit when the target is in the chunk.
// Backward launch: the same shape; each thread reads logits[r, j] and writes dlogits[r, j], so dlogits may
// alias logits. f32 arithmetic; losses, lse and the running statistics are f32.
// Targets equal to -100, or otherwise outside [0, vocab), give loss 0 and a zero gradient row.
// Not done yet: vectorised loads, fusing the lm-head matmul.

#include "common.cuh"
#include "qlora/cuda/cross_entropy.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

__device__ __forceinline__ bool is_counted(std::int32_t target, std::int64_t vocab) {
  return target >= 0 && target < vocab;  // excludes ignore_index (-100)
}

// exp(from - to) * value, 0 when the pair is still empty (from = -inf: no element seen).
__device__ __forceinline__ float rescaled(float value, float from, float to) {
  return from == -INFINITY ? 0.0f : value * expf(from - to);
}

// The block's (max, sum_j exp(l_j - max)) over l_0 .. l_{n-1}, every thread gets it. Online per thread.
template <class T>
__device__ __forceinline__ float2 block_max_sum_exp(const T* l, std::int64_t n) {
  float m = -INFINITY, s = 0.0f;
  for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float v = to_f32(l[j]);
    if (v > m) {
      s = rescaled(s, m, v) + 1.0f;
      m = v;
    } else if (m != -INFINITY) {
      s += expf(v - m);
    }
  }
  const float block_m = block_max(m);
  return make_float2(block_m, block_sum(rescaled(s, m, block_m)));
}

// running_max == nullptr: the chunk is the whole vocabulary; write lse and losses. Otherwise merge the chunk
// [col_begin, col_begin + cols) into the running statistics.
template <class T>
__global__ void cross_entropy_forward_kernel(const T* logits, const std::int32_t* targets, float* running_max,
                                             float* running_sum, float* target_logit, float* losses, float* lse,
                                             std::int64_t rows, std::int64_t cols, std::int64_t col_begin,
                                             std::int64_t vocab) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * cols;
    const float2 chunk = block_max_sum_exp(lr, cols);
    if (threadIdx.x != 0) continue;
    const std::int32_t target = targets[r];
    const std::int64_t t = std::int64_t(target) - col_begin;
    const bool target_here = is_counted(target, vocab) && t >= 0 && t < cols;
    if (running_max == nullptr) {
      const float row_lse = chunk.x + logf(chunk.y);
      lse[r] = row_lse;
      losses[r] = target_here ? row_lse - to_f32(lr[t]) : 0.0f;
    } else {
      const float merged = fmaxf(running_max[r], chunk.x);
      running_sum[r] = rescaled(running_sum[r], running_max[r], merged) + rescaled(chunk.y, chunk.x, merged);
      running_max[r] = merged;
      if (target_here) target_logit[r] = to_f32(lr[t]);
    }
  }
}

__global__ void cross_entropy_chunk_start_kernel(float* running_max, float* running_sum, float* target_logit,
                                                 std::int64_t rows) {
  for (std::int64_t r = grid_index(); r < rows; r += grid_stride()) {
    running_max[r] = -INFINITY;
    running_sum[r] = 0.0f;
    target_logit[r] = 0.0f;
  }
}

__global__ void cross_entropy_chunk_finish_kernel(const float* running_max, const float* running_sum,
                                                  const float* target_logit, const std::int32_t* targets,
                                                  float* losses, float* lse, std::int64_t rows, std::int64_t vocab) {
  for (std::int64_t r = grid_index(); r < rows; r += grid_stride()) {
    const float row_lse = running_max[r] + logf(running_sum[r]);
    lse[r] = row_lse;
    losses[r] = is_counted(targets[r], vocab) ? row_lse - target_logit[r] : 0.0f;
  }
}

template <class T>
__global__ void cross_entropy_backward_kernel(const T* logits, const std::int32_t* targets, const float* lse,
                                              float grad_scale, T* dlogits, std::int64_t rows, std::int64_t cols,
                                              std::int64_t col_begin, std::int64_t vocab) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * cols;
    T* dr = dlogits + r * cols;
    const std::int32_t target = targets[r];

    if (!is_counted(target, vocab)) {
      for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) dr[j] = from_f32<T>(0.0f);
      continue;
    }
    const float row_lse = lse[r];
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float p = expf(to_f32(lr[j]) - row_lse);
      dr[j] = from_f32<T>(grad_scale * (p - (j + col_begin == target ? 1.0f : 0.0f)));
    }
  }
}

}  // namespace

template <class T>
void cross_entropy_forward(const T* logits, const std::int32_t* targets, float* losses, float* lse, std::int64_t rows,
                           std::int64_t vocab, Stream stream) {
  if (rows <= 0) return;
  cross_entropy_forward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(
      dev(logits), targets, nullptr, nullptr, nullptr, losses, lse, rows, vocab, 0, vocab);
  check_launch("cross_entropy_forward_kernel");
}

template <class T>
void cross_entropy_backward(const T* logits, const std::int32_t* targets, const float* lse, float grad_scale,
                            T* dlogits, std::int64_t rows, std::int64_t vocab, Stream stream) {
  cross_entropy_chunk_backward(logits, targets, lse, grad_scale, dlogits, rows, vocab, 0, vocab, stream);
}

void cross_entropy_chunk_start(float* running_max, float* running_sum, float* target_logit, std::int64_t rows,
                               Stream stream) {
  if (rows <= 0) return;
  cross_entropy_chunk_start_kernel<<<elementwise_grid(rows), kElementwiseThreads, 0, stream>>>(
      running_max, running_sum, target_logit, rows);
  check_launch("cross_entropy_chunk_start_kernel");
}

template <class T>
void cross_entropy_chunk_forward(const T* logits, const std::int32_t* targets, float* running_max, float* running_sum,
                                 float* target_logit, std::int64_t rows, std::int64_t chunk_cols,
                                 std::int64_t col_begin, std::int64_t vocab, Stream stream) {
  if (rows <= 0 || chunk_cols <= 0) return;
  cross_entropy_forward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(
      dev(logits), targets, running_max, running_sum, target_logit, nullptr, nullptr, rows, chunk_cols, col_begin,
      vocab);
  check_launch("cross_entropy_forward_kernel (chunk)");
}

void cross_entropy_chunk_finish(const float* running_max, const float* running_sum, const float* target_logit,
                                const std::int32_t* targets, float* losses, float* lse, std::int64_t rows,
                                std::int64_t vocab, Stream stream) {
  if (rows <= 0) return;
  cross_entropy_chunk_finish_kernel<<<elementwise_grid(rows), kElementwiseThreads, 0, stream>>>(
      running_max, running_sum, target_logit, targets, losses, lse, rows, vocab);
  check_launch("cross_entropy_chunk_finish_kernel");
}

template <class T>
void cross_entropy_chunk_backward(const T* logits, const std::int32_t* targets, const float* lse, float grad_scale,
                                  T* dlogits, std::int64_t rows, std::int64_t chunk_cols, std::int64_t col_begin,
                                  std::int64_t vocab, Stream stream) {
  if (rows <= 0 || chunk_cols <= 0) return;
  cross_entropy_backward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(
      dev(logits), targets, lse, grad_scale, dev(dlogits), rows, chunk_cols, col_begin, vocab);
  check_launch("cross_entropy_backward_kernel");
}

#define QLORA_INSTANTIATE(T)                                                                                    \
  template void cross_entropy_forward<T>(const T*, const std::int32_t*, float*, float*, std::int64_t,           \
                                         std::int64_t, Stream);                                                 \
  template void cross_entropy_backward<T>(const T*, const std::int32_t*, const float*, float, T*, std::int64_t,   \
                                          std::int64_t, Stream);                                                \
  template void cross_entropy_chunk_forward<T>(const T*, const std::int32_t*, float*, float*, float*,           \
                                               std::int64_t, std::int64_t, std::int64_t, std::int64_t, Stream); \
  template void cross_entropy_chunk_backward<T>(const T*, const std::int32_t*, const float*, float, T*,         \
                                                std::int64_t, std::int64_t, std::int64_t, std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
