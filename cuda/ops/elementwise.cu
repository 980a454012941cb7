// Elementwise arithmetic and activations: add, mul, scale, axpy, SiLU and SwiGLU with their backwards.
// Launch: grid-stride loops, 256 threads per block. Each thread reads all inputs of element i before writing
// element i, so outputs may alias inputs (no __restrict__ anywhere). f32 arithmetic, RNE rounding to bf16.
// Not done yet: vectorised (16-byte) loads and stores.

#include "common.cuh"
#include "qlora/cuda/elementwise.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <class T>
__global__ void add_kernel(const T* a, const T* b, T* y, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) y[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <class T>
__global__ void mul_kernel(const T* a, const T* b, T* y, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) y[i] = from_f32<T>(to_f32(a[i]) * to_f32(b[i]));
}

template <class T>
__global__ void scale_kernel(const T* x, float s, T* y, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) y[i] = from_f32<T>(s * to_f32(x[i]));
}

template <class T>
__global__ void axpy_kernel(float alpha, const T* x, T* y, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride())
    y[i] = from_f32<T>(to_f32(y[i]) + alpha * to_f32(x[i]));
}

template <class T>
__global__ void silu_forward_kernel(const T* x, T* y, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const float xi = to_f32(x[i]);
    y[i] = from_f32<T>(xi * sigmoid(xi));
  }
}

// d/dx [x sig(x)] = sig(x) (1 + x (1 - sig(x)))
template <class T>
__global__ void silu_backward_kernel(const T* x, const T* dy, T* dx, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const float xi = to_f32(x[i]);
    const float sig = sigmoid(xi);
    dx[i] = from_f32<T>(to_f32(dy[i]) * sig * (1.0f + xi * (1.0f - sig)));
  }
}

template <class T>
__global__ void swiglu_forward_kernel(const T* gate, const T* up, T* y, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const float g = to_f32(gate[i]);
    y[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
  }
}

template <class T>
__global__ void swiglu_backward_kernel(const T* gate, const T* up, const T* dy, T* dgate, T* dup, std::int64_t n) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const float g = to_f32(gate[i]);
    const float u = to_f32(up[i]);
    const float d = to_f32(dy[i]);
    const float sig = sigmoid(g);
    dgate[i] = from_f32<T>(d * u * sig * (1.0f + g * (1.0f - sig)));
    dup[i] = from_f32<T>(d * g * sig);
  }
}

}  // namespace

template <class T>
void add(const T* a, const T* b, T* y, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  add_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(a), dev(b), dev(y), n);
  check_launch("add_kernel");
}

template <class T>
void mul(const T* a, const T* b, T* y, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  mul_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(a), dev(b), dev(y), n);
  check_launch("mul_kernel");
}

template <class T>
void scale(const T* x, float s, T* y, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  scale_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(x), s, dev(y), n);
  check_launch("scale_kernel");
}

template <class T>
void axpy(float alpha, const T* x, T* y, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  axpy_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(alpha, dev(x), dev(y), n);
  check_launch("axpy_kernel");
}

template <class T>
void silu_forward(const T* x, T* y, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  silu_forward_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(x), dev(y), n);
  check_launch("silu_forward_kernel");
}

template <class T>
void silu_backward(const T* x, const T* dy, T* dx, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  silu_backward_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(x), dev(dy), dev(dx), n);
  check_launch("silu_backward_kernel");
}

template <class T>
void swiglu_forward(const T* gate, const T* up, T* y, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  swiglu_forward_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(gate), dev(up), dev(y), n);
  check_launch("swiglu_forward_kernel");
}

template <class T>
void swiglu_backward(const T* gate, const T* up, const T* dy, T* dgate, T* dup, std::int64_t n, Stream stream) {
  if (n <= 0) return;
  swiglu_backward_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(dev(gate), dev(up), dev(dy),
                                                                                  dev(dgate), dev(dup), n);
  check_launch("swiglu_backward_kernel");
}

#define QLORA_INSTANTIATE(T)                                                                         \
  template void add<T>(const T*, const T*, T*, std::int64_t, Stream);                                \
  template void mul<T>(const T*, const T*, T*, std::int64_t, Stream);                                \
  template void scale<T>(const T*, float, T*, std::int64_t, Stream);                                 \
  template void axpy<T>(float, const T*, T*, std::int64_t, Stream);                                  \
  template void silu_forward<T>(const T*, T*, std::int64_t, Stream);                                 \
  template void silu_backward<T>(const T*, const T*, T*, std::int64_t, Stream);                      \
  template void swiglu_forward<T>(const T*, const T*, T*, std::int64_t, Stream);                     \
  template void swiglu_backward<T>(const T*, const T*, const T*, T*, T*, std::int64_t, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
