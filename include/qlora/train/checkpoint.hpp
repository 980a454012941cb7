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
// latest_checkpoint() finds the newest complete one; older ones beyond `keep` are removed after a save, each
// first renamed to a temporary name so that a crash in the middle of the removal cannot leave a step-*
// directory with some of its files gone. Temporaries that a killed process left behind are removed by the
// next save. tests/tools/crash_resume_test.cpp kills `qlora train` at random points, in the middle of
// checkpoint writes included, and checks all of this.
//
// Test hook: QLORA_TEST_CHECKPOINT_DELAY_MS=N makes save_checkpoint sleep N ms after the tensors are written
// and before state.json, so that a test can kill the process while a checkpoint is half written.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>
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

namespace detail {

// Removes checkpoints/.step-*.tmp.PID.N directories (AtomicDirectory's temporaries, and removals in progress)
// whose process is gone: what a run killed in the middle of a save leaves behind.
inline void remove_stale_checkpoint_temporaries(const std::filesystem::path& root) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    const std::size_t tmp = name.rfind(".tmp.");
    if (name.rfind(".step-", 0) != 0 || tmp == std::string::npos) continue;
    const long pid = std::strtol(name.c_str() + tmp + 5, nullptr, 10);
    if (pid > 0 && pid != long(::getpid()) && ::kill(pid_t(pid), 0) != 0 && errno == ESRCH)
      std::filesystem::remove_all(entry.path(), ec);
  }
}

// Removes a checkpoint directory: renamed to a temporary name first (atomic), so it stops being a
// checkpoint at once, however far the removal then gets.
inline void remove_checkpoint(const std::filesystem::path& dir) {
  std::error_code ec;
  const std::filesystem::path doomed = io::detail::temporary_sibling(dir);
  std::filesystem::rename(dir, doomed, ec);
  std::filesystem::remove_all(ec ? dir : doomed, ec);
}

inline void test_checkpoint_delay() {
  if (const char* ms = std::getenv("QLORA_TEST_CHECKPOINT_DELAY_MS"))
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atol(ms)));
}

}  // namespace detail

inline void save_checkpoint(const std::filesystem::path& out, const std::vector<autograd::Param*>& params,
                            const Optimizer& optimizer, const TrainerState& state, int keep = 2) {
  namespace fs = std::filesystem;
  fs::create_directories(out / "checkpoints");
  detail::remove_stale_checkpoint_temporaries(out / "checkpoints");
  io::AtomicDirectory dir(checkpoint_dir(out, state.step));
  std::vector<std::pair<std::string, Tensor>> adapter;
  for (const autograd::Param* p : params) adapter.emplace_back(p->name, p->value);
  io::write_safetensors(dir.path() / "adapter.safetensors", adapter, {{"format", "qlora-adapter"}});
  io::write_safetensors(dir.path() / "optimizer.safetensors", optimizer.state_tensors());
  detail::test_checkpoint_delay();
  const nlohmann::json json = {{"step", state.step},
                               {"data", {{"epoch", state.data.epoch}, {"index", state.data.index}}},
                               {"optimizer", optimizer.scalar_state()},
                               {"run", state.run}};
  io::write_file_atomically(dir.path() / "state.json", json.dump(2) + "\n");
  dir.commit();
  auto all = complete_checkpoints(out);
  for (std::size_t i = 0; keep > 0 && i + std::size_t(keep) < all.size(); ++i) detail::remove_checkpoint(all[i]);
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
  // The counters must be non-negative integers: a float such as 1e300 would convert to int64 with
  // undefined behaviour.
  const auto counter = [&](const nlohmann::json& v, const std::string& key) {
    if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<std::int64_t>() < 0) ||
        (v.is_number_unsigned() && v.get<std::uint64_t>() > std::uint64_t(INT64_MAX)))
      throw Error(where + "/state.json: " + key + " is " + v.dump() + ", not a non-negative integer");
    return v.get<std::int64_t>();
  };
  try {
    if (json.at("optimizer").is_object() && json.at("optimizer").contains("step"))
      (void)counter(json.at("optimizer").at("step"), "optimizer.step");
    optimizer.load_state(json.at("optimizer"), tensors);
    state.step = counter(json.at("step"), "step");
    state.data.epoch = counter(json.at("data").at("epoch"), "data.epoch");
    state.data.index = counter(json.at("data").at("index"), "data.index");
    state.run = json.value("run", nlohmann::json::object());
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + "/state.json: " + e.what());
  }
  return state;
}

}  // namespace qlora::train
