#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a counter-based
// generator. Value i of a stream is a pure function of (seed, i), so any thread on any device computes
// it directly: the CPU and GPU streams are identical by construction, and a kernel needs no state.
//
// Streams (each a function of seed and a 64-bit index i):
//   philox_uniform(seed, i): lane i%4 of block(counter = i/4, subsequence 0), as (bits >> 8) * 2^-24 in [0, 1).
//   philox_normal(seed, i):  Box-Muller on lanes 0,1 of block(counter = i/2, subsequence 1); even i takes
//                            r cos(theta), odd i takes r sin(theta).
// The normal transform uses only IEEE-exact operations (add, mul, fma, div, sqrt, all round-to-nearest)
// and polynomials of our own, never libm, so the bits agree between host and device compilers.

#include <cstdint>

#include "qlora/core/half.hpp"  // QLORA_HD, float_bits / bits_float

namespace qlora {

struct PhiloxBlock {
  std::uint32_t x[4];
};

QLORA_HD PhiloxBlock philox4x32_10(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
                                   std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;   // round multipliers
  constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt 3)
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = std::uint64_t(kMul0) * c0;
    const std::uint64_t p1 = std::uint64_t(kMul1) * c2;
    const std::uint32_t n0 = std::uint32_t(p1 >> 32) ^ c1 ^ k0;
    const std::uint32_t n2 = std::uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = std::uint32_t(p1);
    c3 = std::uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return {{c0, c1, c2, c3}};
}

QLORA_HD PhiloxBlock philox_block(std::uint64_t seed, std::uint64_t counter, std::uint32_t subsequence) {
  return philox4x32_10(std::uint32_t(counter), std::uint32_t(counter >> 32), subsequence, 0u,
                       std::uint32_t(seed), std::uint32_t(seed >> 32));
}

// [0, 1): 24 random bits, exactly representable.
QLORA_HD float uint_to_unit(std::uint32_t bits) { return float(bits >> 8) * 0x1p-24f; }
// (0, 1]: never 0, for the logarithm of Box-Muller.
QLORA_HD float uint_to_unit_open0(std::uint32_t bits) { return float((bits >> 8) + 1u) * 0x1p-24f; }

namespace detail {
// Round-to-nearest primitives that no compiler may contract or approximate.
QLORA_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
QLORA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;  // volatile: a separate rounding step, never fused into a neighbouring add
  return r;
#endif
}
QLORA_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
QLORA_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return __builtin_sqrtf(a);
#endif
}

// ln(u) for u in (0, 1]: u = m * 2^e with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m-1)/(m+1),
// |s| <= 0.172, series to s^11 (relative error < 1e-8, below float rounding).
QLORA_HD float log_unit(float u) {
  std::uint32_t bits = float_bits(u);
  int e = int((bits >> 23) & 0xffu) - 127;
  bits = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  float m = bits_float(bits);
  if (m > 1.41421356f) {
    m = mul_rn(m, 0.5f);  // exact
    e += 1;
  }
  const float s = div_rn(m - 1.0f, m + 1.0f);  // m-1 is exact (Sterbenz)
  const float z = mul_rn(s, s);
  float p = fma_rn(z, 1.0f / 11, 1.0f / 9);
  p = fma_rn(z, p, 1.0f / 7);
  p = fma_rn(z, p, 1.0f / 5);
  p = fma_rn(z, p, 1.0f / 3);
  p = fma_rn(z, p, 1.0f);
  const float log_m = mul_rn(mul_rn(2.0f, s), p);
  constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723212e-6f;  // ln 2 = hi + lo
  return fma_rn(float(e), kLn2Hi, fma_rn(float(e), kLn2Lo, log_m));
}

// sin and cos of 2*pi*u for u in [0, 1): reduce to r in [-1/2, 1/2] quarter turns (exact, u is a multiple
// of 2^-24), then Taylor polynomials of sin(pi/2 r) and cos(pi/2 r) (errors < 2e-9 and < 1e-10).
QLORA_HD void sincos_turn(float u, float* sin_out, float* cos_out) {
  const float quarters = mul_rn(u, 4.0f);  // exact
  int q = int(quarters);
  float r = quarters - float(q);            // exact, in [0, 1)
  if (r > 0.5f) {
    r -= 1.0f;
    q += 1;
  }
  const float r2 = mul_rn(r, r);
  // sin(pi/2 r) = r (c1 + r2 (c3 + r2 (c5 + r2 (c7 + r2 c9))))
  float sp = fma_rn(r2, 1.6044118478735982e-4f, -4.6817541353186881e-3f);
  sp = fma_rn(r2, sp, 7.9692626246167045e-2f);
  sp = fma_rn(r2, sp, -6.4596409750624625e-1f);
  sp = fma_rn(r2, sp, 1.5707963267948966f);
  const float s = mul_rn(r, sp);
  // cos(pi/2 r) = 1 + r2 (d2 + r2 (d4 + r2 (d6 + r2 (d8 + r2 d10))))
  float cp = fma_rn(r2, -2.5202042373060605e-5f, 9.1926027483942659e-4f);
  cp = fma_rn(r2, cp, -2.0863480763352961e-2f);
  cp = fma_rn(r2, cp, 2.5366950790104802e-1f);
  cp = fma_rn(r2, cp, -1.2337005501361697f);
  const float c = fma_rn(r2, cp, 1.0f);
  switch (q & 3) {  // rotate by q quarter turns
    case 0: *sin_out = s; *cos_out = c; break;
    case 1: *sin_out = c; *cos_out = -s; break;
    case 2: *sin_out = -s; *cos_out = -c; break;
    default: *sin_out = -c; *cos_out = s; break;
  }
}
}  // namespace detail

QLORA_HD float philox_uniform(std::uint64_t seed, std::uint64_t index) {
  const PhiloxBlock b = philox_block(seed, index >> 2, 0u);
  return uint_to_unit(b.x[index & 3]);
}

QLORA_HD float philox_normal(std::uint64_t seed, std::uint64_t index) {
  const PhiloxBlock b = philox_block(seed, index >> 1, 1u);
  const float u1 = uint_to_unit_open0(b.x[0]);
  const float u2 = uint_to_unit(b.x[1]);
  const float radius = detail::sqrt_rn(detail::mul_rn(-2.0f, detail::log_unit(u1)));
  float s, c;
  detail::sincos_turn(u2, &s, &c);
  return detail::mul_rn(radius, (index & 1) ? s : c);
}

}  // namespace qlora
