#pragma once
// QuantLinear<Base, Adapter>: the core operator (docs/design.md, "The core operator").
//   y = base(x) + adapter(x) = deq(Wq) x + s E_k( B( A( drop(P_p x) ) ) )
// Base (DenseBase, NF4Base, IntGroupBase, DIntBase) and Adapter (NoAdapter, LowRank, FullPooled) are
// policies; Linear is the small virtual interface through which a model holds any instantiation, and
// make_linear (linear_factory.hpp) maps a runtime configuration onto one.
// forward saves what backward needs (the adapter's u and v); backward returns dx through the dequantized
// base plus the adapter path and accumulates only the adapter's gradients: the base never has one.

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/nn/adapter_config.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/nn/dense_base.hpp"
#include "qlora/nn/full_pooled.hpp"
#include "qlora/nn/low_rank.hpp"
#include "qlora/nn/merge.hpp"
#include "qlora/nn/no_adapter.hpp"
#include "qlora/nn/quantized_base.hpp"
#include "qlora/quant/activation_quant.hpp"

namespace qlora::nn {

class Linear {
 public:
  virtual ~Linear() = default;
  const std::string& name() const { return name_; }

  // x (..., d_in) -> (..., d_out).
  virtual Tensor forward(Context& ctx, const Tensor& x) = 0;
  // dy (..., d_out) -> dx (..., d_in); adds the adapter's parameter gradients into their grad tensors.
  virtual Tensor backward(Context& ctx, const Tensor& dy) = 0;

  virtual std::vector<autograd::Param*> params() = 0;  // trainable (adapter) parameters only
  // Drops what the last training forward saved for its backward (activation checkpointing: the block's
  // forward runs again before its backward).
  virtual void release_saved() = 0;
  virtual std::int64_t in_features() const = 0;
  virtual std::int64_t out_features() const = 0;
  virtual AdapterShape adapter_shape() const = 0;
  virtual std::string describe() const = 0;            // "nf4 + qblora(p=2, k=2, r=128)"
  virtual std::size_t base_bytes() const = 0;          // storage of the frozen base

  // W4A8 (docs/nn.md): the base path sees its input fake-quantized per token to `bits` (4..8; 0 = off),
  // the adapter path the unquantized input; the backward is the straight-through estimator.
  virtual void set_activation_bits(int bits) = 0;
  virtual int activation_bits() const = 0;

  // W + dW as a dense CPU matrix in dtype: any adapter merges into a dense copy.
  virtual Tensor merged_weight(DType dtype = DType::f32) const = 0;
  // Folds the adapter into the base in place, exactly (dense: W += dW; asymmetric INT with p a multiple of
  // g: into f32 zero points, codes and scales unchanged), then zeroes the adapter. Anything inexact is
  // refused with a qlora::Error saying why.
  virtual void merge() = 0;
  // The adapter as an ordinary LoRA (rank r', A_full = A P_p, B_full = E_k B); none for other adapters.
  virtual std::optional<PlainLora> plain_lora() const = 0;
  // The quantized base as stored (saving a quantized model); nullptr for a dense base.
  virtual const quant::QuantizedTensor* quantized_weight() const { return nullptr; }
  // The low-rank adapter, whose rank RA-LoRA changes (nn/rank_adaptive.hpp); nullptr for other adapters.
  virtual LowRank* low_rank_adapter() { return nullptr; }

 protected:
  explicit Linear(std::string name) : name_(std::move(name)) {}

 private:
  std::string name_;
};

template <class Base, class Adapter>
class QuantLinear final : public Linear {
 public:
  // stream_id gives the layer its own dropout stream; init_seed draws A. Parameters are param_dtype (f32
  // masters; f64 for gradient checks) on the base's device.
  QuantLinear(std::string name, Base base, const AdapterShape& shape, std::uint64_t init_seed,
              std::uint64_t stream_id, DType param_dtype = DType::f32)
      : Linear(std::move(name)),
        base_(std::move(base)),
        adapter_(shape, base_.out_features(), base_.in_features(), this->name(), init_seed, param_dtype,
                 base_device()),
        stream_id_(stream_id) {}

  Base& base() { return base_; }
  const Base& base() const { return base_; }
  Adapter& adapter() { return adapter_; }

  Tensor forward(Context& ctx, const Tensor& x) override {
    const Tensor x2 = flatten(x, in_features(), "input");
    if (ctx.observe_linear_input) ctx.observe_linear_input(name(), x2);
    Tensor y = base_.forward(ctx, activation_bits_ > 0 ? quant::fake_quantize_per_token(x2, activation_bits_) : x2);
    if (y.dtype() != x2.dtype()) y = y.to(x2.dtype());  // the f32 GEMV path under f32 inputs is a no-op
    adapter_.forward(ctx, x2, y, mix_seed(ctx.seed, ctx.step, stream_id_));
    return y.reshape(x.shape().with_dim(-1, out_features()));
  }

  Tensor backward(Context& ctx, const Tensor& dy) override {
    const Tensor dy2 = flatten(dy, out_features(), "output gradient");
    Tensor dx = base_.backward_input(ctx, dy2);
    adapter_.backward(ctx, dy2, &dx);
    return dx.reshape(dy.shape().with_dim(-1, in_features()));
  }

  std::vector<autograd::Param*> params() override { return adapter_.params(); }
  void release_saved() override { adapter_.release_saved(); }
  std::int64_t in_features() const override { return base_.in_features(); }
  std::int64_t out_features() const override { return base_.out_features(); }
  AdapterShape adapter_shape() const override { return adapter_.shape(); }
  std::size_t base_bytes() const override { return base_.storage_bytes(); }

  void set_activation_bits(int bits) override {
    if (bits != 0) quant::check_activation_bits(bits, name());
    activation_bits_ = bits;
  }
  int activation_bits() const override { return activation_bits_; }

  std::string describe() const override {
    const AdapterShape a = adapter_.shape();
    std::string s = base_.describe();
    if (activation_bits_ > 0) s += " a" + std::to_string(activation_bits_);  // "int4-g128 a8": W4A8
    if (a.kind == AdapterKind::none) return s;
    s += " + " + std::string(adapter_kind_name(a.kind)) + "(p=" + std::to_string(a.pool) +
         ", k=" + std::to_string(a.repeat);
    if (!a.full_matrix()) s += ", r=" + std::to_string(a.rank);
    return s + ", s=" + std::to_string(a.scale) + ")";
  }

  Tensor merged_weight(DType dtype = DType::f32) const override {
    Tensor w = base_.dense_weight(dtype);
    if constexpr (!std::is_same_v<Adapter, NoAdapter>) ops::axpy_(w, 1.f, adapter_.delta_weight().to(dtype));
    return w;
  }

  void merge() override {
    if constexpr (std::is_same_v<Adapter, NoAdapter>) {
      return;
    } else if constexpr (std::is_same_v<Base, DenseBase>) {
      const Tensor& w = base_.weight();
      const DType work = w.dtype() == DType::f64 ? DType::f64 : DType::f32;  // the CPU computes in f32/f64
      base_ = DenseBase(merged_weight(work).to(w.dtype()).to(w.device()));
      adapter_.reset_to_zero();
    } else {
      merge_into_zero_points(base_.quantized(), adapter_.pooled_delta(), adapter_.shape());
      adapter_.reset_to_zero();
    }
  }

  std::optional<PlainLora> plain_lora() const override {
    if constexpr (std::is_same_v<Adapter, LowRank>) return adapter_.to_plain_lora();
    else return std::nullopt;
  }

  const quant::QuantizedTensor* quantized_weight() const override {
    if constexpr (std::is_same_v<Base, DenseBase>) return nullptr;
    else return &base_.quantized();
  }

  LowRank* low_rank_adapter() override {
    if constexpr (std::is_same_v<Adapter, LowRank>) return &adapter_;
    else return nullptr;
  }

 private:
  Device base_device() const {
    if constexpr (std::is_same_v<Base, DenseBase>) return base_.weight().device();
    else return base_.quantized().device();
  }

  Tensor flatten(const Tensor& t, std::int64_t features, const char* what) const {
    if (!t.defined() || t.rank() < 1 || t.shape().last() != features)
      throw Error(name() + ": " + what + " has shape " + (t.defined() ? t.shape().str() : std::string("(undefined)")) +
                  ", expected (..., " + std::to_string(features) + ")");
    return t.reshape(Shape{t.shape().rows(), features});
  }

  Base base_;
  Adapter adapter_;
  std::uint64_t stream_id_;
  int activation_bits_ = 0;
};

}  // namespace qlora::nn
