#pragma once
// The bridge from a QuantizedTensor on a CUDA device to the kernel layer's cuda::PackedWeight (device
// pointers of its members; include/qlora/cuda/quant.hpp). Only in builds linked with qlora_cuda.

#if defined(QLORA_WITH_CUDA)

#include <cstdint>

#include "qlora/cuda/quant.hpp"
#include "qlora/quant/format.hpp"

namespace qlora::quant {

// q must have passed q.check() and live on a CUDA device.
inline cuda::PackedWeight packed_weight(const QuantizedTensor& q) {
  cuda::PackedWeight p;
  switch (q.config.scheme) {
    case Scheme::nf4: p.scheme = cuda::PackedScheme::nf4; break;
    case Scheme::int_asym: p.scheme = cuda::PackedScheme::int_asym; break;
    case Scheme::int_sym: p.scheme = cuda::PackedScheme::int_sym; break;
    case Scheme::dint: p.scheme = cuda::PackedScheme::dint; break;
  }
  p.bits = q.config.bits;
  p.rows = q.rows;
  p.cols = q.cols;
  p.group = q.group_size();
  p.codes = q.codes.data<std::uint8_t>();
  if (q.config.scheme == Scheme::nf4) {
    if (q.config.double_quant) {
      p.absmax_codes = q.absmax_codes.data<std::uint8_t>();
      p.absmax_scales = q.absmax_scales.data<float>();
      p.absmax_mean = q.absmax_mean;
    } else {
      p.absmax = q.scales.data<float>();
    }
    return p;
  }
  p.scales = q.scales.data<f16>();
  if (q.zeros.defined()) {
    if (q.zeros.dtype() == DType::f32) p.zeros_f32 = q.zeros.data<float>();
    else p.zeros_u8 = q.zeros.data<std::uint8_t>();
  }
  return p;
}

}  // namespace qlora::quant

#endif  // QLORA_WITH_CUDA
