#pragma once
// Training checkpoints: everything a run needs to continue as if it had never stopped.
//
//   OUT/checkpoints/step-00000120/
//     adapter.safetensors     the trainable parameters, by name (f32)
//     optimizer.safetensors   the optimizer's state tensors ("<param>.exp_avg", ...)
//     state.json              {"step", "data": {"epoch", "index"}, "optimizer": {...scalars}, "run": {...}}
//
// A checkpoint directory is built under a temporary name and renamed when complete (io::AtomicDirectory),
// so a crash at any point leaves either the previous checkpoints or the new one, never half of one;
// state.json is written last, and a directory without a readable state.json is not a checkpoint.
// latest_checkpoint() finds the newest complete one; older ones beyond `keep` are removed after a save.

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/autograd/param.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/train/data_loader.hpp"
#include "qlora/train/optimizer.hpp"
#include "qlora/train/json_files.hpp"

namespace qlora::train {

struct TrainerState {
  std::int64_t step = 0;          // optimizer steps completed
  DataPosition data;              // where the data loader stands
  nlohmann::json run = nlohmann::json::object();  // the run's configuration and anything a resume must match
};

inline std::filesystem::path checkpoint_dir(const std::filesystem::path& out, std::int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", static_cast<long long>(step));
  return out / "checkpoints" / name;
}

// The checkpoint directories under out/checkpoints that hold a parseable state.json, oldest first.
inline std::vector<std::filesystem::path> complete_checkpoints(const std::filesystem::path& out) {
  namespace fs = std::filesystem;
  std::vector<fs::path> found;
  std::error_code ec;
  const fs::path root = out / "checkpoints";
  if (!fs::is_directory(root, ec)) return found;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || name.rfind("step-", 0) != 0) continue;  // temporaries start with '.'
    try {
      const nlohmann::json state = read_json_file((entry.path() / "state.json").string());
      if (state.contains("step")) found.push_back(entry.path());
    } catch (const std::exception&) {
    }
  }
  std::sort(found.begin(), found.end());
  return found;
}

inline std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& out) {
  auto all = complete_checkpoints(out);
  if (all.empty()) return std::nullopt;
  return all.back();
}

inline void save_checkpoint(const std::filesystem::path& out, const std::vector<autograd::Param*>& params,
                            const Optimizer& optimizer, const TrainerState& state, int keep = 2) {
  namespace fs = std::filesystem;
  fs::create_directories(out / "checkpoints");
  io::AtomicDirectory dir(checkpoint_dir(out, state.step));
  std::vector<std::pair<std::string, Tensor>> adapter;
  for (const autograd::Param* p : params) adapter.emplace_back(p->name, p->value);
  io::write_safetensors(dir.path() / "adapter.safetensors", adapter, {{"format", "qlora-adapter"}});
  io::write_safetensors(dir.path() / "optimizer.safetensors", optimizer.state_tensors());
  const nlohmann::json json = {{"step", state.step},
                               {"data", {{"epoch", state.data.epoch}, {"index", state.data.index}}},
                               {"optimizer", optimizer.scalar_state()},
                               {"run", state.run}};
  io::write_file_atomically(dir.path() / "state.json", json.dump(2) + "\n");
  dir.commit();
  auto all = complete_checkpoints(out);
  for (std::size_t i = 0; keep > 0 && i + std::size_t(keep) < all.size(); ++i) {
    std::error_code ec;
    fs::remove_all(all[i], ec);
  }
}

// Loads a checkpoint into the run's parameters and optimizer; every parameter must be present with its
// shape (a different adapter configuration is refused, naming the tensor).
inline TrainerState load_checkpoint(const std::filesystem::path& dir, const std::vector<autograd::Param*>& params,
                                    Optimizer& optimizer) {
  const std::string where = dir.string();
  const nlohmann::json json = read_json_file((dir / "state.json").string());
  const io::SafetensorsFile adapter(dir / "adapter.safetensors");
  for (autograd::Param* p : params) {
    const Tensor saved = adapter.load(p->name);
    if (saved.shape() != p->value.shape())
      throw Error(where + ": adapter tensor " + p->name + " has shape " + saved.shape().str() + ", the model's is " +
                  p->value.shape().str() + " (a different adapter configuration?)");
    p->value.copy_from(saved.to(p->value.dtype()));
  }
  const io::SafetensorsFile opt(dir / "optimizer.safetensors");
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (const std::string& name : opt.names()) tensors.emplace_back(name, opt.load(name));
  TrainerState state;
  try {
    optimizer.load_state(json.at("optimizer"), tensors);
    state.step = json.at("step").get<std::int64_t>();
    state.data.epoch = json.at("data").at("epoch").get<std::int64_t>();
    state.data.index = json.at("data").at("index").get<std::int64_t>();
    state.run = json.value("run", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + "/state.json: " + e.what());
  }
  return state;
}

}  // namespace qlora::train
