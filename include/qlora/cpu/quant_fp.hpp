#pragma once
// f32 operations with one rounding each, never fused: what makes the quantization twins bit-exact between
// the CPU and CUDA. nvcc contracts a*b + c into an FMA by default (--fmad=true), even across statements,
// so device code uses the _rn intrinsics; host code is plain IEEE arithmetic (GCC fuses only when FMA
// instructions are enabled, e.g. -march=native, which the project does not use).

#include "qlora/core/half.hpp"

namespace qlora::cpu {

QLORA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QLORA_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

QLORA_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace qlora::cpu
