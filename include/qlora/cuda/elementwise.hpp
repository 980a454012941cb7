#pragma once
// CUDA elementwise kernels (kernel layer; CPU twin: qlora/cpu/elementwise.hpp).
// T in {float, qlora::bf16}; arithmetic in f32. Outputs may alias inputs (element i reads only element i).
// All pointers are device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

template <class T>
void add(const T* a, const T* b, T* y, std::int64_t n, Stream stream);  // y = a + b
template <class T>
void mul(const T* a, const T* b, T* y, std::int64_t n, Stream stream);  // y = a * b
template <class T>
void scale(const T* x, float s, T* y, std::int64_t n, Stream stream);  // y = s * x
template <class T>
void axpy(float alpha, const T* x, T* y, std::int64_t n, Stream stream);  // y += alpha * x

// y = x * sigmoid(x);   dx = dy * sig(x) * (1 + x * (1 - sig(x)))
template <class T>
void silu_forward(const T* x, T* y, std::int64_t n, Stream stream);
template <class T>
void silu_backward(const T* x, const T* dy, T* dx, std::int64_t n, Stream stream);

// y = silu(gate) * up;   dgate = dy * up * silu'(gate),  dup = dy * silu(gate)
template <class T>
void swiglu_forward(const T* gate, const T* up, T* y, std::int64_t n, Stream stream);
template <class T>
void swiglu_backward(const T* gate, const T* up, const T* dy, T* dgate, T* dup, std::int64_t n, Stream stream);

}  // namespace qlora::cuda
