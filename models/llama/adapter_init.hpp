#pragma once
// Adapter initialisation of a whole Llama model (docs/adapter-init.md): for every block linear that has an
// adapter, LoftQ (nn/init/loftq.hpp: a new base Q and the adapter, together) or CLoQ (nn/init/cloq.hpp: the
// adapter for the model's existing base, from the layer's calibration Gram). `default` leaves the model as
// build_model made it (PEFT's init: A random, B = 0).
//
//   init_adapters(model, fp_weights, AdapterInitMethod::loftq, options);
//   init_adapters(model, fp_weights, AdapterInitMethod::cloq, options, gram_lookup(grams));
//
// fp_weights serves the full-precision weights by HF name (the TensorSource build_model read them from, or the
// io::ModelFiles overload). Grams come from a calibration pass
// (quant::GramAccumulator per layer name, filled through nn::Context::observe_linear_input).

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/nn/init/cloq.hpp"
#include "qlora/nn/init/loftq.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/quant/gram.hpp"
#include "models/llama/load.hpp"
#include "models/llama/model.hpp"

namespace qlora::models::llama {

enum class AdapterInitMethod { standard, loftq, cloq };  // standard: --init default

inline std::string_view adapter_init_method_name(AdapterInitMethod m) {
  switch (m) {
    case AdapterInitMethod::standard: return "default";
    case AdapterInitMethod::loftq: return "loftq";
    case AdapterInitMethod::cloq: return "cloq";
  }
  return "?";
}

inline AdapterInitMethod parse_adapter_init_method(std::string_view name) {
  for (AdapterInitMethod m : {AdapterInitMethod::standard, AdapterInitMethod::loftq, AdapterInitMethod::cloq})
    if (adapter_init_method_name(m) == name) return m;
  throw Error("unknown adapter init '" + std::string(name) + "' (expected default, loftq or cloq)");
}

struct AdapterInitOptions {
  nn::init::LoftqOptions loftq;
  nn::init::CloqOptions cloq;
  // LoftQ's base format; nullopt: the model's (LoadOptions::quant).
  std::optional<quant::QuantConfig> loftq_format;
};

// The calibration Gram of a layer, by its name ("model.layers.0.self_attn.q_proj").
using GramLookup = std::function<const quant::GramAccumulator&(const std::string& layer)>;

// A lookup into a map of accumulators that names a missing layer.
inline GramLookup gram_lookup(const std::map<std::string, quant::GramAccumulator>& grams) {
  return [&grams](const std::string& layer) -> const quant::GramAccumulator& {
    const auto it = grams.find(layer);
    QLORA_CHECK(it != grams.end(), "cloq: no calibration Gram for layer " + layer);
    return it->second;
  };
}

// What one layer's init achieved, in the method's own objective (LoftQ: ||W - deq(Q) - dW||_F^2 against
// ||W - deq(Q0)||_F^2 with Q0 the model's base before; CLoQ: tr(E H E^T) with E = W - deq(Q) - dW against E
// with dW = 0).
struct LayerInitResult {
  std::string layer;
  double error_before = 0, error_after = 0;
};

namespace detail {

// The block-linear index build_model gives a layer: its dropout stream, and with the seed its initial draw.
inline std::uint64_t linear_stream(std::int64_t block, int proj) {
  return std::uint64_t(block) * DecoderBlock::kProjCount + std::uint64_t(proj);
}

inline bool has_dense_base(const nn::Linear& layer) {
  using nn::DenseBase;
  return dynamic_cast<const nn::QuantLinear<DenseBase, nn::LowRank>*>(&layer) != nullptr ||
         dynamic_cast<const nn::QuantLinear<DenseBase, nn::FullPooled>*>(&layer) != nullptr ||
         dynamic_cast<const nn::QuantLinear<DenseBase, nn::NoAdapter>*>(&layer) != nullptr;
}

// deq(Q) of a layer as an f64 matrix: its merged weight while the adapter's update is held at zero (B or M
// set to 0, then restored), so nothing but the base contributes.
inline nn::init::MatrixXd dequantized_base(nn::Linear& layer) {
  autograd::Param& last = *layer.params().back();  // LowRank: B (params()[1]); FullPooled: M (params()[0])
  const Tensor saved = last.value.clone();
  last.value.zero_();
  const Tensor merged = layer.merged_weight(DType::f64);
  last.value.copy_from(saved);
  return nn::init::to_matrix(merged, layer.name() + ": quantized base");
}

inline double frobenius2(const nn::init::MatrixXd& e) { return e.squaredNorm(); }
inline double weighted2(const nn::init::MatrixXd& e, const nn::init::MatrixXd& h) { return (e * h).cwiseProduct(e).sum(); }

}  // namespace detail

// Initialises the adapters of every block linear that has one. Refuses (qlora::Error, naming the layer) a
// dense base (there is no quantization error to start from), CLoQ without Grams or with a Gram of the wrong
// size, LoftQ without a base format, and a full-precision weight of the wrong shape.
inline std::vector<LayerInitResult> init_adapters(Model& model, const TensorSource& fp_weights,
                                                  AdapterInitMethod method, const AdapterInitOptions& options = {},
                                                  const GramLookup& grams = {}) {
  std::vector<LayerInitResult> results;
  if (method == AdapterInitMethod::standard) return results;
  const std::string how(adapter_init_method_name(method));
  const LoadOptions& load = model.options();
  const std::optional<quant::QuantConfig> format = options.loftq_format ? options.loftq_format : load.quant;
  QLORA_CHECK(method != AdapterInitMethod::loftq || format,
              "loftq: the model's block linears are not quantized (no --quant), so LoftQ has no base format");
  QLORA_CHECK(method != AdapterInitMethod::cloq || grams,
              "cloq: the calibrated init needs the Gram of every layer's inputs (a calibration pass)");

  // Everything is computed before the model changes, so a refusal halfway leaves it as it was.
  struct Update {
    std::int64_t block;
    int proj;
    std::optional<quant::QuantizedTensor> base;  // LoftQ: the new base (host), the layer is rebuilt over it
    nn::init::AdapterFactors factors;
  };
  std::vector<Update> updates;
  for (std::int64_t b = 0; b < model.num_layers(); ++b) {
    DecoderBlock& block = model.block(b);
    for (int p = 0; p < DecoderBlock::kProjCount; ++p) {
      nn::Linear& layer = block.linear(DecoderBlock::Proj(p));
      const nn::AdapterShape shape = layer.adapter_shape();
      if (shape.kind == nn::AdapterKind::none) continue;
      const std::string& name = layer.name();
      QLORA_CHECK(!detail::has_dense_base(layer),
                  how + ": the base of " + name + " is dense (no --quant): there is no quantization error to initialise "
                  "the adapter from");
      const Tensor w = fp_weights(name + ".weight");
      QLORA_CHECK(w.defined() && w.rank() == 2 && w.dim(0) == layer.out_features() && w.dim(1) == layer.in_features(),
                  how + ": the full-precision weight " + name + ".weight is " +
                      (w.defined() ? w.shape().str() : std::string("missing")) + ", the layer is " +
                      std::to_string(layer.out_features()) + " x " + std::to_string(layer.in_features()));
      const nn::init::MatrixXd weight = nn::init::to_matrix(w, name + ".weight");
      const nn::init::MatrixXd base_before = detail::dequantized_base(layer);
      LayerInitResult r{name, 0, 0};

      if (method == AdapterInitMethod::loftq) {
        nn::init::LoftqResult fit = nn::init::loftq(w, *format, shape, options.loftq, name);
        const nn::init::MatrixXd base = nn::init::to_matrix(quant::dequantize(fit.base, DType::f64), name);
        r.error_before = detail::frobenius2(weight - base_before);
        r.error_after = detail::frobenius2(weight - base - nn::init::to_matrix(fit.adapter.delta_weight(), name));
        const nn::AdapterShape rebuilt = nn::resolve_adapter(load.adapter, fit.base.rows, fit.base.cols,
                                                             fit.base.group_size(), name);
        QLORA_CHECK(rebuilt.kind == shape.kind && rebuilt.pool == shape.pool && rebuilt.repeat == shape.repeat &&
                        rebuilt.rank == shape.rank,
                    "loftq: " + name + " rebuilt over the format " + format->name() +
                        " would get a different adapter than the model's (" + layer.describe() + ")");
        updates.push_back({b, p, std::move(fit.base), std::move(fit.adapter)});
      } else {
        const quant::GramAccumulator& acc = grams(name);
        QLORA_CHECK(acc.defined() && acc.features() == layer.in_features(),
                    "cloq: the calibration Gram of " + name + " has " + std::to_string(acc.features()) +
                        " features, the layer's input has " + std::to_string(layer.in_features()));
        QLORA_CHECK(acc.rows() > 0, "cloq: the calibration Gram of " + name + " has seen no rows");
        const nn::init::MatrixXd h = nn::init::to_matrix(acc.gram(), "cloq: the calibration Gram of " + name);
        const nn::init::AdapterFactors fit =
            nn::init::fit_adapter_calibrated(weight - base_before, h, shape, options.cloq, name);
        r.error_before = detail::weighted2(weight - base_before, h);
        r.error_after = detail::weighted2(weight - base_before - nn::init::to_matrix(fit.delta_weight(), name), h);
        updates.push_back({b, p, std::nullopt, fit});
      }
      results.push_back(std::move(r));
    }
  }
  for (Update& u : updates) {
    DecoderBlock& block = model.block(u.block);
    if (!u.base) {
      nn::init::write_adapter_params(block.linear(DecoderBlock::Proj(u.proj)), u.factors);
      continue;
    }
    // The same adapter configuration, initial draw and dropout stream as build_model gives this layer.
    const std::string name = block.linear(DecoderBlock::Proj(u.proj)).name();
    const std::uint64_t stream = detail::linear_stream(u.block, u.proj);
    std::unique_ptr<nn::Linear> rebuilt = nn::make_linear(name, nn::BaseWeight(u.base->to(load.device)), load.adapter,
                                                          nn::mix_seed(load.seed, 0, stream), stream, load.param_dtype);
    nn::init::write_adapter_params(*rebuilt, u.factors);
    block.replace_linear(DecoderBlock::Proj(u.proj), std::move(rebuilt));
  }
  return results;
}

// The same, with the full-precision weights read from the model's files (io::open_model_files).
inline std::vector<LayerInitResult> init_adapters(Model& model, const io::ModelFiles& fp_files, AdapterInitMethod method,
                                                  const AdapterInitOptions& options = {}, const GramLookup& grams = {}) {
  return init_adapters(model, [&](const std::string& name) { return fp_files.load(name, DType::f32); }, method, options,
                       grams);
}

}  // namespace qlora::models::llama
