#pragma once
// Flags shared by the subcommands that load a model: --device, --quant, the tokenizer, and an adapter
// directory written by `qlora train` (which fixes the adapter layers and the base format to rebuild).

#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "model_paths.hpp"
#include "models/llama/load.hpp"
#include "qlora/dist/make_communicator.hpp"
#include "qlora/io/tokenizer_load.hpp"
#include "qlora/train/adapter_files.hpp"
#include "qlora/train/rank_adaptive.hpp"

namespace qlora::tool {

inline Device parse_device(const std::string& text) {
  if (text == "cpu") return Device::cpu();
  Device d;
  if (text == "cuda") d = Device::cuda(0);
  else if (text.rfind("cuda:", 0) == 0 && text.size() > 5 && text.find_first_not_of("0123456789", 5) == std::string::npos)
    d = Device::cuda(std::stoi(text.substr(5)));
  else
    throw Error("--device must be cpu, cuda or cuda:N, got '" + text + "'");
#if !defined(QLORA_WITH_CUDA)
  throw Error("--device " + text + ": this qlora was built without CUDA");
#endif
  return d;
}

// The device of this process: --device as given in a world of one; under mpirun, `--device cuda` means one
// GPU per rank, the rank's local rank picking it (what dist::make_communicator expects).
inline Device rank_device(const std::string& text) {
  const Device d = parse_device(text);
  const dist::LaunchEnvironment env = dist::LaunchEnvironment::from_environment();
  if (d.is_cpu() || env.world_size == 1) return d;
  if (text != "cuda")
    throw Error("--device " + text + " with " + std::to_string(env.world_size) +
                " processes: each rank takes the GPU of its local rank, pass --device cuda");
  return Device::cuda(env.local_rank);
}

inline std::optional<quant::QuantConfig> parse_quant(const std::string& text) {
  if (text == "none" || text.empty()) return std::nullopt;
  return quant::QuantConfig::parse(text);
}

inline void require_model_path(const std::string& model) {
  if (!std::filesystem::exists(model)) throw Error("cannot open model " + model + ": no such file or directory");
}

inline std::unique_ptr<io::Tokenizer> open_tokenizer(const std::string& model, const std::string& flag) {
  const auto path = tokenizer_path(model, flag);
  if (!path)
    throw Error("no tokenizer found for " + model +
                (model_format(model) == ModelFormat::llama2c ? " (pass --tokenizer tokenizer.bin)" : " (pass --tokenizer)"));
  return io::load_tokenizer(*path);
}

// The model's block linears, layer by layer.
inline std::vector<nn::Linear*> block_linears(models::llama::Model& model) {
  std::vector<nn::Linear*> out;
  for (std::int64_t i = 0; i < model.num_layers(); ++i)
    for (std::size_t p = 0; p < models::llama::all_block_linears().size(); ++p)
      out.push_back(&model.block(i).linear(models::llama::DecoderBlock::Proj(p)));
  return out;
}

// The model with an adapter from `qlora train` attached (or none): its description decides the adapter
// layers and, unless --quant overrides it, the base format the adapter was trained on.
inline models::llama::Model load_with_adapter(const std::string& model, const std::string& adapter_dir,
                                              models::llama::LoadOptions options, const std::string& quant_flag) {
  require_model_path(model);
  if (adapter_dir.empty()) {
    options.quant = parse_quant(quant_flag);
    return models::llama::load_model(model, options);
  }
  const auto description = train::read_adapter_description(adapter_dir);
  options.adapter = description.adapter;
  options.adapter.dropout = 0.f;
  options.targets = description.targets;
  options.quant = parse_quant(quant_flag.empty() ? description.quant : quant_flag);
  models::llama::Model m = models::llama::load_model(model, options);
  train::apply_rank_pattern(block_linears(m), description.rank_pattern, adapter_dir + "/adapter_config.json");
  train::load_adapter_values(adapter_dir, m.params());
  return m;
}

}  // namespace qlora::tool
