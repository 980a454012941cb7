#pragma once
// CPU twin of cuda/elementwise.cu: arithmetic and the SiLU / SwiGLU activations of the Llama MLP.
// Element i reads only element i of each input, so outputs may alias inputs.

#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

template <class T>
void add(const T* a, const T* b, T* y, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

template <class T>
void mul(const T* a, const T* b, T* y, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = a[i] * b[i];
}

template <class T>
void scale(const T* x, float s, T* y, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = T(s) * x[i];
}

// y += alpha * x (accumulates into y).
template <class T>
void axpy(float alpha, const T* x, T* y, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] += T(alpha) * x[i];
}

template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <class T>
T silu(T x) {
  return x * sigmoid(x);
}

template <class T>
void silu_forward(const T* x, T* y, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = silu(x[i]);
}

// silu'(x) = sig(x) + x sig(x) (1 - sig(x)) = sig(x) (1 + x (1 - sig(x))), from sig' = sig (1 - sig).
template <class T>
T silu_derivative(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

template <class T>
void silu_backward(const T* x, const T* dy, T* dx, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) dx[i] = dy[i] * silu_derivative(x[i]);
}

// SwiGLU (Shazeer 2020, the Llama MLP): y = silu(gate) * up.
template <class T>
void swiglu_forward(const T* gate, const T* up, T* y, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = silu(gate[i]) * up[i];
}

// dgate = dy * up * silu'(gate), dup = dy * silu(gate). Both inputs are read before either output is
// written, so dgate may alias gate and dup may alias up.
template <class T>
void swiglu_backward(const T* gate, const T* up, const T* dy, T* dgate, T* dup, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) {
    const T g = gate[i], u = up[i], d = dy[i];
    dgate[i] = d * u * silu_derivative(g);
    dup[i] = d * silu(g);
  }
}

}  // namespace qlora::cpu
