// Embedding lookup (a row gather) and its gradient (a row scatter-add).
// Launch: one block of 256 threads per token; threads stride over dim. Backward adds with f32 atomicAdd, so
// repeated ids accumulate correctly (in an unspecified order). Ids outside [0, vocab) are skipped.
// Not done yet: vectorised copies; sorting ids to replace atomics by a deterministic segmented sum.

#include "common.cuh"
#include "qlora/cuda/embedding.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

template <class T>
__global__ void embedding_forward_kernel(const T* table, const std::int32_t* ids, T* y, std::int64_t n,
                                         std::int64_t vocab, std::int64_t dim) {
  for (std::int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const std::int64_t id = ids[t];
    if (id < 0 || id >= vocab) continue;
    const T* row = table + id * dim;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x) y[t * dim + j] = row[j];
  }
}

template <class T>
__global__ void embedding_backward_kernel(const T* dy, const std::int32_t* ids, float* dtable, std::int64_t n,
                                          std::int64_t vocab, std::int64_t dim) {
  for (std::int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const std::int64_t id = ids[t];
    if (id < 0 || id >= vocab) continue;
    float* row = dtable + id * dim;
    for (std::int64_t j = threadIdx.x; j < dim; j += blockDim.x) atomicAdd(row + j, to_f32(dy[t * dim + j]));
  }
}

}  // namespace

template <class T>
void embedding_forward(const T* table, const std::int32_t* ids, T* y, std::int64_t n, std::int64_t vocab,
                       std::int64_t dim, Stream stream) {
  if (n <= 0 || dim <= 0) return;
  embedding_forward_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(dev(table), ids, dev(y), n, vocab, dim);
  check_launch("embedding_forward_kernel");
}

template <class T>
void embedding_backward(const T* dy, const std::int32_t* ids, float* dtable, std::int64_t n, std::int64_t vocab,
                        std::int64_t dim, Stream stream) {
  if (n <= 0 || dim <= 0) return;
  embedding_backward_kernel<<<row_grid(n), kRowThreads, 0, stream>>>(dev(dy), ids, dtable, n, vocab, dim);
  check_launch("embedding_backward_kernel");
}

#define QLORA_INSTANTIATE(T)                                                                                       \
  template void embedding_forward<T>(const T*, const std::int32_t*, T*, std::int64_t, std::int64_t, std::int64_t, \
                                     Stream);                                                                     \
  template void embedding_backward<T>(const T*, const std::int32_t*, float*, std::int64_t, std::int64_t,          \
                                      std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
