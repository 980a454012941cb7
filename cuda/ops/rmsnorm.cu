// RMSNorm forward and backward over the last axis, alone or fused with the residual add before it
// (add_rmsnorm: h = x + residual, y = rmsnorm(h); its backward adds the residual stream's gradient to dx).
// Forward launch: one block of 256 threads per row; a block reduction gives sum_j x_j^2, thread 0 stores rstd.
// Fused with the add, the first pass forms h_j = round(x_j + residual_j), stores it and sums its squares, and
// the second pass reads h back (the same thread wrote it): 3 reads + 2 writes per element instead of the
// unfused 4 reads + 2 writes, and one launch less. The result is bit-identical to add then rmsnorm.
// Backward launch: about 4 blocks per SM, each walking rows r = blockIdx.x, blockIdx.x + gridDim.x, ...:
// per row a block reduction of sum_j w_j dy_j x_j gives dx; the weight gradient of the block's rows collects
// in shared memory (cols floats; each thread owns the columns it strides over, so no conflicts) and is added
// to dw with one f32 atomicAdd per column per block.
// f32 arithmetic; y = x * rstd * w rounded once (not Hugging Face's round-to-bf16-then-scale).
// Not done yet: vectorised loads, keeping the row in registers between the passes.

#include "common.cuh"
#include "qlora/cuda/rmsnorm.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

// residual == nullptr: y = rmsnorm(x). Otherwise sum = x + residual (stored) and y = rmsnorm(sum).
template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const T* residual, T* sum, const T* w, T* y, float* rstd,
                                       std::int64_t rows, std::int64_t cols, float eps) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;

    float sum_squares = 0.0f;
    if (residual == nullptr) {
      for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float xj = to_f32(xr[j]);
        sum_squares += xj * xj;
      }
    } else {
      const T* res = residual + r * cols;
      T* sr = sum + r * cols;
      for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const T h = from_f32<T>(to_f32(xr[j]) + to_f32(res[j]));  // rounded as the unfused add stores it
        sr[j] = h;
        const float hj = to_f32(h);
        sum_squares += hj * hj;
      }
      xr = sr;  // the norm's input from here on
    }
    const float s = 1.0f / sqrtf(block_sum(sum_squares) / float(cols) + eps);
    if (threadIdx.x == 0) rstd[r] = s;

    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) yr[j] = from_f32<T>(to_f32(xr[j]) * s * to_f32(w[j]));
  }
}

// dsum == nullptr: dx is the norm's input gradient; otherwise dsum (the residual stream's gradient) is added.
template <class T>
__global__ void rmsnorm_backward_kernel(const T* x, const T* w, const float* rstd, const T* dy, const T* dsum, T* dx,
                                        float* dw, std::int64_t rows, std::int64_t cols) {
  extern __shared__ float dw_block[];  // cols floats when dw != nullptr
  if (dw != nullptr)
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) dw_block[j] = 0.0f;

  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    const T* dsr = dsum != nullptr ? dsum + r * cols : nullptr;
    T* dxr = dx + r * cols;
    const float s = rstd[r];

    float dot = 0.0f;  // sum_j w_j dy_j x_j
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) dot += to_f32(w[j]) * to_f32(dyr[j]) * to_f32(xr[j]);
    const float c = s * s * s * block_sum(dot) / float(cols);

    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float xj = to_f32(xr[j]);
      const float dyj = to_f32(dyr[j]);
      const T dnorm = from_f32<T>(s * to_f32(w[j]) * dyj - xj * c);  // rounded as the unfused backward stores it
      dxr[j] = dsr != nullptr ? from_f32<T>(to_f32(dnorm) + to_f32(dsr[j])) : dnorm;
      if (dw != nullptr) dw_block[j] += dyj * xj * s;
    }
  }

  if (dw != nullptr)
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) atomicAdd(dw + j, dw_block[j]);
}

template <class T>
void launch_forward(const T* x, const T* residual, T* sum, const T* w, T* y, float* rstd, std::int64_t rows,
                    std::int64_t cols, float eps, Stream stream) {
  if (rows <= 0) return;
  rmsnorm_forward_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(dev(x), dev(residual), dev(sum), dev(w), dev(y),
                                                                     rstd, rows, cols, eps);
  check_launch("rmsnorm_forward_kernel");
}

template <class T>
void launch_backward(const T* x, const T* w, const float* rstd, const T* dy, const T* dsum, T* dx, float* dw,
                     std::int64_t rows, std::int64_t cols, Stream stream) {
  if (rows <= 0) return;
  auto* kernel = &rmsnorm_backward_kernel<device_t<T>>;
  const std::size_t shared_bytes = dw != nullptr ? std::size_t(cols) * sizeof(float) : 0;
  allow_dynamic_shared_memory(kernel, shared_bytes, "rmsnorm_backward_kernel");
  const auto grid = unsigned(std::min<std::int64_t>(rows, 4 * std::int64_t(sm_count())));
  kernel<<<grid, kRowThreads, shared_bytes, stream>>>(dev(x), dev(w), rstd, dev(dy), dev(dsum), dev(dx), dw, rows,
                                                      cols);
  check_launch("rmsnorm_backward_kernel");
}

}  // namespace

template <class T>
void rmsnorm_forward(const T* x, const T* w, T* y, float* rstd, std::int64_t rows, std::int64_t cols, float eps,
                     Stream stream) {
  launch_forward(x, static_cast<const T*>(nullptr), static_cast<T*>(nullptr), w, y, rstd, rows, cols, eps, stream);
}

template <class T>
void rmsnorm_backward(const T* x, const T* w, const float* rstd, const T* dy, T* dx, float* dw, std::int64_t rows,
                      std::int64_t cols, Stream stream) {
  launch_backward(x, w, rstd, dy, static_cast<const T*>(nullptr), dx, dw, rows, cols, stream);
}

template <class T>
void add_rmsnorm_forward(const T* x, const T* residual, const T* w, T* sum, T* y, float* rstd, std::int64_t rows,
                         std::int64_t cols, float eps, Stream stream) {
  launch_forward(x, residual, sum, w, y, rstd, rows, cols, eps, stream);
}

template <class T>
void add_rmsnorm_backward(const T* sum, const T* w, const float* rstd, const T* dy, const T* dsum, T* dx, float* dw,
                          std::int64_t rows, std::int64_t cols, Stream stream) {
  launch_backward(sum, w, rstd, dy, dsum, dx, dw, rows, cols, stream);
}

#define QLORA_INSTANTIATE(T)                                                                                   \
  template void rmsnorm_forward<T>(const T*, const T*, T*, float*, std::int64_t, std::int64_t, float, Stream); \
  template void rmsnorm_backward<T>(const T*, const T*, const float*, const T*, T*, float*, std::int64_t,      \
                                    std::int64_t, Stream);                                                     \
  template void add_rmsnorm_forward<T>(const T*, const T*, const T*, T*, T*, float*, std::int64_t,             \
                                       std::int64_t, float, Stream);                                           \
  template void add_rmsnorm_backward<T>(const T*, const T*, const float*, const T*, const T*, T*, float*,      \
                                        std::int64_t, std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
