// Fake quantization of activations, per token or with one static scale (CPU twin and formula:
// qlora/cpu/quant_activation.hpp, whose QLORA_HD helpers both sides call).
// Per token: one block of 256 threads per row (a grid-stride loop over rows when there are more than a
// grid holds); a block reduction gives the row's absmax, then every thread rewrites the columns it strides
// over. Static scale: a grid-stride elementwise loop.
// Not done yet: vectorised 16-byte loads, keeping the row in registers between the two passes, and fusing
// the quantization into the GEMM's operand load (an INT8 W4A8 kernel would consume the codes directly).

#include "common.cuh"
#include "qlora/cpu/quant_activation.hpp"
#include "qlora/cuda/quant_activation.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

template <class T>
__global__ void fake_quantize_per_token_kernel(const T* x, T* y, std::int64_t rows, std::int64_t cols, float qmax) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    float absmax = 0.f;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) absmax = fmaxf(absmax, fabsf(to_f32(xr[j])));
    const float scale = cpu::activation_scale(block_max(absmax), qmax);
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x)
      yr[j] = from_f32<T>(cpu::fake_quantize_value(to_f32(xr[j]), scale, qmax));  // y may alias x: same j
  }
}

template <class T>
__global__ void fake_quantize_with_scale_kernel(const T* x, T* y, std::int64_t n, float scale, float qmax) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride())
    y[i] = from_f32<T>(cpu::fake_quantize_value(to_f32(x[i]), scale, qmax));
}

}  // namespace

template <class T>
void fake_quantize_per_token(const T* x, T* y, std::int64_t rows, std::int64_t cols, int bits, Stream stream) {
  if (rows <= 0 || cols <= 0) return;
  fake_quantize_per_token_kernel<<<row_grid(rows), kRowThreads, 0, stream>>>(dev(x), dev(y), rows, cols,
                                                                             float(cpu::activation_qmax(bits)));
  check_launch("fake_quantize_per_token_kernel");
}

template <class T>
void fake_quantize_with_scale(const T* x, T* y, std::int64_t n, float scale, int bits, Stream stream) {
  if (n <= 0) return;
  fake_quantize_with_scale_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(
      dev(x), dev(y), n, scale, float(cpu::activation_qmax(bits)));
  check_launch("fake_quantize_with_scale_kernel");
}

#define QLORA_INSTANTIATE(T)                                                                                   \
  template void fake_quantize_per_token<T>(const T*, T*, std::int64_t, std::int64_t, int, Stream);            \
  template void fake_quantize_with_scale<T>(const T*, T*, std::int64_t, float, int, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
