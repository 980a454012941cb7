#pragma once
// Shared device helpers for the CUDA kernel layer (cuda/**/*.cu only; never included by public headers):
// error checks that throw qlora::Error, the storage-type mapping qlora::bf16 -> __nv_bfloat16, f32 loads and
// stores, warp and block reductions, and launch-shape helpers.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"

namespace qlora::cuda::detail {

// ---- errors --------------------------------------------------------------------------------------------

[[noreturn]] inline void throw_cuda_error(cudaError_t status, const char* expr, const char* file, int line) {
  throw ::qlora::Error(std::string("CUDA error at ") + file + ":" + std::to_string(line) + ": " + expr + ": " +
                       cudaGetErrorString(status));
}

// Checks the kernel launch just issued (bad configuration, missing image for this architecture, ...).
// Asynchronous faults inside the kernel surface at the next synchronising call.
inline void check_launch(const char* kernel) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess)
    throw ::qlora::Error(std::string("CUDA kernel launch failed: ") + kernel + ": " + cudaGetErrorString(status));
}

}  // namespace qlora::cuda::detail

// QLORA_CUDA_CHECK(expr): evaluates a CUDA runtime call and throws qlora::Error naming the file, the line, the
// expression and cudaGetErrorString when it fails.
#define QLORA_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    const cudaError_t qlora_status_ = (expr);                                               \
    if (qlora_status_ != cudaSuccess)                                                       \
      ::qlora::cuda::detail::throw_cuda_error(qlora_status_, #expr, __FILE__, __LINE__);    \
  } while (0)

namespace qlora::cuda::detail {

// ---- storage types ---------------------------------------------------------------------------------------
// Public headers speak qlora::bf16 / qlora::f16 (no CUDA headers there); kernels speak __nv_bfloat16 / __half.
// The layouts are identical, so launchers reinterpret the pointers with dev().

template <class T>
struct device_type {
  using type = T;
};
template <>
struct device_type<qlora::bf16> {
  using type = __nv_bfloat16;
};
template <>
struct device_type<qlora::f16> {
  using type = __half;
};
template <class T>
using device_t = typename device_type<T>::type;

template <class T>
device_t<T>* dev(T* p) {
  return reinterpret_cast<device_t<T>*>(p);
}
template <class T>
const device_t<T>* dev(const T* p) {
  return reinterpret_cast<const device_t<T>*>(p);
}

// ---- f32 arithmetic on any storage type ------------------------------------------------------------------
// to_f32(x) widens a stored value; from_f32<T>(v) rounds an f32 result to the storage type (RNE for bf16/f16).

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
  return __float2half_rn(v);
}

// ---- reductions ------------------------------------------------------------------------------------------

constexpr int kWarpSize = 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide reductions: every thread of the block must call them (they synchronise) and every thread gets
// the result. blockDim.x must be a multiple of 32. The leading __syncthreads makes back-to-back calls safe:
// the 32-float scratch is shared by all calls in a kernel.
template <class WarpReduce>
__device__ __forceinline__ float block_reduce(float v, float identity, WarpReduce warp_reduce) {
  __shared__ float scratch[kWarpSize];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  v = warp_reduce(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < num_warps ? scratch[lane] : identity;
  return warp_reduce(v);
}

struct WarpSum {
  __device__ float operator()(float v) const { return warp_sum(v); }
};
struct WarpMax {
  __device__ float operator()(float v) const { return warp_max(v); }
};

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, 0.0f, WarpSum{}); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, -INFINITY, WarpMax{}); }

// ---- launch shapes ---------------------------------------------------------------------------------------

constexpr int kElementwiseThreads = 256;  // grid-stride loops over n elements
constexpr int kRowThreads = 256;          // one block per row, threads stride over the columns

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Enough blocks to fill any current GPU several times over; the kernels' grid-stride loops cover the rest.
inline unsigned elementwise_grid(std::int64_t n) {
  return unsigned(std::clamp<std::int64_t>(ceil_div(n, kElementwiseThreads), 1, 8192));
}

// One block per row; row loops inside the kernels (r += gridDim.x) cover more rows than a grid can hold.
inline unsigned row_grid(std::int64_t rows) { return unsigned(std::clamp<std::int64_t>(rows, 1, 1 << 30)); }

// Streaming multiprocessors of the current device (a cheap attribute query).
inline int sm_count() {
  int device = 0, count = 0;
  QLORA_CUDA_CHECK(cudaGetDevice(&device));
  QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory: when that plus its static shared memory passes
// the default 48 KiB, the kernel must opt in. Throws qlora::Error naming the kernel when the device cannot
// give that much.
template <class Kernel>
void allow_dynamic_shared_memory(Kernel* kernel, std::size_t bytes, const char* name) {
  constexpr std::size_t kDefaultLimit = 48 * 1024;
  cudaFuncAttributes attributes{};
  QLORA_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const std::size_t total = bytes + attributes.sharedSizeBytes;
  if (total <= kDefaultLimit) return;
  int device = 0, optin = 0;
  QLORA_CUDA_CHECK(cudaGetDevice(&device));
  QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (total > std::size_t(optin))
    throw ::qlora::Error(std::string(name) + ": needs " + std::to_string(total) +
                         " bytes of shared memory per block, the device allows " + std::to_string(optin));
  QLORA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// The index of the first element this thread handles in a grid-stride loop, and the loop's stride.
__device__ __forceinline__ std::int64_t grid_index() {
  return std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ std::int64_t grid_stride() { return std::int64_t(gridDim.x) * blockDim.x; }

}  // namespace qlora::cuda::detail
