#pragma once
// CPU twin of cuda/convert.cu: elementwise casts between float, double, bf16 and f16, and fill.
// Rounding to bf16/f16 goes through core/half.hpp (round to nearest even, NaN stays NaN), the same
// functions the CUDA kernels call, so both backends produce identical bits.

#include <cstdint>
#include <type_traits>

#include "qlora/core/half.hpp"
#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

namespace detail {

template <class T>
inline constexpr bool is_half_v = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

// One element from Src to Dst. Half types pass through float: every bf16 and f16 value is exactly a
// float, so widening is exact. double -> bf16/f16 rounds twice (double -> float -> half), which can
// differ from one direct rounding in the last bit near a tie; double only appears in float64 tests.
template <class Dst, class Src>
inline Dst convert_one(Src x) {
  if constexpr (is_half_v<Src>) {
    return convert_one<Dst>(to_float(x));
  } else if constexpr (std::is_same_v<Dst, bf16>) {
    return to_bf16(static_cast<float>(x));
  } else if constexpr (std::is_same_v<Dst, f16>) {
    return to_f16(static_cast<float>(x));
  } else {
    return static_cast<Dst>(x);
  }
}

}  // namespace detail

// y[i] = Dst(x[i]); Src, Dst in {float, double, bf16, f16}.
template <class Src, class Dst>
void convert(const Src* x, Dst* y, std::int64_t n) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = detail::convert_one<Dst>(x[i]);
}

// y[i] = T(value): value rounded once, then copied.
template <class T>
void fill(T* y, std::int64_t n, float value) {
  const T v = detail::convert_one<T>(value);
#pragma omp parallel for if (qlora::cpu::worth_parallel(n))
  for (std::int64_t i = 0; i < n; ++i) y[i] = v;
}

}  // namespace qlora::cpu
