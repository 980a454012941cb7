#pragma once
// The trained adapter as `qlora train` leaves it (OUT/adapter/) and `qlora eval/generate --adapter` read it:
//   adapter.safetensors   every adapter parameter by its layer name ("model.layers.3.self_attn.q_proj.lora_A")
//   adapter_config.json   {"format": "qlora-adapter", "adapter", "rank", "alpha", "dropout", "pool", "repeat",
//                          "targets", "quant", "base_model"}: what rebuilds the same layers on the same base;
//                          "rank_pattern" {layer: r'} for the layers whose adapter rank RA-LoRA
//                          (train/rank_adaptive.hpp) moved away from the one the configuration builds (the
//                          scale stays alpha / rank everywhere).
// (PEFT's layout is an export format: `qlora export --to peft`.)

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/autograd/param.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/nn/adapter_config.hpp"
#include "qlora/train/json_files.hpp"

namespace qlora::train {

struct AdapterDescription {
  nn::AdapterConfig adapter;
  std::vector<std::string> targets;
  std::string quant = "none";  // the base format the adapter was trained on
  std::string base_model;
  std::map<std::string, std::int64_t> rank_pattern = {};  // layer -> r', where RA-LoRA changed the built rank

  nlohmann::json to_json() const {
    nlohmann::json j = {{"format", "qlora-adapter"},
            {"adapter", std::string(nn::adapter_kind_name(adapter.kind))},
            {"rank", adapter.rank},
            {"alpha", adapter.alpha},
            {"dropout", adapter.dropout},
            {"pool", adapter.pool},
            {"repeat", adapter.repeat},
            {"init", adapter.init == nn::AdapterInit::xavier ? "xavier" : "kaiming"},
            {"targets", targets},
            {"quant", quant},
            {"base_model", base_model}};
    if (!rank_pattern.empty()) j["rank_pattern"] = rank_pattern;
    return j;
  }

  static AdapterDescription from_json(const nlohmann::json& j, const std::string& where) {
    try {
      if (j.at("format") != "qlora-adapter") throw Error(where + ": not a qlora adapter (format " + j.at("format").dump() + ")");
      AdapterDescription d;
      d.adapter.kind = nn::parse_adapter_kind(j.at("adapter").get<std::string>());
      d.adapter.rank = j.at("rank").get<int>();
      d.adapter.alpha = j.at("alpha").get<float>();
      d.adapter.dropout = j.value("dropout", 0.f);
      d.adapter.pool = j.value("pool", 0);
      d.adapter.repeat = j.value("repeat", 0);
      d.adapter.init = j.value("init", std::string("kaiming")) == "xavier" ? nn::AdapterInit::xavier : nn::AdapterInit::kaiming;
      d.targets = j.at("targets").get<std::vector<std::string>>();
      d.quant = j.value("quant", std::string("none"));
      d.base_model = j.value("base_model", std::string());
      const nlohmann::json pattern = j.value("rank_pattern", nlohmann::json::object());
      for (const auto& [layer, rank] : pattern.items()) {
        if (!rank.is_number_integer() || rank.get<std::int64_t>() < 1)
          throw Error(where + ": rank_pattern of " + layer + " is " + rank.dump() + ", not a positive integer");
        d.rank_pattern[layer] = rank.get<std::int64_t>();
      }
      return d;
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": " + e.what());
    }
  }
};

inline void save_adapter(const std::filesystem::path& dir, const AdapterDescription& description,
                         const std::vector<autograd::Param*>& params) {
  io::AtomicDirectory out(dir);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const autograd::Param* p : params) tensors.emplace_back(p->name, p->value);
  io::write_safetensors(out.path() / "adapter.safetensors", tensors, {{"format", "qlora-adapter"}});
  io::write_file_atomically(out.path() / "adapter_config.json", description.to_json().dump(2) + "\n");
  out.commit();
}

inline AdapterDescription read_adapter_description(const std::filesystem::path& dir) {
  const std::filesystem::path config = dir / "adapter_config.json";
  return AdapterDescription::from_json(read_json_file(config.string()), config.string());
}

// Copies the saved values into params (every one must be there, with its shape).
inline void load_adapter_values(const std::filesystem::path& dir, const std::vector<autograd::Param*>& params) {
  const io::SafetensorsFile file(dir / "adapter.safetensors");
  for (autograd::Param* p : params) {
    if (!file.contains(p->name))
      throw Error((dir / "adapter.safetensors").string() + ": no tensor " + p->name + " (an adapter for another model?)");
    const Tensor saved = file.load(p->name);
    if (saved.shape() != p->value.shape())
      throw Error((dir / "adapter.safetensors").string() + ": tensor " + p->name + " has shape " + saved.shape().str() +
                  ", the layer expects " + p->value.shape().str());
    p->value.copy_from(saved.to(p->value.dtype()));
  }
}

}  // namespace qlora::train
