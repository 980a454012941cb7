// `qlora train --rank-adaptive` end to end: on the tiny Llama (tests/support/tiny_llama.hpp, as a HF directory
// with the tiny BPE tokenizer) the ranks move under the budget, a resumed run ends with the uninterrupted run's
// adapter byte for byte, the adapter directory records rank_pattern and loads back in `qlora eval`, and the PEFT
// export carries PEFT's rank_pattern with tensors of those ranks; hira is refused with one line. On the real
// stories260K (int2 base, where ../shared/data exists) the run stays under its budget and the loss goes down.

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/io/safetensors.hpp"
#include "qlora/train/export.hpp"
#include "support/files.hpp"
#include "support/shared_data.hpp"
#include "support/tiny_llama.hpp"
#include "tiny_hf_model.hpp"
#include "tool_runner.hpp"

namespace fs = std::filesystem;
using namespace qlora;

namespace {

// The tiny Llama with the tiny BPE tokenizer as a HF directory, and a text to train on: built once per process.
const test::TinyHfModel& tiny() {
  static const test::TinyHfModel f = [] {
    std::string text;
    for (int i = 0; i < 60; ++i) text += "The quick brown fox " + std::to_string(i % 7) + " jumps over the lazy dog.\n";
    return test::write_tiny_hf_model("rank-adaptive-fixture", test::tiny_llama_config(), 5, 0.2f, text);
  }();
  return f;
}

// Rank 4 LoRA on an int4 base; an analysis after steps 2, 4, 6, 8 with a 2-rank margin, so layers grow and shrink.
std::string tiny_args(const fs::path& out, int steps, const std::string& extra = "") {
  return "train " + tiny().model.string() + " --data " + tiny().text.string() +
         " --format text --seq-len 16 --adapter lora --rank 4 --alpha 8 --quant int4-g0 --lr 3e-2 --batch 4"
         " --micro-batch 2 --dropout 0.1 --rank-adaptive --rank-every 2 --rank-stop 8 --rank-min 1 --rank-max 8"
         " --rank-margin 2 --rank-energy 0.8 --steps " + std::to_string(steps) + " --out " + out.string() + " " + extra;
}

std::vector<nlohmann::json> metrics_of(const fs::path& out) {
  std::vector<nlohmann::json> v;
  std::ifstream in(out / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) v.push_back(nlohmann::json::parse(line));
  return v;
}

}  // namespace

TEST_CASE("qlora train --rank-adaptive (tiny Llama): budget, resume, rank_pattern, eval and PEFT export") {
  const fs::path straight = test::fresh_output_path("ra-straight");
  const test::ToolResult r = test::run_qlora(tiny_args(straight, 10));
  INFO(r.err);
  REQUIRE(r.status == 0);
  // Budget: LoRA r = 4 on q (16+16), k (16+8), v (16+8), o (16+16), gate, up (16+24), down (24+16): 232 x 4 per
  // block, 2 blocks.
  CHECK(r.err.find("rank-adaptive: budget 1856 parameters") != std::string::npos);
  std::int64_t adjustments = 0;
  bool moved = false;
  for (const auto& j : metrics_of(straight)) {
    if (!j.contains("rank_adjustment")) continue;
    ++adjustments;
    const auto& a = j["rank_adjustment"];
    CHECK(a["parameters"].get<std::int64_t>() <= 1856);
    CHECK(a["budget"] == 1856);
    for (const auto& [layer, rank] : a["ranks"].items()) moved = moved || rank != 4;
  }
  CHECK(adjustments == 4);  // steps 2, 4, 6, 8
  CHECK(moved);
  const auto summary = nlohmann::json::parse(test::read_raw(straight / "summary.json"));
  CHECK(summary["trainable_parameters"].get<std::int64_t>() <= 1856);
  const auto config = nlohmann::json::parse(test::read_raw(straight / "adapter/adapter_config.json"));
  REQUIRE(config.contains("rank_pattern"));
  CHECK(config["rank"] == 4);
  {
    const io::SafetensorsFile file(straight / "adapter/adapter.safetensors");
    for (const auto& [layer, rank] : config["rank_pattern"].items()) {
      CHECK(rank != 4);
      CHECK(file.load(layer + ".lora_A").dim(0) == rank.get<std::int64_t>());
    }
  }

  // Killed after step 5 (checkpoints at 3 and 5), resumed to 10: the same adapter, byte for byte.
  const fs::path resumed = test::fresh_output_path("ra-resumed");
  REQUIRE(test::run_qlora(tiny_args(resumed, 5, "--save-every 3")).status == 0);
  fs::remove_all(resumed / "checkpoints/step-00000005");  // resume from step 3, between two analyses
  const test::ToolResult again = test::run_qlora(tiny_args(resumed, 10, "--save-every 3 --resume " + resumed.string()));
  INFO(again.err);
  REQUIRE(again.status == 0);
  CHECK(again.err.find("at step 3") != std::string::npos);
  CHECK(test::read_raw(resumed / "adapter/adapter.safetensors") == test::read_raw(straight / "adapter/adapter.safetensors"));
  CHECK(test::read_raw(resumed / "adapter/adapter_config.json") == test::read_raw(straight / "adapter/adapter_config.json"));
  // Other rank-adaptive settings are another run.
  const test::ToolResult other = test::run_qlora(tiny_args(resumed, 10, "--rank-margin 3 --resume " + resumed.string()));
  CHECK(other.status != 0);

  // eval rebuilds the per-layer ranks from adapter_config.json.
  const test::ToolResult eval =
      test::run_qlora("eval " + tiny().model.string() + " --adapter " + (straight / "adapter").string() + " --ppl " +
                      tiny().text.string() + " --seq-len 16 --json");
  INFO(eval.err);
  CHECK(eval.status == 0);

  // PEFT: rank_pattern / alpha_pattern so that PEFT builds each layer at its rank with scaling alpha / r_init.
  const fs::path peft = test::fresh_output_path("ra-peft");
  const test::ToolResult e = test::run_qlora("export " + tiny().model.string() + " --adapter " + (straight / "adapter").string() +
                                             " --to peft --out " + peft.string());
  INFO(e.err);
  REQUIRE(e.status == 0);
  const auto pc = nlohmann::json::parse(test::read_raw(peft / "adapter_config.json"));
  REQUIRE(!pc["rank_pattern"].empty());
  const io::SafetensorsFile tensors(peft / "adapter_model.safetensors");
  const std::int64_t peft_r = pc["r"];
  for (const auto& layer_rank : config["rank_pattern"].items()) {
    const std::string layer = layer_rank.key();
    const std::int64_t rank = layer_rank.value();
    const std::int64_t peft_rank = pc["rank_pattern"].contains(layer) ? pc["rank_pattern"][layer].get<std::int64_t>() : peft_r;
    CHECK(peft_rank == rank);
    CHECK(tensors.load(train::peft_key(layer, 'A')).dim(0) == rank);
    const double alpha = pc["alpha_pattern"].contains(layer) ? pc["alpha_pattern"][layer].get<double>() : pc["lora_alpha"].get<double>();
    CHECK(alpha / double(rank) == doctest::Approx(8.0 / 4.0));  // s = alpha / r_init everywhere
  }

  // hira has no rank: refused before OUT exists.
  const fs::path hira = test::fresh_output_path("ra-hira");
  std::string args = tiny_args(hira, 2);
  args.replace(args.find("--adapter lora"), 14, "--adapter hira");
  const test::ToolResult refused = test::run_qlora(args);
  CHECK(refused.status != 0);
  CHECK(refused.err.find("has no rank to adapt") != std::string::npos);
  CHECK(!fs::exists(hira));
}

TEST_CASE("qlora train --rank-adaptive on stories260K (int2): under the budget, the loss goes down") {
  if (!test::shared_file_present(test::kStories260K)) return;
  const fs::path out = test::fresh_output_path("ra-stories");
  const test::ToolResult r = test::run_qlora(
      "train " + test::kStories260K.string() + " --tokenizer " + test::kStories260KTokenizer.string() + " --data " +
      test::kTinyStoriesValid.string() +
      " --format text --seq-len 64 --adapter lora --rank 4 --alpha 8 --quant int2-g32 --lr 1e-2 --batch 4"
      " --micro-batch 2 --steps 12 --rank-adaptive --rank-every 3 --rank-stop 9 --rank-min 1 --rank-max 8 --rank-margin 1 --out " +
      out.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  // LoRA r = 4 on stories260K's 35 block linears: 4 x 1156 per layer (tests/tools/cli_test.cpp), 5 layers.
  const std::int64_t budget = 4 * 1156 * 5;
  std::vector<double> losses;
  std::int64_t adjustments = 0;
  bool moved = false;
  for (const auto& j : metrics_of(out)) {
    if (j.contains("loss")) losses.push_back(j["loss"].get<double>());
    if (j.contains("rank_adjustment")) {
      ++adjustments;
      CHECK(j["rank_adjustment"]["parameters"].get<std::int64_t>() <= budget);
      for (const auto& [layer, rank] : j["rank_adjustment"]["ranks"].items()) moved = moved || rank != 4;
      MESSAGE("step " << j["step"] << ": " << j["rank_adjustment"]["parameters"] << " parameters");
    }
  }
  CHECK(adjustments == 3);
  CHECK(moved);  // measured: ranks 3..5 from step 3 on
  REQUIRE(losses.size() == 12);
  for (double l : losses) CHECK(std::isfinite(l));
  CHECK(losses.back() < losses.front());
  const auto summary = nlohmann::json::parse(test::read_raw(out / "summary.json"));
  CHECK(summary["trainable_parameters"].get<std::int64_t>() <= budget);
}
