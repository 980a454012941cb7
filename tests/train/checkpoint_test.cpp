// Training checkpoints: a save/load round trip restores parameters, optimizer state and data position so
// that the next steps are identical to an uninterrupted run; half-written directories are ignored; old
// checkpoints are pruned; a mismatched adapter is refused naming the tensor.

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>

#include "qlora/ops/random.hpp"
#include "qlora/train/adamw.hpp"
#include "qlora/train/checkpoint.hpp"

using namespace qlora;
using namespace qlora::train;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("qlora-ckpt-test-" + std::to_string(::getpid())) / name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

struct Run {
  autograd::Param a{"layer.lora_A", ops::randn(Shape{3, 5}, 1)};
  autograd::Param b{"layer.lora_B", ops::randn(Shape{4, 3}, 2)};
  std::vector<autograd::Param*> params{&a, &b};
  AdamW opt{params, AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.01}};

  // A deterministic "gradient" that depends on the step and the current values, then one update.
  void step(std::int64_t k) {
    for (autograd::Param* p : params) {
      p->zero_grad();
      p->accumulate_grad(ops::add(ops::scale(p->value, 0.5f), ops::randn(p->value.shape(), 100 + std::uint64_t(k))));
    }
    opt.step();
  }
};

}  // namespace

TEST_CASE("checkpoint: save, load and continue gives the same parameters as an uninterrupted run") {
  const fs::path out = fresh_dir("resume");
  Run straight;
  for (int k = 0; k < 6; ++k) straight.step(k);

  Run first;
  for (int k = 0; k < 3; ++k) first.step(k);
  TrainerState state;
  state.step = 3;
  state.data = {1, 17};
  state.run = {{"adapter", "qblora"}};
  save_checkpoint(out, first.params, first.opt, state);

  Run second;  // fresh values, as a new process would have
  const auto latest = latest_checkpoint(out);
  REQUIRE(latest.has_value());
  CHECK(latest->filename() == "step-00000003");
  const TrainerState loaded = load_checkpoint(*latest, second.params, second.opt);
  CHECK(loaded.step == 3);
  CHECK(loaded.data == DataPosition{1, 17});
  CHECK(loaded.run.at("adapter") == "qblora");
  CHECK(second.opt.step_count() == 3);
  for (int k = 3; k < 6; ++k) second.step(k);
  CHECK(second.a.value.to_vector<float>() == straight.a.value.to_vector<float>());
  CHECK(second.b.value.to_vector<float>() == straight.b.value.to_vector<float>());
}

TEST_CASE("checkpoint: incomplete directories are ignored and old checkpoints pruned") {
  const fs::path out = fresh_dir("prune");
  Run run;
  for (std::int64_t s : {1, 2, 3}) {
    run.step(s);
    TrainerState state;
    state.step = s;
    save_checkpoint(out, run.params, run.opt, state, /*keep=*/2);
  }
  CHECK(complete_checkpoints(out).size() == 2);
  CHECK(!fs::exists(checkpoint_dir(out, 1)));
  // A crash in the middle of a save leaves a directory without state.json (or a temporary): not a checkpoint.
  fs::create_directories(checkpoint_dir(out, 9));
  std::ofstream(checkpoint_dir(out, 9) / "adapter.safetensors") << "partial";
  fs::create_directories(out / "checkpoints" / ".step-00000010.tmp.1.0");
  CHECK(latest_checkpoint(out)->filename() == "step-00000003");
  CHECK(!latest_checkpoint(fresh_dir("empty")).has_value());
}

TEST_CASE("checkpoint: an adapter of another shape is refused naming the tensor") {
  const fs::path out = fresh_dir("mismatch");
  Run run;
  run.step(0);
  save_checkpoint(out, run.params, run.opt, TrainerState{1, {}, {}});
  autograd::Param a{"layer.lora_A", ops::randn(Shape{2, 5}, 1)}, b{"layer.lora_B", ops::randn(Shape{4, 2}, 2)};
  std::vector<autograd::Param*> other{&a, &b};
  AdamW opt(other);
  CHECK_THROWS_WITH_AS(load_checkpoint(checkpoint_dir(out, 1), other, opt),
                       doctest::Contains("adapter tensor layer.lora_A has shape (3, 5)"), Error);
}
