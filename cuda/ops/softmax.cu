// Numerically stable softmax over the last axis and its backward.
// Launch: one block of 256 threads per row; threads stride over the columns; block reductions for the row
// max, the row sum of exponentials and the backward's dot product. f32 arithmetic.
// Forward reads each row three times (max, sum, write; the row is usually L2-resident). Not done yet: an
// online (single-pass) max/sum, keeping short rows in registers, vectorised loads.

#include "common.cuh"
#include "qlora/cuda/softmax.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

template <class T>
__global__ void softmax_forward_kernel(const T* x, T* y, std::int64_t rows, std::int64_t cols) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;

    float max = -INFINITY;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) max = fmaxf(max, to_f32(xr[j]));
    max = block_max(max);

    float sum = 0.0f;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) sum += expf(to_f32(xr[j]) - max);
    const float inv_sum = 1.0f / block_sum(sum);

    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x)
      yr[j] = from_f32<T>(expf(to_f32(xr[j]) - max) * inv_sum);
  }
}

// dx = y * (dy - <dy, y>). Every thread finishes reading dy for the dot product (block_sum synchronises)
// before any thread writes dx, and then reads dy[j] before writing dx[j]: dx may alias dy.
template <class T>
__global__ void softmax_backward_kernel(const T* y, const T* dy, T* dx, std::int64_t rows, std::int64_t cols) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;

    float dot = 0.0f;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) dot += to_f32(dyr[j]) * to_f32(yr[j]);
    dot = block_sum(dot);

    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x)
      dxr[j] = from_f32<T>(to_f32(yr[j]) * (to_f32(dyr[j]) - dot));
  }
}

}  // namespace

template <class T>
void softmax_forward(const T* x, T* y, std::int64_t rows, std::int64_t cols, Stream stream) {
  if (rows <= 0 || cols <= 0) return;
  softmax_forward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(dev(x), dev(y), rows, cols);
  check_launch("softmax_forward_kernel");
}

template <class T>
void softmax_backward(const T* y, const T* dy, T* dx, std::int64_t rows, std::int64_t cols, Stream stream) {
  if (rows <= 0 || cols <= 0) return;
  softmax_backward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(dev(y), dev(dy), dev(dx), rows, cols);
  check_launch("softmax_backward_kernel");
}

#define QLORA_INSTANTIATE(T)                                                          \
  template void softmax_forward<T>(const T*, T*, std::int64_t, std::int64_t, Stream); \
  template void softmax_backward<T>(const T*, const T*, T*, std::int64_t, std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
