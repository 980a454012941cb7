// Conversions between f32, bf16 and f16, and fills.
// Launch: grid-stride loop, 256 threads per block, one element per thread per iteration.
// Rounding uses qlora::to_bf16 / qlora::to_f16 from core/half.hpp (the same code the CPU runs), so results are
// bit-identical to the CPU twin, NaN payloads included. Not done yet: vectorised (16-byte) loads and stores.

#include <type_traits>

#include "common.cuh"
#include "qlora/cuda/convert.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

// Widening to f32 is exact for every source type; narrowing rounds once, to nearest even.
__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ float widen(qlora::bf16 x) { return qlora::to_float(x); }
__device__ __forceinline__ float widen(qlora::f16 x) { return qlora::to_float(x); }

template <class Dst>
__host__ __device__ __forceinline__ Dst narrow(float x) {
  if constexpr (std::is_same_v<Dst, qlora::bf16>) return qlora::to_bf16(x);
  else if constexpr (std::is_same_v<Dst, qlora::f16>) return qlora::to_f16(x);
  else return x;
}

template <class Src, class Dst>
__global__ void convert_kernel(const Src* x, Dst* y, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) y[i] = narrow<Dst>(widen(x[i]));
}

template <class T>
__global__ void fill_kernel(T* y, std::int64_t n, T value) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) y[i] = value;
}

}  // namespace

template <class Src, class Dst>
void convert(const Src* x, Dst* y, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  convert_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(x, y, n);
  check_launch("convert_kernel");
}

template <class T>
void fill(T* y, std::int64_t n, float value, Stream stream) {
  if (n <= 0) return;
  fill_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(y, n, narrow<T>(value));
  check_launch("fill_kernel");
}

#define QLORA_INSTANTIATE_CONVERT(Src, Dst) template void convert<Src, Dst>(const Src*, Dst*, std::int64_t, Stream);
#define QLORA_INSTANTIATE_CONVERT_FROM(Src)     \
  QLORA_INSTANTIATE_CONVERT(Src, float)         \
  QLORA_INSTANTIATE_CONVERT(Src, qlora::bf16)   \
  QLORA_INSTANTIATE_CONVERT(Src, qlora::f16)
QLORA_INSTANTIATE_CONVERT_FROM(float)
QLORA_INSTANTIATE_CONVERT_FROM(qlora::bf16)
QLORA_INSTANTIATE_CONVERT_FROM(qlora::f16)

template void fill<float>(float*, std::int64_t, float, Stream);
template void fill<qlora::bf16>(qlora::bf16*, std::int64_t, float, Stream);
template void fill<qlora::f16>(qlora::f16*, std::int64_t, float, Stream);

}  // namespace qlora::cuda
