// The qlora tool end to end, as a user runs it: `train` on the real stories260K checkpoint (text and
// instruction data), resumption that ends with the same adapter as an uninterrupted run, `eval` of the
// base, quantized and adapted model, and bad input: one clear line on stderr, a non-zero exit, and no
// output directory left behind.

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "support/files.hpp"
#include "support/shared_data.hpp"
#include "tool_runner.hpp"

namespace fs = std::filesystem;

namespace {

using Result = qlora::test::ToolResult;
using qlora::test::kStories260K;
using qlora::test::kStories260KTokenizer;
using qlora::test::kTinyStoriesValid;
using qlora::test::run_qlora;
using qlora::test::shared_file_present;

std::string train_args(const fs::path& out, int steps, const std::string& extra = "") {
  return kStories260K.string() + " --tokenizer " + kStories260KTokenizer.string() + " --data " +
         kTinyStoriesValid.string() +
         " --format text --seq-len 64 --adapter qblora --rank 4 --alpha 8 --quant int4-g32 --lr 3e-3 --batch 4"
         " --micro-batch 2 --dropout 0.1 --steps " + std::to_string(steps) + " --out " + out.string() + " " + extra;
}

}  // namespace

TEST_CASE("cli: train writes adapter, checkpoints, metrics, loss curve and summary; the loss goes down") {
  if (!shared_file_present(kStories260K)) return;
  const fs::path out = qlora::test::fresh_output_path("train");
  const Result r = run_qlora("train " + train_args(out, 8, "--save-every 4 --eval-count 4"));
  INFO(r.err);
  REQUIRE(r.status == 0);
  for (const char* name : {"adapter/adapter.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss.svg",
                           "summary.json", "checkpoints/step-00000004/state.json", "checkpoints/step-00000008/state.json"})
    CHECK_MESSAGE(fs::exists(out / name), name);
  const auto summary = nlohmann::json::parse(qlora::test::read_raw(out / "summary.json"));
  CHECK(summary.at("steps") == 8);
  // Q-BLoRA at nominal r = 4 has LoRA's count r (d_in + d_out) per linear. stories260K (dim 64, hidden 172,
  // 4 KV heads of 8): q 64+64, k 64+32, v 64+32, o 64+64, gate 64+172, up 64+172, down 172+64 = 1156; 5 layers.
  CHECK(summary.at("trainable_parameters") == 4 * 1156 * 5);
  std::ifstream metrics(out / "metrics.jsonl");
  double first = NAN, last = NAN;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("loss")) continue;
    if (std::isnan(first)) first = j["loss"];
    last = j["loss"];
  }
  CHECK(last < first);
  CHECK(r.err.find("step 8/8") != std::string::npos);
}

TEST_CASE("cli: a resumed run ends with the same adapter as an uninterrupted one") {
  if (!shared_file_present(kStories260K)) return;
  const fs::path straight = qlora::test::fresh_output_path("straight"), resumed = qlora::test::fresh_output_path("resumed");
  REQUIRE(run_qlora("train " + train_args(straight, 6)).status == 0);
  REQUIRE(run_qlora("train " + train_args(resumed, 3)).status == 0);
  const Result r = run_qlora("train " + train_args(resumed, 6, "--resume " + resumed.string()));
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.err.find("resumed from") != std::string::npos);
  CHECK(qlora::test::read_raw(resumed / "adapter/adapter.safetensors") == qlora::test::read_raw(straight / "adapter/adapter.safetensors"));
  // A resume with another configuration is refused.
  const Result other = run_qlora("train " + train_args(resumed, 6, "--resume " + resumed.string() + " --seed 7"));
  CHECK(other.status != 0);
  CHECK(other.err.find("configured as") != std::string::npos);
}

TEST_CASE("cli: eval reports perplexity for the base, quantized and adapted model") {
  if (!shared_file_present(kStories260K)) return;
  const std::string base = kStories260K.string() + " --tokenizer " + kStories260KTokenizer.string() + " --ppl " +
                           kTinyStoriesValid.string() + " --seq-len 256 --json";
  const Result f32 = run_qlora("eval " + base);
  INFO(f32.err);
  REQUIRE(f32.status == 0);
  const auto a = nlohmann::json::parse(f32.out);
  CHECK(a.at("windows").get<int>() > 10);
  CHECK(a.at("tokens") == a.at("windows").get<int>() * 255);
  CHECK(a.at("ppl").get<double>() > 1.0);
  CHECK(a.at("ppl").get<double>() < 20.0);  // a trained TinyStories model on TinyStories text
  const auto q = nlohmann::json::parse(run_qlora("eval " + base + " --quant int2-g32").out);
  CHECK(q.at("ppl").get<double>() > a.at("ppl").get<double>());  // 2-bit costs accuracy

  const fs::path out = qlora::test::fresh_output_path("eval-adapter");
  REQUIRE(run_qlora("train " + train_args(out, 2)).status == 0);
  const Result adapted = run_qlora("eval " + base + " --adapter " + (out / "adapter").string());
  INFO(adapted.err);
  REQUIRE(adapted.status == 0);
  CHECK(nlohmann::json::parse(adapted.out).at("ppl").get<double>() > 1.0);
}

TEST_CASE("cli: bad input gives one clear line, a non-zero exit and no output directory") {
  if (!shared_file_present(kStories260K)) return;
  const fs::path dir = qlora::test::fresh_output_path("bad");
  fs::create_directories(dir);
  const fs::path out = dir / "out";
  auto expect_failure = [&](const std::string& args, const std::string& message) {
    CAPTURE(args);
    const Result r = run_qlora(args);
    CHECK(r.status != 0);
    CHECK_MESSAGE(r.err.find(message) != std::string::npos, r.err);
    CHECK(!fs::exists(out));
  };
  const std::string model = kStories260K.string() + " --tokenizer " + kStories260KTokenizer.string();
  expect_failure("train /nonexistent/model.bin --data x --out " + out.string(), "cannot open model");
  expect_failure("train " + model + " --data /nonexistent/data.json --out " + out.string(), "cannot open data");

  std::ofstream(dir / "broken.jsonl") << "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\",\n";
  expect_failure("train " + model + " --format jsonl --data " + (dir / "broken.jsonl").string() + " --out " + out.string(),
                 "broken.jsonl:2: not valid JSON");
  std::ofstream(dir / "empty.jsonl") << "\n";
  expect_failure("train " + model + " --format jsonl --data " + (dir / "empty.jsonl").string() + " --out " + out.string(),
                 "has no records");
  expect_failure("train " + model + " --format text --seq-len 4096 --data " + kTinyStoriesValid.string() + " --out " +
                     out.string(),
                 "longer than the model's context of 512");
  expect_failure("train " + model + " --data x --out " + out.string() + " --no-such-flag", "--no-such-flag");
  expect_failure("train " + model + " --quant int5-g64 --format text --data " + kTinyStoriesValid.string() + " --out " +
                     out.string(),
                 "unknown quantization format");
  expect_failure("eval " + model + " --ppl /nonexistent.txt", "cannot open /nonexistent.txt");
}

TEST_CASE("cli: demo pretrains, quantizes to 2 bits and recovers with Q-BLoRA, without any data files") {
  // A short version of the default run (which takes about a minute): the same pipeline, fewer steps.
  const fs::path out = qlora::test::fresh_output_path("demo");
  const Result r = run_qlora("demo --device cpu --pretrain-steps 120 --finetune-steps 60 --out " + out.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.out.find("| int2-g32 + Q-BLoRA |") != std::string::npos);
  const auto summary = nlohmann::json::parse(qlora::test::read_raw(out / "summary.json"));
  const auto& rows = summary.at("rows");
  REQUIRE(rows.size() == 5);
  const double f32 = rows[0].at("ppl"), int2 = rows[2].at("ppl"), recovered = rows[3].at("ppl");
  CHECK(f32 < 3.0);            // the pretrained model has learned the text (a 42-token alphabet)
  CHECK(int2 > f32 * 1.02);    // 2 bits hurt
  CHECK(recovered < int2);     // Q-BLoRA recovers
  CHECK(fs::exists(out / "model/model.safetensors"));
  CHECK(fs::exists(out / "qblora/adapter/adapter.safetensors"));
  // The GGUF file, read back, scores like the adapted model it was exported from (Q8_0 rounding only).
  const double exported = rows[4].at("ppl");
  CHECK(exported == doctest::Approx(recovered).epsilon(0.02));
  // The demo refuses to overwrite a previous run.
  const Result again = run_qlora("demo --out " + out.string());
  CHECK(again.status != 0);
  CHECK(again.err.find("exists and is not empty") != std::string::npos);
}
