#pragma once
// QuantizedBase<Schemes...>: the Base policy of a layer whose frozen weight is stored low-bit
// (include/qlora/quant/). Training shapes dequantize the weight into the context's workspace and multiply
// with cuBLASLt / Eigen (the dequantized copy lives only for the one product); small inference batches use
// the fused GEMV that reads the packed codes directly. Aliases: NF4Base, IntGroupBase, DIntBase.

#include <algorithm>
#include <string>

#include "qlora/nn/context.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/gemv.hpp"

namespace qlora::nn {

template <quant::Scheme... Allowed>
class QuantizedBase {
 public:
  // The largest batch for which inference uses the fused GEMV instead of dequantize-then-GEMM.
  static constexpr std::int64_t kMaxGemvBatch = 16;

  explicit QuantizedBase(quant::QuantizedTensor weight) : q_(std::move(weight)) {
    if (!((q_.config.scheme == Allowed) || ...))
      throw Error("QuantizedBase: format " + q_.config.name() + " does not match this base type");
    q_.check("QuantizedBase weight");
  }

  std::int64_t out_features() const { return q_.rows; }
  std::int64_t in_features() const { return q_.cols; }
  std::int64_t quant_group() const { return q_.group_size(); }
  std::string describe() const { return q_.config.name(); }
  std::size_t storage_bytes() const { return q_.storage_bytes(); }
  const quant::QuantizedTensor& quantized() const { return q_; }
  quant::QuantizedTensor& quantized() { return q_; }

  Tensor forward(Context& ctx, const Tensor& x) const {
    if (!ctx.training && x.dim(0) <= kMaxGemvBatch && x.dtype() == DType::f32) return quant::gemv(q_, x);
    return ops::matmul(x, dequantized(ctx, x.dtype()), false, true);
  }

  Tensor backward_input(Context& ctx, const Tensor& dy) const { return ops::matmul(dy, dequantized(ctx, dy.dtype())); }

  Tensor dense_weight(DType dtype) const { return quant::dequantize(q_.to(Device::cpu()), dtype); }

 private:
  // The whole weight, dequantized into the shared workspace (valid until the next workspace use).
  Tensor dequantized(Context& ctx, DType dtype) const {
    Tensor w = ctx.workspace.get(Shape{q_.rows, q_.cols}, dtype, q_.device());
    quant::dequantize_rows_into(q_, 0, q_.rows, w);
    return w;
  }

  quant::QuantizedTensor q_;
};

using NF4Base = QuantizedBase<quant::Scheme::nf4>;
using IntGroupBase = QuantizedBase<quant::Scheme::int_asym, quant::Scheme::int_sym>;
using DIntBase = QuantizedBase<quant::Scheme::dint>;

}  // namespace qlora::nn
