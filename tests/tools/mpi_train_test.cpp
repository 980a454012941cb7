// `qlora train` and `qlora eval` under mpirun, on the real stories260K checkpoint (skipped where
// ../shared/data or MPI is absent): two CPU ranks end with the adapters of one process with the same global
// batch (f32 tolerance: the gradients are summed in another order), report the same perplexity (bit for
// bit), resume to the bytes of an uninterrupted two-rank run, and refuse a checkpoint of another world size.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "qlora/io/safetensors.hpp"
#include "support/files.hpp"
#include "support/shared_data.hpp"
#include "tool_runner.hpp"

namespace fs = std::filesystem;

namespace {

using qlora::test::kStories260K;
using qlora::test::kStories260KTokenizer;
using qlora::test::kTinyStoriesValid;
using qlora::test::mpirun;
using qlora::test::mpirun_available;
using qlora::test::run_qlora;
using qlora::test::shared_file_present;
using Result = qlora::test::ToolResult;

// --batch 4 is the global batch: two ranks take one micro-batch of 2 each, one process two.
std::string train_args(const fs::path& out, int steps, const std::string& extra = "") {
  return "train " + kStories260K.string() + " --tokenizer " + kStories260KTokenizer.string() + " --data " +
         kTinyStoriesValid.string() +
         " --format text --seq-len 64 --adapter lora --rank 4 --alpha 8 --quant int4-g32 --lr 3e-3 --batch 4"
         " --micro-batch 2 --dropout 0.1 --save-every 2 --steps " + std::to_string(steps) + " --out " + out.string() +
         " " + extra;
}

// Per tensor of two adapter files, max |a - b| / max |b|; the largest over the tensors.
double max_rel_diff(const fs::path& a, const fs::path& b) {
  const qlora::io::SafetensorsFile fa(a), fb(b);
  REQUIRE(fa.names() == fb.names());
  double worst = 0;
  for (const std::string& name : fa.names()) {
    const qlora::Tensor ta = fa.load(name, qlora::DType::f32), tb = fb.load(name, qlora::DType::f32);
    REQUIRE(ta.numel() == tb.numel());
    double diff = 0, scale = 0;
    for (std::int64_t i = 0; i < ta.numel(); ++i) {
      diff = std::max(diff, double(std::abs(ta.data<float>()[i] - tb.data<float>()[i])));
      scale = std::max(scale, double(std::abs(tb.data<float>()[i])));
    }
    worst = std::max(worst, diff / std::max(scale, 1e-30));
  }
  return worst;
}

}  // namespace

TEST_CASE("mpirun -np 2 qlora train: the adapters of one process with the same global batch") {
  if (!mpirun_available() || !shared_file_present(kStories260K)) return;
  const fs::path two = qlora::test::fresh_output_path("mpi-two"), one = qlora::test::fresh_output_path("mpi-one");
  const Result spread = run_qlora(train_args(two, 4), mpirun(2));
  INFO(spread.err);
  REQUIRE(spread.status == 0);
  const Result alone = run_qlora(train_args(one, 4));
  INFO(alone.err);
  REQUIRE(alone.status == 0);
  // f32 tolerance: the two ranks' gradients are summed by MPI, one process accumulates them in turn (with
  // two ranks the sum g0 + g1 happens to round alike: observed bitwise equal).
  CHECK(max_rel_diff(two / "adapter/adapter.safetensors", one / "adapter/adapter.safetensors") < 1e-4);
  // ... and training did move the adapters (LoRA's B starts at zero).
  const qlora::io::SafetensorsFile trained(one / "adapter/adapter.safetensors");
  const qlora::Tensor b = trained.load("model.layers.0.self_attn.q_proj.lora_B", qlora::DType::f32);
  CHECK(std::any_of(b.data<float>(), b.data<float>() + b.numel(), [](float v) { return std::abs(v) > 1e-5f; }));
  const auto s2 = nlohmann::json::parse(qlora::test::read_raw(two / "summary.json"));
  const auto s1 = nlohmann::json::parse(qlora::test::read_raw(one / "summary.json"));
  CHECK(s2.at("world_size") == 2);
  CHECK(s2.at("tokens") == s1.at("tokens"));
  CHECK(s2.at("final_loss").get<double>() == doctest::Approx(s1.at("final_loss").get<double>()).epsilon(1e-5));
  // One progress line per step (rank 0 alone prints), and one summary on stdout.
  std::size_t lines = 0;
  for (std::size_t at = spread.err.find("step 4/4"); at != std::string::npos; at = spread.err.find("step 4/4", at + 1)) ++lines;
  CHECK(lines == 1);
  CHECK(std::count(spread.out.begin(), spread.out.end(), '\n') == 1);
}

TEST_CASE("mpirun -np 2 qlora eval --ppl: the perplexity of one process, bit for bit") {
  if (!mpirun_available() || !shared_file_present(kStories260K)) return;
  const std::string args = "eval " + kStories260K.string() + " --tokenizer " + kStories260KTokenizer.string() + " --ppl " +
                           kTinyStoriesValid.string() + " --seq-len 128 --batch 2 --quant int4-g32 --json";
  const Result spread = run_qlora(args, mpirun(2));
  INFO(spread.err);
  REQUIRE(spread.status == 0);
  const Result alone = run_qlora(args);
  REQUIRE(alone.status == 0);
  const auto a = nlohmann::json::parse(spread.out), b = nlohmann::json::parse(alone.out);
  CHECK(a.at("world_size") == 2);
  CHECK(a.at("windows").get<int>() > 4);
  CHECK(a.at("tokens") == b.at("tokens"));
  CHECK(a.at("nll").get<double>() == b.at("nll").get<double>());
  CHECK(a.at("ppl").get<double>() == b.at("ppl").get<double>());
}

TEST_CASE("mpirun -np 2 qlora train --resume: the uninterrupted run's bytes; another world size is refused") {
  if (!mpirun_available() || !shared_file_present(kStories260K)) return;
  const fs::path straight = qlora::test::fresh_output_path("mpi-straight"), resumed = qlora::test::fresh_output_path("mpi-resumed");
  REQUIRE(run_qlora(train_args(straight, 4), mpirun(2)).status == 0);
  REQUIRE(run_qlora(train_args(resumed, 2), mpirun(2)).status == 0);
  const Result r = run_qlora(train_args(resumed, 4, "--resume " + resumed.string()), mpirun(2));
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.err.find("resumed from") != std::string::npos);
  CHECK(qlora::test::read_raw(resumed / "adapter/adapter.safetensors") ==
        qlora::test::read_raw(straight / "adapter/adapter.safetensors"));
  // One process may not continue what two started.
  const Result other = run_qlora(train_args(resumed, 6, "--resume " + resumed.string()));
  CHECK(other.status != 0);
  CHECK(other.err.find("written by 2 processes, this run has 1") != std::string::npos);
}
