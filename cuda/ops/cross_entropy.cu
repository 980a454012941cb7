// Cross-entropy over a vocabulary: forward (per-row loss and logsumexp) and backward (softmax minus one-hot).
// Launch: one block of 256 threads per row; threads stride over the vocabulary; block reductions for the row
// max and the sum of exponentials. f32 arithmetic; losses and lse are f32.
// Backward reads logits[r, j] and writes dlogits[r, j] in the same thread, so dlogits may alias logits.
// Targets equal to -100, or otherwise outside [0, vocab), give loss 0 and a zero gradient row.
// Not done yet: an online (single-pass) max/sum, vectorised loads, fusing the lm-head matmul.

#include "common.cuh"
#include "qlora/cuda/cross_entropy.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

__device__ __forceinline__ bool is_counted(std::int32_t target, std::int64_t vocab) {
  return target >= 0 && target < vocab;  // excludes ignore_index (-100)
}

template <class T>
__global__ void cross_entropy_forward_kernel(const T* logits, const std::int32_t* targets, float* losses,
                                             float* lse, std::int64_t rows, std::int64_t vocab) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * vocab;

    float max = -INFINITY;
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) max = fmaxf(max, to_f32(lr[j]));
    max = block_max(max);

    float sum = 0.0f;
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(to_f32(lr[j]) - max);
    const float row_lse = max + logf(block_sum(sum));

    if (threadIdx.x == 0) {
      const std::int32_t target = targets[r];
      lse[r] = row_lse;
      losses[r] = is_counted(target, vocab) ? row_lse - to_f32(lr[target]) : 0.0f;
    }
  }
}

template <class T>
__global__ void cross_entropy_backward_kernel(const T* logits, const std::int32_t* targets, const float* lse,
                                              float grad_scale, T* dlogits, std::int64_t rows, std::int64_t vocab) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* lr = logits + r * vocab;
    T* dr = dlogits + r * vocab;
    const std::int32_t target = targets[r];

    if (!is_counted(target, vocab)) {
      for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) dr[j] = from_f32<T>(0.0f);
      continue;
    }
    const float row_lse = lse[r];
    for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float p = expf(to_f32(lr[j]) - row_lse);
      dr[j] = from_f32<T>(grad_scale * (p - (j == target ? 1.0f : 0.0f)));
    }
  }
}

}  // namespace

template <class T>
void cross_entropy_forward(const T* logits, const std::int32_t* targets, float* losses, float* lse, std::int64_t rows,
                           std::int64_t vocab, Stream stream) {
  if (rows <= 0) return;
  cross_entropy_forward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(dev(logits), targets, losses, lse, rows,
                                                                           vocab);
  check_launch("cross_entropy_forward_kernel");
}

template <class T>
void cross_entropy_backward(const T* logits, const std::int32_t* targets, const float* lse, float grad_scale,
                            T* dlogits, std::int64_t rows, std::int64_t vocab, Stream stream) {
  if (rows <= 0 || vocab <= 0) return;
  cross_entropy_backward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(dev(logits), targets, lse, grad_scale,
                                                                            dev(dlogits), rows, vocab);
  check_launch("cross_entropy_backward_kernel");
}

#define QLORA_INSTANTIATE(T)                                                                                  \
  template void cross_entropy_forward<T>(const T*, const std::int32_t*, float*, float*, std::int64_t,         \
                                         std::int64_t, Stream);                                               \
  template void cross_entropy_backward<T>(const T*, const std::int32_t*, const float*, float, T*, std::int64_t, \
                                          std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
