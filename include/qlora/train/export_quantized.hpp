#pragma once
// Writing a quantized model directory (io/quantized_model.hpp, docs/model-files.md "Quantized model
// directories"): config.json = the HF config plus quantization_config, model.safetensors = the dense
// tensors (embedding, norms, LM head; f32 or f16) and every block linear's QuantizedTensor members as
// they are in memory, and the tokenizer. Built under a temporary name and renamed when complete
// (io/atomic_write.hpp), like every export (export.hpp, whose tokenizer copy it shares).

#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "models/llama/model.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/quantized_model.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/io/tokenizer_load.hpp"
#include "qlora/train/export.hpp"

namespace qlora::train {

struct QuantizedExportOptions {
  DType dense_dtype = DType::f32;  // embedding, norms, LM head: f32 (exact) or f16
  // A HF directory (its tokenizer files are copied) or one tokenizer file, copied under the name a
  // directory's tokenizer is looked up by (tokenizer.model, tokenizer.json or tokenizer.bin); a GGUF
  // vocabulary is not converted. Empty: no tokenizer.
  std::filesystem::path tokenizer_source;
};

// The name a single tokenizer file takes inside a model directory (empty: it cannot be copied as one).
inline std::string tokenizer_file_name_in_directory(const std::filesystem::path& file) {
  switch (io::tokenizer_file_kind(file)) {
    case io::TokenizerFileKind::llama2c: return "tokenizer.bin";
    case io::TokenizerFileKind::hf_json: return "tokenizer.json";
    case io::TokenizerFileKind::sentencepiece:
    case io::TokenizerFileKind::tiktoken: return "tokenizer.model";
    case io::TokenizerFileKind::gguf: return "";
  }
  return "";
}

// Writes OUT (which appears only when complete). Every block linear must have a quantized base in
// info.format and no adapter. Returns the tokenizer files written.
inline std::vector<std::string> export_quantized(models::llama::Model& model, const std::filesystem::path& out_dir,
                                                 const io::QuantizationInfo& info,
                                                 const QuantizedExportOptions& options = {}) {
  namespace fs = std::filesystem;
  const std::string who = "write quantized model " + out_dir.string();
  QLORA_CHECK(options.dense_dtype == DType::f32 || options.dense_dtype == DType::f16,
              who + ": dense tensors are f32 or f16, not " + std::string(dtype_name(options.dense_dtype)));
  info.format.validate();
  const auto dense = [&](const Tensor& t) { return t.to(Device::cpu()).to(DType::f32).to(options.dense_dtype); };

  const auto tensors = detail::hf_checkpoint_tensors(model, dense, [&](const nn::Linear& linear) {
    const quant::QuantizedTensor* q = linear.quantized_weight();
    QLORA_CHECK(q != nullptr, who + ": " + linear.name() + " has a dense base (quantize every block linear first)");
    QLORA_CHECK(q->config == info.format, who + ": " + linear.name() + " is " + q->config.name() +
                                              ", but the model is described as " + info.format.name());
    QLORA_CHECK(linear.adapter_shape().kind == nn::AdapterKind::none,
                who + ": " + linear.name() + " carries an adapter; a quantized model directory holds the base only "
                "(export the adapter with --to peft)");
    return io::quantized_tensor_entries(linear.name(), *q);
  });

  io::LlamaConfig config = model.config();
  config.torch_dtype = options.dense_dtype == DType::f32 ? "float32" : "float16";
  config.validate(who + ": config");
  nlohmann::ordered_json config_json = config.to_json();
  config_json["quantization_config"] = info.to_json();

  io::AtomicDirectory out(out_dir);
  io::write_safetensors(out.path() / "model.safetensors", tensors,
                        {{"format", "pt"}, {"quant_method", io::kQloraQuantMethod}, {"quant_format", info.format.name()}});
  io::write_file_atomically(out.path() / "config.json", config_json.dump(2) + "\n");
  std::vector<std::string> copied;
  const fs::path& source = options.tokenizer_source;
  if (!source.empty() && fs::is_directory(source)) {
    copied = copy_tokenizer_files(source, out.path());
  } else if (!source.empty()) {
    QLORA_CHECK(fs::exists(source), who + ": tokenizer " + source.string() + " does not exist");
    const std::string name = tokenizer_file_name_in_directory(source);
    if (!name.empty()) {
      fs::copy_file(source, out.path() / name);
      copied.push_back(name);
    }
  }
  out.commit();
  return copied;
}

}  // namespace qlora::train
