// qlora export round trips: each export is read back by an independent path (our safetensors / HF / GGUF
// readers, not the writer) and compared with the in-memory model that carries the adapter. The library
// functions run on a seeded random Llama with a trained-looking (non-zero) Q-BLoRA adapter on an INT4 base;
// the tool end to end runs on ../shared/data's stories260K (skipped with a message where it is absent).

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <nlohmann/json.hpp>

#include "support/shared_data.hpp"
#include "tool_runner.hpp"

#include "models/llama/load.hpp"
#include "qlora/io/tokenizer_load.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/train/adapter_files.hpp"
#include "qlora/train/export.hpp"

namespace fs = std::filesystem;
namespace ml = qlora::models::llama;
using namespace qlora;

namespace {


ml::Config tiny_config() {
  ml::Config c;
  c.hidden_size = 64;
  c.intermediate_size = 96;  // rows of 32-value blocks everywhere, so Q8_0 / Q4_1 cover every matrix
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 96;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

ml::LoadOptions adapted(nn::AdapterKind kind) {
  ml::LoadOptions o;
  o.quant = quant::QuantConfig::parse("int4-g32");
  o.adapter.kind = kind;
  o.adapter.rank = 4;
  o.adapter.alpha = 8;
  return o;
}

// Adapters as after training: every parameter random (B starts at zero, which would test nothing).
void randomize_adapters(ml::Model& m, std::uint64_t seed) {
  std::uint64_t i = 0;
  for (autograd::Param* p : m.params()) p->value.copy_from(ops::randn(p->value.shape(), seed + i++, Device::cpu(), 0.f, 0.05f));
}

std::vector<float> logits_of(ml::Model& m, const std::vector<std::int32_t>& ids) {
  const Tensor l = m.logits(Tensor::from(ids, Shape{1, std::int64_t(ids.size())}));
  const float* p = l.data<float>();
  return {p, p + l.numel()};
}

// ||a - b|| / ||b||.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), den += double(b[i]) * b[i];
  return std::sqrt(num / den);
}

const std::vector<std::int32_t> kIds = {1, 17, 5, 88, 42, 3, 60, 9, 31, 77, 12, 50};

}  // namespace

TEST_CASE("export peft: Q-BLoRA as a plain LoRA of rank 2r whose scale B A is each layer's delta") {
  ml::Model model = ml::random_model(tiny_config(), adapted(nn::AdapterKind::qblora), 7);
  randomize_adapters(model, 100);
  ml::Model base = ml::random_model(tiny_config(), adapted(nn::AdapterKind::none), 7);  // the same INT4 base
  const fs::path out = qlora::test::fresh_output_path("peft");
  train::export_peft(model, out, {"my/base"});

  std::ifstream in(out / "adapter_config.json");
  const nlohmann::json config = nlohmann::json::parse(in);
  CHECK(config.at("peft_type") == "LORA");
  CHECK(config.at("task_type") == "CAUSAL_LM");
  CHECK(config.at("r") == 8);                 // Q-BLoRA r' = 2r
  CHECK(config.at("lora_alpha").get<double>() == doctest::Approx(16.0));  // s * r' = (8 / 4) * 8
  CHECK(config.at("lora_dropout").get<double>() == 0.0);
  CHECK(config.at("bias") == "none");
  CHECK(config.at("fan_in_fan_out") == false);
  CHECK(config.at("inference_mode") == true);
  CHECK(config.at("base_model_name_or_path") == "my/base");
  CHECK(config.at("target_modules") ==
        nlohmann::json({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}));
  CHECK(config.at("rank_pattern").empty());

  const io::SafetensorsFile file(out / "adapter_model.safetensors");
  CHECK(file.contains("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"));
  const double scaling = config.at("lora_alpha").get<double>() / config.at("r").get<double>();
  for (std::int64_t layer = 0; layer < model.num_layers(); ++layer)
    for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
      const nn::Linear& linear = model.block(layer).linear(ml::DecoderBlock::Proj(p));
      const std::string prefix = "base_model.model." + linear.name();
      const Tensor a = file.load(prefix + ".lora_A.weight").to(DType::f32);
      const Tensor b = file.load(prefix + ".lora_B.weight").to(DType::f32);
      REQUIRE(a.shape() == Shape{8, linear.in_features()});
      REQUIRE(b.shape() == Shape{linear.out_features(), 8});
      const Tensor merged = linear.merged_weight(), w = base.block(layer).linear(ml::DecoderBlock::Proj(p)).merged_weight();
      double num = 0, den = 0;
      for (std::int64_t o = 0; o < linear.out_features(); ++o)
        for (std::int64_t i = 0; i < linear.in_features(); ++i) {
          double peft = 0;  // PEFT's delta: scaling * B A
          for (std::int64_t j = 0; j < 8; ++j) peft += double(b.data<float>()[o * 8 + j]) * a.data<float>()[j * linear.in_features() + i];
          const std::int64_t at = o * linear.in_features() + i;
          const double delta = double(merged.data<float>()[at]) - w.data<float>()[at];
          num += (scaling * peft - delta) * (scaling * peft - delta), den += delta * delta;
        }
      INFO(linear.name());
      CHECK(den > 0);
      CHECK(std::sqrt(num / den) < 1e-5);
    }
}

TEST_CASE("export peft: refuses a hira adapter and a model without adapters, leaving no output") {
  ml::Model hira = ml::random_model(tiny_config(), adapted(nn::AdapterKind::hira), 7);
  const fs::path out = qlora::test::fresh_output_path("peft-hira");
  CHECK_THROWS_WITH_AS(train::export_peft(hira, out), doctest::Contains("hira"), Error);
  CHECK_FALSE(fs::exists(out));
  ml::Model plain = ml::random_model(tiny_config(), adapted(nn::AdapterKind::none), 7);
  CHECK_THROWS_WITH_AS(train::export_peft(plain, out), doctest::Contains("no adapter"), Error);
  CHECK_FALSE(fs::exists(out));
}

TEST_CASE("export hf: the merged checkpoint loads back with the adapted model's logits") {
  ml::Model model = ml::random_model(tiny_config(), adapted(nn::AdapterKind::qblora), 7);
  randomize_adapters(model, 200);
  const std::vector<float> expected = logits_of(model, kIds);
  for (const auto& [dtype, tolerance] : {std::pair{DType::f32, 1e-5}, std::pair{DType::bf16, 2e-2}}) {
    const fs::path out = qlora::test::fresh_output_path(std::string("hf-") + std::string(dtype_name(dtype)));
    train::export_hf(model, out, dtype);
    CHECK(fs::exists(out / "config.json"));
    const io::SafetensorsFile file(out / "model.safetensors");
    CHECK(file.entry("model.layers.0.self_attn.q_proj.weight").dtype == dtype);
    ml::Model back = ml::load_model(out);
    INFO(dtype_name(dtype));
    CHECK(back.config().torch_dtype == (dtype == DType::f32 ? "float32" : "bfloat16"));
    const double err = relative_error(logits_of(back, kIds), expected);
    CHECK(err < tolerance);
    CHECK(err > 0);  // bf16 rounds; f32 differs by the merge's own rounding (the adapter path is not W + dW)
  }
}

TEST_CASE("export gguf: f16, q8_0 and q4_1 files load back close to the adapted model") {
  ml::Model model = ml::random_model(tiny_config(), adapted(nn::AdapterKind::qblora), 7);
  randomize_adapters(model, 300);
  const std::vector<float> expected = logits_of(model, kIds);
  // Tolerances: f16 (11-bit mantissa) and q8_0 as the issue states; q4_1 re-quantizes to 4 bits (merged
  // weights are off the INT4 grid), so only a loose bound.
  for (const auto& [type, tolerance] : {std::pair{io::GgmlType::F16, 1e-2}, std::pair{io::GgmlType::Q8_0, 5e-2},
                                        std::pair{io::GgmlType::Q4_1, 0.5}}) {
    INFO(io::ggml_type_name(std::uint32_t(type)));
    const fs::path out = qlora::test::fresh_output_path("model-" + io::ggml_type_name(std::uint32_t(type)) + ".gguf");
    train::export_gguf(model, out, type, std::nullopt, "tiny");
    const io::GgufFile file(out);
    CHECK(file.get_string("general.architecture") == "llama");
    CHECK(file.get_int("llama.block_count") == 2);
    CHECK(file.get_int("llama.attention.head_count_kv") == 2);
    CHECK(file.get_int("llama.feed_forward_length") == 96);
    CHECK(file.tensor("blk.1.ffn_down.weight").type == std::uint32_t(type));
    CHECK(file.tensor("blk.0.attn_norm.weight").type == std::uint32_t(io::GgmlType::F32));
    CHECK(file.contains("output.weight"));
    ml::Model back = ml::load_model(out);
    const double err = relative_error(logits_of(back, kIds), expected);
    CHECK(err < tolerance);
  }
}

TEST_CASE("export gguf: the q/k permutation round-trips exactly through an f32 file") {
  // F32 matrices: no rounding, so the reloaded logits match to f32 accuracy only if q/k were permuted to
  // llama.cpp's interleaved order and the reader undid it.
  ml::Model model = ml::random_model(tiny_config(), adapted(nn::AdapterKind::lora), 9);
  randomize_adapters(model, 400);
  const fs::path out = qlora::test::fresh_output_path("model-f32.gguf");
  train::export_gguf(model, out, io::GgmlType::F32);
  ml::Model back = ml::load_model(out);
  CHECK(relative_error(logits_of(back, kIds), logits_of(model, kIds)) < 1e-5);
}

// ------------------------------------------------------------------------------------- the tool

namespace {

using qlora::test::kStories260K;
using qlora::test::kStories260KTokenizer;
using qlora::test::shared_file_present;

using Result = qlora::test::ToolResult;
Result run_tool(const std::string& args) { return qlora::test::run_qlora("export " + args); }

// A trained-looking Q-BLoRA adapter on an INT4 group-32 base, as `qlora train` saves it; the model that
// carries it is returned for comparison.
ml::Model write_adapter(const fs::path& dir) {
  ml::LoadOptions o = adapted(nn::AdapterKind::qblora);
  ml::Model m = ml::load_model(kStories260K, o);
  randomize_adapters(m, 500);
  train::AdapterDescription d;
  d.adapter = o.adapter;
  d.targets = o.targets;
  d.quant = "int4-g32";
  d.base_model = "stories260K";
  train::save_adapter(dir, d, m.params());
  return m;
}

}  // namespace

TEST_CASE("qlora export: peft and gguf-q8_0 of stories260K with an adapter, read back") {
  if (!shared_file_present(kStories260K)) return;
  const fs::path adapter = qlora::test::fresh_output_path("tool-adapter"), peft = qlora::test::fresh_output_path("tool-peft"), gguf = qlora::test::fresh_output_path("tool.gguf");
  ml::Model model = write_adapter(adapter);

  Result r = run_tool(kStories260K.string() + " --tokenizer " + kStories260KTokenizer.string() + " --adapter " +
                   adapter.string() + " --to peft --out " + peft.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  std::ifstream in(peft / "adapter_config.json");
  const nlohmann::json config = nlohmann::json::parse(in);
  CHECK(config.at("r") == 8);
  CHECK(config.at("base_model_name_or_path") == "stories260K");
  const io::SafetensorsFile file(peft / "adapter_model.safetensors");
  CHECK(file.entries().size() == std::size_t(2 * 7 * model.num_layers()));
  const auto lora = model.block(4).linear(ml::DecoderBlock::v_proj).plain_lora();
  const Tensor a = file.load("base_model.model.model.layers.4.self_attn.v_proj.lora_A.weight");
  REQUIRE(a.shape() == lora->A.shape());
  CHECK(std::memcmp(a.data(), lora->A.data(), a.nbytes()) == 0);  // f32 written as is

  r = run_tool(kStories260K.string() + " --tokenizer " + kStories260KTokenizer.string() + " --adapter " +
            adapter.string() + " --to gguf-q8_0 --out " + gguf.string());
  REQUIRE(r.status == 0);
  const io::GgufFile g(gguf);
  CHECK(g.tensor("blk.0.attn_q.weight").type == std::uint32_t(io::GgmlType::Q8_0));
  CHECK(g.tensor("blk.0.ffn_down.weight").type == std::uint32_t(io::GgmlType::F16));  // 172 columns: not 32-value blocks
  CHECK_FALSE(g.contains("output.weight"));                              // stories260K ties its head
  ml::Model back = ml::load_model(gguf);
  CHECK(relative_error(logits_of(back, kIds), logits_of(model, kIds)) < 5e-2);
  // The embedded vocabulary tokenizes as tok512.bin does.
  const auto from_gguf = io::load_tokenizer(gguf), from_bin = io::load_tokenizer(kStories260KTokenizer);
  const std::string text = "Once upon a time, Lily saw a big red ball.";
  CHECK(from_gguf->encode(text, true, false) == from_bin->encode(text, true, false));
}

TEST_CASE("qlora export: bad input gives one line, a non-zero exit and no output") {
  if (!shared_file_present(kStories260K)) return;
  const fs::path out = qlora::test::fresh_output_path("tool-bad");
  Result r = run_tool(kStories260K.string() + " --to onnx --out " + out.string());
  CHECK(r.status != 0);
  CHECK(r.err.find("onnx") != std::string::npos);
  CHECK_FALSE(fs::exists(out));
  r = run_tool(kStories260K.string() + " --adapter " + (out.parent_path() / "no-such-adapter").string() +
            " --to peft --out " + out.string());
  CHECK(r.status != 0);
  CHECK(r.err.find("no-such-adapter") != std::string::npos);
  CHECK_FALSE(fs::exists(out));
  r = run_tool(kStories260K.string() + " --to peft --out " + out.string());  // no adapter to export
  CHECK(r.status != 0);
  CHECK(r.err.find("no adapter") != std::string::npos);
  CHECK_FALSE(fs::exists(out));
  fs::create_directories(out);
  r = run_tool(kStories260K.string() + " --to hf --out " + out.string());
  CHECK(r.status != 0);
  CHECK(r.err.find("already exists") != std::string::npos);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
}
