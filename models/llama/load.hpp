#pragma once
// Building a Model from weights: load_model(path, options) opens a Hugging Face directory (config.json +
// safetensors, sharded or not), a .gguf file or a llama2.c .bin (io::open_model_files chooses by what the
// path is) and builds the model layer by layer: each tensor is read from the mapped file on its own,
// converted (or quantized, for block linears with options.quant) on the host and moved to the device, so
// neither the host nor the device ever holds the whole model in full precision. random_model() builds
// the same model from seeded random weights (tests, benchmarks with 7B shapes). A directory written by
// `qlora quantize` gives its block linears straight from the stored codes (no re-quantization, exact);
// options.quant must then be unset or equal to the stored format, and adapters attach on top as usual.

#include <array>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "qlora/io/model_files.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/quantize.hpp"
#include "models/llama/model.hpp"

namespace qlora::models::llama {

// Serves a host tensor (f32 or f64) by HF name.
using TensorSource = std::function<Tensor(const std::string& hf_name)>;
// Serves the stored quantized weight of a block linear by HF layer name (quantized model directories).
using QuantizedSource = std::function<quant::QuantizedTensor(const std::string& linear)>;

namespace detail {

// The HF name of a block linear: model.layers.{i}.self_attn.q_proj / mlp.gate_proj.
inline std::string linear_name(std::int64_t layer, const std::string& proj) {
  const bool attention = proj == "q_proj" || proj == "k_proj" || proj == "v_proj" || proj == "o_proj";
  return "model.layers." + std::to_string(layer) + (attention ? ".self_attn." : ".mlp.") + proj;
}

inline void check_finite(const Tensor& host, const std::string& name) {
  const Tensor t = host.to(DType::f64);
  const double* p = t.data<double>();
  for (std::int64_t i = 0; i < t.numel(); ++i)
    QLORA_CHECK(std::isfinite(p[i]), "tensor " + name + " holds a non-finite value (" + std::to_string(p[i]) +
                                         ") at element " + std::to_string(i));
}

// A frozen dense tensor in the activation dtype on the device (converted on the device when it is a GPU).
inline Tensor place(const Tensor& host, const LoadOptions& o) {
  const DType d = o.activation_dtype();
  if (o.device.is_cpu()) return host.to(d);
  return host.to(DType::f32).to(o.device).to(d);
}

}  // namespace detail

inline Model build_model(const Config& config, const TensorSource& source, LoadOptions options,
                         const QuantizedSource& quantized = {}) {
  config.validate("model config");
  options.validate();
  const Tensor inv_freq = rope_frequencies(config).to(options.device);
  const auto load = [&](const std::string& name) {
    Tensor t = source(name);
    detail::check_finite(t, name);
    return t;
  };

  Tensor embedding = detail::place(load("model.embed_tokens.weight"), options);
  std::vector<std::unique_ptr<DecoderBlock>> blocks;
  for (std::int64_t i = 0; i < config.num_hidden_layers; ++i) {
    const std::string prefix = "model.layers." + std::to_string(i) + ".";
    std::array<std::unique_ptr<nn::Linear>, DecoderBlock::kProjCount> linears;
    for (std::size_t p = 0; p < linears.size(); ++p) {
      const std::string& proj = all_block_linears()[p];
      const std::string name = detail::linear_name(i, proj);
      nn::BaseWeight base;
      if (quantized) {
        base = nn::BaseWeight(quantized(name).to(options.device));
      } else {
        const Tensor host = load(name + ".weight");
        base = options.quant ? nn::BaseWeight(quant::quantize(host.to(DType::f32), *options.quant).to(options.device))
                             : nn::BaseWeight(detail::place(host, options));
      }
      nn::AdapterConfig adapter = options.adapter;
      if (std::find(options.targets.begin(), options.targets.end(), proj) == options.targets.end())
        adapter.kind = nn::AdapterKind::none;
      const std::uint64_t stream = std::uint64_t(i) * DecoderBlock::kProjCount + p;
      linears[p] = nn::make_linear(name, std::move(base), adapter, nn::mix_seed(options.seed, 0, stream), stream,
                                   options.param_dtype);
      linears[p]->set_activation_bits(options.activation_bits);  // W4A8 fake-quant of the base input (0: off)
    }
    blocks.push_back(std::make_unique<DecoderBlock>(i, config, detail::place(load(prefix + "input_layernorm.weight"), options),
                                                    detail::place(load(prefix + "post_attention_layernorm.weight"), options),
                                                    std::move(linears), inv_freq));
  }
  Tensor final_norm = detail::place(load("model.norm.weight"), options);
  Tensor lm_head = config.tie_word_embeddings ? Tensor() : detail::place(load("lm_head.weight"), options);
  return Model(config, std::move(options), std::move(embedding), std::move(blocks), std::move(final_norm),
               std::move(lm_head));
}

// From an opened model (io::open_model_files).
inline Model build_model(const io::ModelFiles& files, LoadOptions options) {
  const auto source = [&](const std::string& name) { return files.load(name, DType::f32); };
  const io::QuantizationInfo* stored = files.quantization();
  if (!stored) return build_model(files.config(), source, std::move(options));
  QLORA_CHECK(!options.quant || *options.quant == stored->format,
              files.describe() + " is already quantized as " + stored->format.name() + "; it cannot be loaded as " +
                  (options.quant ? options.quant->name() : std::string()) + " (pass --quant none or --quant " +
                  stored->format.name() + ")");
  options.quant = stored->format;  // what the model's base is, for whoever reads options() (adapter files)
  if (options.activation_bits == 0) options.activation_bits = stored->act_bits;  // W4A8 models run as calibrated
  return build_model(files.config(), source, std::move(options),
                     [&](const std::string& linear) { return files.load_quantized(linear); });
}

// MODEL: a Hugging Face directory, a .gguf file or a llama2.c .bin.
inline Model load_model(const std::filesystem::path& path, LoadOptions options = {}) {
  const std::unique_ptr<io::ModelFiles> files = io::open_model_files(path);
  return build_model(*files, std::move(options));
}

// Seeded random weights: N(0, init_std^2) matrices (Philox, so the same on every machine), norms near 1.
inline Model random_model(const Config& config, LoadOptions options, std::uint64_t weight_seed = 1,
                          float init_std = 0.02f) {
  std::uint64_t counter = 0;
  const auto source = [&](const std::string& name) {
    Shape shape;
    for (const auto& spec : io::llama_tensor_specs(config))
      if (spec.name == name) shape = spec.shape;
    const std::uint64_t seed = nn::mix_seed(weight_seed, 1, counter++);
    if (shape.rank() == 1) return ops::rand(shape, seed, Device::cpu(), 0.8f, 1.2f);
    return ops::randn(shape, seed, Device::cpu(), 0.f, init_std);
  };
  return build_model(config, source, std::move(options));
}

}  // namespace qlora::models::llama
