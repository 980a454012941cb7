#pragma once
// One way to open a MODEL argument, whatever its format: a Hugging Face directory (config.json +
// safetensors, single or sharded), a quantized directory written by `qlora quantize`, a .gguf file, or a
// llama2.c .bin. Each gives the same LlamaConfig and
// serves tensors by HF name, lazily, one at a time (so a model can be moved to the GPU layer by layer
// without a second full copy in host memory), with W_q/W_k rows in HF's rotate-half RoPE order.

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/llama2c.hpp"
#include "qlora/io/quantized_model.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/quant/dequantize.hpp"

namespace qlora::io {

class ModelFiles {
 public:
  virtual ~ModelFiles() = default;
  virtual const LlamaConfig& config() const = 0;
  // The HF names of the model's tensors, in llama_tensor_specs order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& spec : llama_tensor_specs(config())) out.push_back(spec.name);
    return out;
  }
  // A host tensor by HF name, as `dtype`.
  virtual Tensor load(const std::string& hf_name, DType dtype = DType::f32) const = 0;
  // What was opened, for messages.
  virtual std::string describe() const = 0;
  // The quantization of a directory written by `qlora quantize`; nullptr for every other model.
  virtual const QuantizationInfo* quantization() const { return nullptr; }
  // The stored quantized weight of a block linear ("model.layers.0.self_attn.q_proj"), exactly as written.
  virtual quant::QuantizedTensor load_quantized(const std::string& linear) const {
    throw Error(describe() + " holds no quantized weights (asked for " + linear + ")");
  }
};

// config.json + safetensors; every expected tensor is checked against the config's shapes on open.
class HfModelFiles final : public ModelFiles {
 public:
  explicit HfModelFiles(const std::filesystem::path& dir)
      : dir_(dir), config_(read_hf_config(dir / "config.json")), tensors_(dir) {
    check_llama_tensors(
        config_,
        [&](const std::string& name) -> std::optional<std::vector<std::int64_t>> {
          if (!tensors_.contains(name)) return std::nullopt;
          return tensors_.entry(name).dims;
        },
        tensors_.describe());
  }
  const LlamaConfig& config() const override { return config_; }
  Tensor load(const std::string& hf_name, DType dtype = DType::f32) const override {
    return tensors_.load(hf_name, dtype);
  }
  std::string describe() const override { return dir_.string(); }
  const SafetensorsCheckpoint& checkpoint() const { return tensors_; }

 private:
  std::filesystem::path dir_;
  LlamaConfig config_;
  SafetensorsCheckpoint tensors_;
};

// A directory written by `qlora quantize` (quantized_model.hpp): config.json with a "qlora"
// quantization_config, dense tensors under their HF names and every block linear as its quantized members.
// Everything is checked on open; load() of a block linear's ".weight" gives its dequantized values (for
// readers that want dense weights: export, info), load_quantized() the stored codes themselves.
class QuantizedModelFiles final : public ModelFiles {
 public:
  QuantizedModelFiles(const std::filesystem::path& dir, QuantizationInfo info)
      : dir_(dir), config_(read_hf_config(dir / "config.json")), info_(std::move(info)), tensors_(dir) {
    for (const auto& spec : llama_tensor_specs(config_)) {
      if (const auto linear = linear_of(spec.name)) {
        (void)read_quantized_tensor(tensors_, *linear, info_.format, spec.shape[0], spec.shape[1]);
        continue;
      }
      QLORA_CHECK(tensors_.contains(spec.name), tensors_.describe() + ": tensor " + spec.name + " is missing");
      const Shape stored = tensors_.entry(spec.name).shape();
      QLORA_CHECK(stored == spec.shape, tensors_.describe() + ": tensor " + spec.name + " has shape " +
                                            shape_str(stored) + " but config.json implies " + shape_str(spec.shape));
    }
  }
  const LlamaConfig& config() const override { return config_; }
  Tensor load(const std::string& hf_name, DType dtype = DType::f32) const override {
    if (const auto linear = linear_of(hf_name)) return quant::dequantize(load_quantized(*linear)).to(dtype);
    return tensors_.load(hf_name, dtype);
  }
  std::string describe() const override { return dir_.string(); }
  const QuantizationInfo* quantization() const override { return &info_; }
  quant::QuantizedTensor load_quantized(const std::string& linear) const override {
    for (const auto& spec : llama_tensor_specs(config_))
      if (spec.name == linear + ".weight" && linear_of(spec.name))
        return read_quantized_tensor(tensors_, linear, info_.format, spec.shape[0], spec.shape[1]);
    throw Error(describe() + ": " + linear + " is not a block linear of this model");
  }

 private:
  // "model.layers.3.mlp.up_proj.weight" -> "model.layers.3.mlp.up_proj"; nullopt for dense tensors.
  static std::optional<std::string> linear_of(const std::string& hf_name) {
    if (!hf_name.starts_with("model.layers.") || !hf_name.ends_with("_proj.weight")) return std::nullopt;
    return hf_name.substr(0, hf_name.size() - std::string(".weight").size());
  }

  std::filesystem::path dir_;
  LlamaConfig config_;
  QuantizationInfo info_;
  SafetensorsCheckpoint tensors_;
};

class GgufModelFiles final : public ModelFiles {
 public:
  explicit GgufModelFiles(const std::filesystem::path& path) : model_(path) {}
  const LlamaConfig& config() const override { return model_.config(); }
  Tensor load(const std::string& hf_name, DType dtype = DType::f32) const override { return model_.load(hf_name, dtype); }
  std::string describe() const override { return model_.file().path().string(); }
  const GgufLlama& gguf() const { return model_; }

 private:
  GgufLlama model_;
};

class Llama2cModelFiles final : public ModelFiles {
 public:
  explicit Llama2cModelFiles(const std::filesystem::path& path) : checkpoint_(path) {}
  const LlamaConfig& config() const override { return checkpoint_.config(); }
  Tensor load(const std::string& hf_name, DType dtype = DType::f32) const override {
    return checkpoint_.load(hf_name, dtype);
  }
  std::string describe() const override { return checkpoint_.path().string(); }
  const Llama2cCheckpoint& llama2c() const { return checkpoint_; }

 private:
  Llama2cCheckpoint checkpoint_;
};

// Chooses the reader: a directory is an HF model; a file by its magic ("GGUF") or else its .bin extension.
inline std::unique_ptr<ModelFiles> open_model_files(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  QLORA_CHECK(fs::exists(path), "cannot open model " + path.string() + ": no such file or directory");
  if (fs::is_directory(path)) {
    QLORA_CHECK(fs::exists(path / "config.json"), "cannot open model " + path.string() + ": the directory has no config.json");
    if (auto info = read_quantization_info(path / "config.json"))
      return std::make_unique<QuantizedModelFiles>(path, std::move(*info));
    return std::make_unique<HfModelFiles>(path);
  }
  const MappedFile probe(path);
  if (probe.size() >= 4 && std::memcmp(probe.data(), "GGUF", 4) == 0) return std::make_unique<GgufModelFiles>(path);
  if (path.extension() == ".bin") return std::make_unique<Llama2cModelFiles>(path);
  throw Error("cannot open model " + path.string() +
              ": expected a Hugging Face directory, a .gguf file or a llama2.c .bin checkpoint");
}

}  // namespace qlora::io
