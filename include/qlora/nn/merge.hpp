#pragma once
// Exact merging of an adapter into the zero points of a group-quantized base (QA-LoRA, methods/baselines.md
// section 5; QA-BLoRA, methods/qblora.md "Mergeability condition"). When dW is constant on every
// quantization group (o, j) with value c:
//   scale (code - zero) + c = scale (code - (zero - c / scale))   =>   zero' = zero - c / scale
// Codes and scales stay untouched; the new zeros are fractional, so they are stored as f32.
// This holds when the adapter's input pooling p is a multiple of the group g (every group lies inside one
// k x p tile of dW), for an asymmetric INT base only: NF4 and symmetric INT have no zero point, and dINT's
// two half-step levels (+-s/2) do not move with the zero point.

#include <string>
#include <type_traits>

#include "qlora/nn/adapter_config.hpp"
#include "qlora/ops/pool_repeat.hpp"
#include "qlora/quant/format.hpp"

namespace qlora::nn {

// Why an exact zero-point merge is impossible, or an empty string when it is possible.
inline std::string zero_point_merge_refusal(const quant::QuantizedTensor& q, const AdapterShape& a) {
  const std::string fmt = q.config.name();
  switch (q.config.scheme) {
    case quant::Scheme::nf4:
      return "an NF4 base (" + fmt + ") has no zero points, so no adapter merges into it exactly; merge into a "
             "dense copy instead";
    case quant::Scheme::int_sym:
      return "a symmetric INT base (" + fmt + ") has no stored zero points; quantize with an asymmetric grid";
    case quant::Scheme::dint:
      return "a dINT base (" + fmt + ") cannot absorb the adapter exactly: its half-step levels +-s/2 do not move "
             "with the zero point";
    case quant::Scheme::int_asym: break;
  }
  if (a.kind == AdapterKind::none) return "";
  const std::int64_t g = q.group_size();
  if (a.pool % g != 0)
    return "the adapter pools p = " + std::to_string(a.pool) + " input features, not a multiple of the group g = " +
           std::to_string(g) + " of " + fmt + ", so its update is not constant on every quantization group";
  return "";
}

// zero' = zero - c(o, j) / scale[o, j] for every group (o, j), where c is the adapter's update on that group:
// dW[o, i] = pooled_delta[o / k, i / p] (see expand_delta), read at the group's first column.
inline void merge_into_zero_points(quant::QuantizedTensor& q, const Tensor& pooled_delta, const AdapterShape& a) {
  const std::string refusal = zero_point_merge_refusal(q, a);
  if (!refusal.empty()) throw Error("merge: " + refusal);
  if (pooled_delta.shape() != Shape{q.rows / a.repeat, q.cols / a.pool})
    throw Error("merge: the adapter update has shape " + pooled_delta.shape().str() + ", expected " +
                Shape{q.rows / a.repeat, q.cols / a.pool}.str());
  const Device device = q.device();
  quant::QuantizedTensor host = q.to(Device::cpu());
  const Tensor delta = pooled_delta.to(Device::cpu()).to(DType::f64);
  const std::int64_t g = host.group_size(), groups = host.groups_per_row(), pooled_cols = delta.dim(1);
  Tensor zeros = Tensor::empty(Shape{host.rows, groups}, DType::f32);
  const double* d = delta.data<double>();
  const f16* scales = host.scales.data<f16>();
  float* z = zeros.data<float>();
  for (std::int64_t o = 0; o < host.rows; ++o) {
    for (std::int64_t j = 0; j < groups; ++j) {
      const double c = d[(o / a.repeat) * pooled_cols + (j * g) / a.pool];
      const float old_zero = host.config.float_zeros ? host.zeros.data<float>()[o * groups + j]
                                                     : float(host.zeros.data<std::uint8_t>()[o * groups + j]);
      z[o * groups + j] = float(double(old_zero) - c / double(to_float(scales[o * groups + j])));
    }
  }
  host.zeros = zeros;
  host.config.float_zeros = true;
  host.check("merged weight");
  q = host.to(device);
}

// alpha * t for a CPU f32/f64 tensor, with alpha applied in t's own precision (ops::scale takes an f32 alpha).
inline Tensor scaled_copy(const Tensor& t, double alpha) {
  Tensor out = t.clone();
  visit_floating(out.dtype(), [&](auto v) {
    using T = decltype(v);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      T* p = out.data<T>();
      for (std::int64_t i = 0; i < out.numel(); ++i) p[i] = T(double(p[i]) * alpha);
    } else {
      throw Error("scaled_copy: expected an f32 or f64 tensor, got " + std::string(dtype_name(out.dtype())));
    }
  });
  return out;
}

// dW (rows x cols) from the pooled update: dW[o, i] = pooled_delta[o / k, i / p]. On the CPU.
inline Tensor expand_delta(const Tensor& pooled_delta, std::int64_t repeat, std::int64_t pool) {
  const Tensor small = pooled_delta.to(Device::cpu());
  const std::int64_t rows = small.dim(0) * repeat, cols = small.dim(1) * pool;
  Tensor wide = Tensor::zeros(Shape{small.dim(0), cols}, small.dtype());
  ops::repeat_add_(wide, small, pool, 1.f);
  Tensor out = Tensor::empty(Shape{rows, cols}, small.dtype());
  for (std::int64_t o = 0; o < rows; ++o) out.select(o).copy_from(wide.select(o / repeat));
  return out;
}

}  // namespace qlora::nn
