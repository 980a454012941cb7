#pragma once
// Fake quantization of activations (W4A8, w4a8-aqas-slac-dint.md "Plugging into the framework"): the
// values an integer kernel would see, kept in floating point, for accuracy studies and QLoRA-style
// training on a W4A8 base. Symmetric b-bit (INT8 by default, 4 <= b <= 8):
//   per token (dynamic):  each row of x (..., d): scale = absmax(row) / (2^(b-1) - 1)
//   per tensor (static):  one calibrated scale, e.g. per_tensor_scale(max absmax over calibration, b)
//   q = clamp(round(x / scale), -qmax, qmax),  value = q * scale;  an all-zero row stays zero.
// Kernels: cpu/quant_activation.hpp (the definition) and cuda/quant/activation.cu (bit-exact in f32).
// x: f32/f64 on the CPU, f32/bf16 on CUDA; the result has x's shape, dtype and device.
//
// Backward (training): the straight-through estimator, dx = dy. round() has zero derivative almost
// everywhere, so the exact gradient would stop all learning through the quantizer; STE treats Qa as the
// identity in the backward. QuantLinear's base path gets it for free: its backward is dy deq(W) whether
// or not the forward quantized x (docs/nn.md, "W4A8").

#include <string>
#include <string_view>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/cpu/quant_activation.hpp"
#include "qlora/cuda/quant_activation.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::quant {

inline constexpr int kMinActivationBits = 4, kMaxActivationBits = 8;

inline void check_activation_bits(int bits, std::string_view who) {
  QLORA_CHECK(bits >= kMinActivationBits && bits <= kMaxActivationBits,
              std::string(who) + ": activation bits must be 4..8, got " + std::to_string(bits));
}

// The static scale of a tensor whose calibration inputs reached magnitude absmax.
inline float per_tensor_scale(double absmax, int bits) {
  check_activation_bits(bits, "per_tensor_scale");
  QLORA_CHECK(absmax >= 0.0 && absmax < 3.0e38, "per_tensor_scale: absmax must be finite and >= 0, got " +
                                                     std::to_string(absmax));
  return cpu::activation_scale(float(absmax), float(cpu::activation_qmax(bits)));
}

inline Tensor fake_quantize_per_token(const Tensor& x, int bits = 8) {
  constexpr std::string_view op = "fake_quantize_per_token";
  check_activation_bits(bits, op);
  ops::detail::check_defined(op, x, "x");
  QLORA_CHECK(x.rank() >= 1, std::string(op) + ": x must have at least one axis (..., d), got " + x.str());
  const std::int64_t rows = x.shape().rows(), cols = x.shape().last();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  ops::detail::dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (ops::detail::is_cpu_v<decltype(backend)>)
      cpu::fake_quantize_per_token(x.data<T>(), y.data<T>(), rows, cols, bits);
    else
      cuda::fake_quantize_per_token(x.data<T>(), y.data<T>(), rows, cols, bits, cuda::current_stream());
  });
  return y;
}

// scale > 0 (per_tensor_scale); values beyond qmax * scale saturate.
inline Tensor fake_quantize_per_tensor(const Tensor& x, float scale, int bits = 8) {
  constexpr std::string_view op = "fake_quantize_per_tensor";
  check_activation_bits(bits, op);
  ops::detail::check_defined(op, x, "x");
  QLORA_CHECK(scale > 0.f && scale < 3.0e38f,
              std::string(op) + ": the scale must be finite and positive, got " + std::to_string(scale));
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  ops::detail::dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (ops::detail::is_cpu_v<decltype(backend)>)
      cpu::fake_quantize_with_scale(x.data<T>(), y.data<T>(), x.numel(), T(scale), bits);
    else
      cuda::fake_quantize_with_scale(x.data<T>(), y.data<T>(), x.numel(), scale, bits, cuda::current_stream());
  });
  return y;
}

}  // namespace qlora::quant
