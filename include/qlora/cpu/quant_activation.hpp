#pragma once
// CPU twin of cuda/quant/activation.cu: symmetric fake quantization of activations to b bits, the "A8" of
// W4A8 (w4a8-aqas-slac-dint.md, "Plugging into the framework": per token, scale = absmax / 127):
//   qmax = 2^(b-1) - 1,  scale = absmax / qmax,  q = clamp(round(x / scale), -qmax, qmax),  y = q * scale
// per token (one scale per row, computed from that row: dynamic) or with one given scale for the whole
// tensor (static, calibrated beforehand). A row whose scale is 0 (all zeros) stays zero.
//
// f32 is computed with one rounding per operation (cpu/quant_fp.hpp) and round-to-nearest-even
// (std::nearbyint; rintf on the device), so the CUDA kernel reproduces it bit for bit; a bf16 input is
// widened to f32 first and the result rounded to bf16 once. f64 computes the same formula in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "qlora/core/half.hpp"
#include "qlora/cpu/parallel.hpp"
#include "qlora/cpu/quant_fp.hpp"

namespace qlora::cpu {

// The largest code of b-bit symmetric activations: 127 for INT8 (the code -128 is not used, so the grid
// is symmetric and the scale is absmax / 127).
constexpr QLORA_HD int activation_qmax(int bits) { return (1 << (bits - 1)) - 1; }

// One value onto the grid of `scale`; a non-positive scale (an all-zero row) gives 0.
template <class C>
QLORA_HD C fake_quantize_value(C x, C scale, C qmax) {
  if (!(scale > C(0))) return C(0);
  if constexpr (std::is_same_v<C, float>) {
    const float q = std::clamp(std::nearbyint(div_rn(x, scale)), -qmax, qmax);
    return mul_rn(q, scale);
  } else {
    const C q = std::clamp(std::nearbyint(x / scale), -qmax, qmax);
    return q * scale;
  }
}

// The per-token scale of a row with largest magnitude `absmax`.
template <class C>
QLORA_HD C activation_scale(C absmax, C qmax) {
  if constexpr (std::is_same_v<C, float>) return div_rn(absmax, qmax);
  else return absmax / qmax;
}

// x, y: (rows, cols), T in {float, double}; y may alias x.
template <class T>
void fake_quantize_per_token(const T* x, T* y, std::int64_t rows, std::int64_t cols, int bits) {
  const T qmax = T(activation_qmax(bits));
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    T absmax = 0;
    for (std::int64_t j = 0; j < cols; ++j) absmax = std::max(absmax, T(std::fabs(xr[j])));
    const T scale = activation_scale(absmax, qmax);
    for (std::int64_t j = 0; j < cols; ++j) yr[j] = fake_quantize_value(xr[j], scale, qmax);
  }
}

// n values with one static scale (per tensor); y may alias x.
template <class T>
void fake_quantize_with_scale(const T* x, T* y, std::int64_t n, T scale, int bits) {
  const T qmax = T(activation_qmax(bits));
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = fake_quantize_value(x[i], scale, qmax);
}

}  // namespace qlora::cpu
