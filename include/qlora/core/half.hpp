#pragma once
// bf16 and f16 storage types with bit-exact, round-to-nearest-even conversion from f32.
// Same bit layout as CUDA's __nv_bfloat16 / __half, so device code may reinterpret them;
// the conversions are host+device so CPU and GPU round identically.

#include <bit>
#include <cstdint>

#if defined(__CUDACC__)
#define QLORA_HD __host__ __device__ __forceinline__
#else
#define QLORA_HD inline
#endif

namespace qlora {

struct bf16 {
  std::uint16_t bits = 0;
};
struct f16 {
  std::uint16_t bits = 0;
};
static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2);

QLORA_HD std::uint32_t float_bits(float x) { return std::bit_cast<std::uint32_t>(x); }
QLORA_HD float bits_float(std::uint32_t u) { return std::bit_cast<float>(u); }

QLORA_HD float to_float(bf16 x) { return bits_float(std::uint32_t(x.bits) << 16); }

QLORA_HD bf16 to_bf16(float x) {
  std::uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{std::uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);                                                      // RNE
  return bf16{std::uint16_t(u >> 16)};
}

QLORA_HD float to_float(f16 h) {
  const std::uint32_t sign = std::uint32_t(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  std::uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_float(sign);
  // Subnormal half: normalise the mantissa into an f32 exponent.
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  return bits_float(sign | (std::uint32_t(112 - e) << 23) | ((mant & 0x3ffu) << 13));
}

QLORA_HD f16 to_f16(float x) {
  const std::uint32_t u = float_bits(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16{std::uint16_t(sign | 0x7e00u)};      // nan
  if (abs >= 0x477ff000u) return f16{std::uint16_t(sign | 0x7c00u)};     // overflow rounds to inf
  if (abs >= 0x38800000u) {                                               // normal half
    const std::uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u) - (112u << 23);
    return f16{std::uint16_t(sign | (r >> 13))};
  }
  if (abs < 0x33000001u) return f16{std::uint16_t(sign)};                 // rounds to zero
  // Subnormal half: shift the full mantissa and round to nearest even.
  const std::uint32_t exp = abs >> 23;
  const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
  const std::uint32_t shift = 126u - exp;  // 14..24
  const std::uint32_t half_ulp = 1u << (shift - 1);
  std::uint32_t q = mant >> shift;
  const std::uint32_t rem = mant & ((1u << shift) - 1u);
  if (rem > half_ulp || (rem == half_ulp && (q & 1u))) ++q;
  return f16{std::uint16_t(sign | q)};
}

}  // namespace qlora
