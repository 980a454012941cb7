// Numerical guards of the trainer (train/trainer.hpp): a NaN that reaches the loss or a gradient stops the
// run with a message naming the step and the parameter (its layer), and no checkpoint is written after it;
// with skip_nonfinite the step is skipped, the parameters stay finite, and every checkpoint written holds
// finite values only. The NaN is injected through the data: a toy model whose input value for token 13 is NaN.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include "qlora/io/safetensors.hpp"
#include "qlora/train/trainer.hpp"
#include "support/files.hpp"

using namespace qlora;
namespace fs = std::filesystem;

namespace {

constexpr std::int32_t kPoisonToken = 13;

// loss = mean over tokens t of (w0 * x_t + w1 - 1)^2 with x_t = t / 10, NaN for kPoisonToken. Exact gradients.
struct ToyModel {
  autograd::Param w{"model.layers.3.mlp.down_proj.lora_B", Tensor::from(std::vector<float>{0.5f, 0.1f}, Shape{2})};
  struct Result {
    double loss;
  };
  struct EvalResult {
    double loss_sum;
    std::int64_t valid_tokens;
  };

  EvalResult evaluate_loss(const Tensor& tokens, const Tensor&) const {
    double sum = 0;
    for (std::int64_t i = 0; i < tokens.numel(); ++i) {
      const double x = input(tokens.data<std::int32_t>()[i]);
      const double r = w.value.data<float>()[0] * x + w.value.data<float>()[1] - 1;
      sum += r * r;
    }
    return {sum, tokens.numel()};
  }
  Result forward_backward(nn::Context&, const Tensor& tokens, const Tensor& targets) {
    const std::int64_t n = tokens.numel();
    double g0 = 0, g1 = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const double x = input(tokens.data<std::int32_t>()[i]);
      const double r = w.value.data<float>()[0] * x + w.value.data<float>()[1] - 1;
      g0 += 2 * r * x / double(n);
      g1 += 2 * r / double(n);
    }
    w.accumulate_grad(Tensor::from(std::vector<float>{float(g0), float(g1)}, Shape{2}));
    return {evaluate_loss(tokens, targets).loss_sum / double(n)};
  }
  std::vector<autograd::Param*> params() { return {&w}; }
  void zero_grad() { w.zero_grad(); }

  static double input(std::int32_t token) {
    return token == kPoisonToken ? std::numeric_limits<double>::quiet_NaN() : double(token) / 10.0;
  }
};

// Six examples; the one holding the poison token is served at the optimizer step given by the loader's order.
std::vector<train::Example> examples(bool poisoned) {
  std::vector<train::Example> out;
  for (std::int32_t i = 0; i < 6; ++i) {
    const std::int32_t t = poisoned && i == 4 ? kPoisonToken : 2 + i;
    out.push_back({{t, t + 1, t + 2}, {t + 1, t + 2, t + 3}});
  }
  return out;
}

train::TrainerConfig config(const fs::path& out, bool skip) {
  train::TrainerConfig c;
  c.steps = 6, c.batch = 1, c.micro_batch = 1, c.lr = 0.05, c.save_every = 1, c.keep_checkpoints = 100;
  c.skip_nonfinite = skip;
  c.out = out;
  c.print = [](const std::string&) {};
  return c;
}

bool checkpoint_finite(const fs::path& dir) {
  const io::SafetensorsFile f(dir / "adapter.safetensors");
  const Tensor t = f.load("model.layers.3.mlp.down_proj.lora_B", DType::f32);
  for (std::int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(t.data<float>()[i])) return false;
  return true;
}

// The optimizer step (1-based) at which the loader serves the poisoned example.
std::int64_t poisoned_step() {
  train::DataLoader probe(examples(true), 1, 0, false, 0);
  for (std::int64_t step = 1; step <= 6; ++step) {
    const train::Batch b = probe.next();
    for (std::int64_t i = 0; i < b.tokens.numel(); ++i)
      if (b.tokens.data<std::int32_t>()[i] == kPoisonToken) return step;
  }
  return 0;
}

}  // namespace

TEST_CASE("trainer: a NaN from the data stops the run naming the step and the parameter, and writes no checkpoint after it") {
  const std::int64_t bad = poisoned_step();
  REQUIRE(bad >= 1);
  test::TempDir dir;
  ToyModel model;
  train::DataLoader data(examples(true), 1, 0, false, 0);
  train::Trainer<ToyModel> trainer(model, data, nullptr, config(dir.path(), false));
  const std::string msg = test::error_of([&] { (void)trainer.run(); });
  CHECK(msg.find("step " + std::to_string(bad) + ":") != std::string::npos);
  CHECK(msg.find("the loss is") != std::string::npos);
  CHECK(msg.find("nan") != std::string::npos);
  CHECK(msg.find("--skip-nonfinite") != std::string::npos);
  // The good checkpoints before the bad step are there and finite; none at or after it.
  const auto all = train::complete_checkpoints(dir.path());
  CHECK(all.size() == std::size_t(bad - 1));
  for (const auto& c : all) CHECK(checkpoint_finite(c));
  CHECK(!fs::exists(train::checkpoint_dir(dir.path(), bad)));
}

TEST_CASE("trainer: a finite loss with a NaN gradient names the parameter (its layer) and the step") {
  // A finite loss with one NaN gradient entry at the second step (as an overflow inside a backward gives).
  struct NanGradModel : ToyModel {
    Result forward_backward(nn::Context& ctx, const Tensor& tokens, const Tensor& targets) {
      Result r = ToyModel::forward_backward(ctx, tokens, targets);
      if (++calls == 2) w.grad.data<float>()[1] = std::numeric_limits<float>::quiet_NaN();
      return r;
    }
    int calls = 0;
  };
  test::TempDir dir;
  NanGradModel model;
  train::DataLoader data(examples(false), 1, 0, false, 0);
  train::Trainer<NanGradModel> trainer(model, data, nullptr, config(dir.path(), false));
  const std::string msg = test::error_of([&] { (void)trainer.run(); });
  CHECK(msg.find("step 2:") != std::string::npos);
  CHECK(msg.find("the gradient of 'model.layers.3.mlp.down_proj.lora_B' is not finite") != std::string::npos);
  CHECK(train::complete_checkpoints(dir.path()).size() == 1);
}

TEST_CASE("trainer: --skip-nonfinite skips the poisoned step; parameters and every checkpoint stay finite") {
  const std::int64_t bad = poisoned_step();
  test::TempDir dir;
  ToyModel model;
  train::DataLoader data(examples(true), 1, 0, false, 0);
  train::Trainer<ToyModel> trainer(model, data, nullptr, config(dir.path(), true));
  const train::TrainSummary s = trainer.run();
  CHECK(s.skipped_steps == 1);
  CHECK(std::isfinite(model.w.value.data<float>()[0]));
  CHECK(std::isfinite(model.w.value.data<float>()[1]));
  const auto all = train::complete_checkpoints(dir.path());
  CHECK(all.size() == 6);
  for (const auto& c : all) CHECK(checkpoint_finite(c));
  // The skipped step left the parameters as they were: its checkpoint equals the one before it.
  if (bad >= 2) {
    const io::SafetensorsFile before(train::checkpoint_dir(dir.path(), bad - 1) / "adapter.safetensors");
    const io::SafetensorsFile after(train::checkpoint_dir(dir.path(), bad) / "adapter.safetensors");
    const auto name = "model.layers.3.mlp.down_proj.lora_B";
    CHECK(std::equal(before.bytes(name).begin(), before.bytes(name).end(), after.bytes(name).begin()));
  }
}
