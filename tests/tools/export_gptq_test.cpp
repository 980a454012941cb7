// qlora export --to gptq (train/export_gptq.hpp, docs/export.md): the packed GPTQ tensors are read back and
// dequantized here by an independent re-implementation of AutoGPTQ's formula (qlinear_cuda_old.py, forward's
// torch path: shift, mask with 2^b - 1, zeros + 1 for the v1 "gptq" format, w = scales * (code - zero)), and
// compared with our in-memory dequantized weights. Tolerance: none (bit-exact f32). Our grid already stores
// f16 scales and integer zeros, and scale * (code - zero) is one f32 product of an f16 value and an integer
// below 2^9, exact in f32 on both sides. Also here: the tool's bad input, and (issue 7 item 3.4) a GGUF
// export from a Hugging Face directory that has no tokenizer files.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tool_runner.hpp"

#include "models/llama/load.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/quantize.hpp"
#include "qlora/train/adapter_files.hpp"
#include "qlora/train/export.hpp"
#include "qlora/train/export_gptq.hpp"
#include "support/files.hpp"
#include "support/shared_data.hpp"

namespace fs = std::filesystem;
namespace ml = qlora::models::llama;
using namespace qlora;

namespace {

// AutoGPTQ's unpacking of `count` codes from the words words[0], words[stride], ..., written from
// qlinear_cuda_old.py's forward (torch path). 2, 4, 8 bits: word >> wf with wf = 0, b, 2b, ..., masked.
// 3 bits, per three words: shifts by the rows of wf below (arithmetic shifts of int32), the two codes that
// straddle words patched from the next word's low bits, masked with 7, then concatenated as
// [row 0 entries 0..10, row 1 entries 1..11, row 2 entries 1..10].
std::vector<std::uint32_t> autogptq_unpack(const std::int32_t* words, std::int64_t stride, std::int64_t count, int bits) {
  std::vector<std::uint32_t> codes;
  if (bits != 3) {
    const std::int64_t per_word = 32 / bits;
    for (std::int64_t i = 0; i < count; ++i)
      codes.push_back((std::uint32_t(words[(i / per_word) * stride]) >> (bits * (i % per_word))) & ((1u << bits) - 1u));
    return codes;
  }
  static constexpr int wf[3][12] = {{0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0},
                                    {0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31},
                                    {0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0}};
  for (std::int64_t t = 0; t < count / 32; ++t) {
    std::int32_t a[3][12];
    for (int r = 0; r < 3; ++r)
      for (int k = 0; k < 12; ++k) a[r][k] = words[(3 * t + r) * stride] >> wf[r][k];
    a[0][10] = (a[0][10] & 0x3) | ((a[1][0] << 2) & 0x4);
    a[1][11] = (a[1][11] & 0x1) | ((a[2][0] << 1) & 0x6);
    for (int k = 0; k <= 10; ++k) codes.push_back(std::uint32_t(a[0][k] & 0x7));
    for (int k = 1; k <= 11; ++k) codes.push_back(std::uint32_t(a[1][k] & 0x7));
    for (int k = 1; k <= 10; ++k) codes.push_back(std::uint32_t(a[2][k] & 0x7));
  }
  return codes;
}

// AutoGPTQ's dequantization of one linear (the forward's torch path): weight [in, out] =
// scales[g_idx[i], o] * (unpacked qweight - (unpacked qzeros + zero_offset)). Returned as W [out, in] (ours
// is row-major out x in).
std::vector<float> autogptq_dequantize(const Tensor& qweight, const Tensor& qzeros, const Tensor& scales, const Tensor& g_idx,
                                       int bits, int zero_offset) {
  const std::int64_t in = qweight.dim(0) * 32 / bits, out = qweight.dim(1), groups = qzeros.dim(0);
  REQUIRE(qweight.dtype() == DType::i32);
  REQUIRE(qzeros.dtype() == DType::i32);
  REQUIRE(scales.dtype() == DType::f16);
  REQUIRE(g_idx.dtype() == DType::i32);
  REQUIRE(g_idx.numel() == in);
  REQUIRE(qzeros.dim(1) * 32 / bits == out);
  REQUIRE(scales.dim(1) == out);
  std::vector<std::vector<std::uint32_t>> zeros;  // per group, along the output dimension
  for (std::int64_t g = 0; g < groups; ++g) zeros.push_back(autogptq_unpack(qzeros.data<std::int32_t>() + g * qzeros.dim(1), 1, out, bits));
  std::vector<float> w(std::size_t(out * in));
  for (std::int64_t o = 0; o < out; ++o) {
    const std::vector<std::uint32_t> codes = autogptq_unpack(qweight.data<std::int32_t>() + o, out, in, bits);
    for (std::int64_t i = 0; i < in; ++i) {
      const std::int64_t g = g_idx.data<std::int32_t>()[i];
      const float zero = float(zeros[std::size_t(g)][std::size_t(o)] + std::uint32_t(zero_offset));
      w[std::size_t(o * in + i)] = to_float(scales.data<f16>()[g * out + o]) * (float(codes[std::size_t(i)]) - zero);
    }
  }
  return w;
}

std::vector<float> values_of(const Tensor& t) {
  const Tensor f = t.to(DType::f32);
  return {f.data<float>(), f.data<float>() + f.numel()};
}

ml::Config tiny_config() {
  ml::Config c;
  c.hidden_size = 64;
  c.intermediate_size = 96;  // multiples of 16: whole int32 words at 2, 4 and 8 bits
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 96;
  c.max_position_embeddings = 64;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  return c;
}

ml::Model tiny_model(const char* quant, nn::AdapterKind adapter, std::uint64_t seed) {
  ml::LoadOptions o;
  if (quant) o.quant = quant::QuantConfig::parse(quant);
  o.adapter.kind = adapter;
  o.adapter.rank = 4;
  o.adapter.alpha = 8;
  ml::Model m = ml::random_model(tiny_config(), o, seed);
  std::uint64_t i = 0;  // as after training: B is not zero
  for (autograd::Param* p : m.params()) p->value.copy_from(ops::randn(p->value.shape(), seed + 50 + i++, Device::cpu(), 0.f, 0.05f));
  return m;
}

nlohmann::json read_json(const fs::path& p) {
  std::ifstream in(p);
  return nlohmann::json::parse(in);
}

// Every block linear of `out` (a GPTQ export) against `expected(linear)` (our dequantized W), bit-exact.
template <class Expected>
void check_gptq_directory(const fs::path& out, ml::Model& model, int bits, int zero_offset, Expected expected) {
  const io::SafetensorsFile file(out / "model.safetensors");
  for (std::int64_t layer = 0; layer < model.num_layers(); ++layer)
    for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
      const nn::Linear& linear = model.block(layer).linear(ml::DecoderBlock::Proj(p));
      const std::string n = linear.name();
      INFO(n);
      CHECK(file.load(n + ".qweight").shape() == Shape{linear.in_features() * bits / 32, linear.out_features()});
      const std::vector<float> got = autogptq_dequantize(file.load(n + ".qweight"), file.load(n + ".qzeros"),
                                                         file.load(n + ".scales"), file.load(n + ".g_idx"), bits, zero_offset);
      CHECK(got == values_of(expected(linear)));
      CHECK_FALSE(file.contains(n + ".weight"));
    }
  // Non-quantized tensors in f16.
  CHECK(file.entry("model.embed_tokens.weight").dtype == DType::f16);
  CHECK(values_of(file.load("model.embed_tokens.weight")) == values_of(model.embedding().to(DType::f16)));
  CHECK(file.entry("model.norm.weight").dtype == DType::f16);
}

using Result = qlora::test::ToolResult;
Result run_tool(const std::string& args) { return qlora::test::run_qlora(args); }

const fs::path kStories = qlora::test::kStories260K;
const fs::path kStoriesTokenizer = qlora::test::kStories260KTokenizer;

}  // namespace

TEST_CASE("gptq packing: AutoGPTQ's dequantization of qweight/qzeros/scales/g_idx gives our weights exactly") {
  // 64 outputs x 128 inputs: whole words at 2, 3, 4 and 8 bits along both dimensions.
  const std::vector<float> values = [] {
    const Tensor t = ops::randn(Shape{64, 128}, 3, Device::cpu(), 0.f, 0.02f);
    return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
  }();
  const Tensor w = Tensor::from(values, Shape{64, 128});
  struct Case {
    const char* format;
    train::GptqCheckpointFormat checkpoint;
  };
  // v1 with asymmetric and symmetric grids; v2 where 2-bit asymmetric grids have zero points of 0.
  for (const Case c : {Case{"int4-g32", train::GptqCheckpointFormat::gptq}, Case{"int4-g64-sym", train::GptqCheckpointFormat::gptq},
                       Case{"int8-g0", train::GptqCheckpointFormat::gptq}, Case{"int2-g16-sym", train::GptqCheckpointFormat::gptq},
                       Case{"int2-g32", train::GptqCheckpointFormat::gptq_v2}, Case{"int4-g128-fz", train::GptqCheckpointFormat::gptq_v2},
                       Case{"int3-g32", train::GptqCheckpointFormat::gptq}, Case{"int3-g64-sym", train::GptqCheckpointFormat::gptq},
                       Case{"int3-g0", train::GptqCheckpointFormat::gptq_v2}}) {
    INFO(c.format);
    const quant::QuantizedTensor q = quant::quantize(w, quant::QuantConfig::parse(c.format));
    const train::GptqLinear g = train::pack_gptq_linear(q, c.checkpoint, "layer");
    const int bits = q.config.bits;
    const std::int64_t groups = q.groups_per_row();
    CHECK(g.qweight.shape() == Shape{128 * bits / 32, 64});
    CHECK(g.qzeros.shape() == Shape{groups, 64 * bits / 32});
    CHECK(g.scales.shape() == Shape{groups, 64});
    CHECK(g.g_idx.shape() == Shape{128});
    CHECK(g.g_idx.data<std::int32_t>()[127] == std::int32_t(127 / q.group_size()));
    const std::vector<float> got =
        autogptq_dequantize(g.qweight, g.qzeros, g.scales, g.g_idx, bits, train::gptq_zero_offset(c.checkpoint));
    CHECK(got == values_of(quant::dequantize(q)));
  }
  // The low bits of word 0 hold code (row 0, column 0): "low nibble first" along the input dimension.
  const quant::QuantizedTensor q = quant::quantize(w, quant::QuantConfig::parse("int4-g32"));
  const train::GptqLinear g = train::pack_gptq_linear(q, train::GptqCheckpointFormat::gptq, "layer");
  CHECK((std::uint32_t(g.qweight.data<std::int32_t>()[0]) & 0xf) == (q.codes.data<std::uint8_t>()[0] & 0xf));
  CHECK(((std::uint32_t(g.qweight.data<std::int32_t>()[0]) >> 4) & 0xf) == (q.codes.data<std::uint8_t>()[0] >> 4));
}

TEST_CASE("gptq packing: formats and grids without a GPTQ form are refused, naming the layer") {
  const Tensor w = ops::randn(Shape{48, 128}, 5, Device::cpu(), 0.f, 0.02f);
  const auto refusal = [&](const char* format) {
    const quant::QuantizedTensor q = quant::quantize(w, quant::QuantConfig::parse(format));
    return test::error_of([&] { train::pack_gptq_linear(q, train::GptqCheckpointFormat::gptq, "my.layer"); });
  };
  CHECK(refusal("nf4").find("my.layer: nf4 has no GPTQ form") != std::string::npos);
  CHECK(refusal("dint4-g32").find("dINT") != std::string::npos);
  // 3-bit codes fill whole words 32 at a time: 48 outputs are refused (the zeros are packed along them).
  CHECK(refusal("int3-g32").find("multiples of 32") != std::string::npos);
  // 100 input features are not whole words of eight 4-bit codes; a group of 64 does not divide 96 inputs.
  const quant::QuantizedTensor narrow = quant::quantize(ops::randn(Shape{48, 100}, 6, Device::cpu(), 0.f, 0.02f),
                                                        quant::QuantConfig::parse("int4-g0"));
  CHECK(test::error_of([&] { train::pack_gptq_linear(narrow, train::GptqCheckpointFormat::gptq, "n"); })
            .find("multiples of 8") != std::string::npos);
  const quant::QuantizedTensor ragged = quant::quantize(ops::randn(Shape{48, 96}, 7, Device::cpu(), 0.f, 0.02f),
                                                        quant::QuantConfig::parse("int8-g64"));
  CHECK(test::error_of([&] { train::pack_gptq_linear(ragged, train::GptqCheckpointFormat::gptq, "r"); })
            .find("does not divide") != std::string::npos);
  // A zero point of 0: v1 stores zero - 1, so it has no v1 form; v2 holds it.
  quant::QuantizedTensor zero0 = quant::quantize(w, quant::QuantConfig::parse("int4-g32"));
  zero0.zeros.data<std::uint8_t>()[5] = 0;
  const std::string v1 = test::error_of([&] { train::pack_gptq_linear(zero0, train::GptqCheckpointFormat::gptq, "z"); });
  CHECK(v1.find("z has 1 group(s) whose zero point is 0") != std::string::npos);
  CHECK(v1.find("gptq_v2") != std::string::npos);
  const train::GptqLinear v2 = train::pack_gptq_linear(zero0, train::GptqCheckpointFormat::gptq_v2, "z");
  CHECK(autogptq_dequantize(v2.qweight, v2.qzeros, v2.scales, v2.g_idx, 4, 0) == values_of(quant::dequantize(zero0)));
  // A fractional zero point (an adapter merged into f32 zeros) is not an integer GPTQ zero.
  quant::QuantizedTensor fractional = quant::quantize(w, quant::QuantConfig::parse("int4-g32-fz"));
  fractional.zeros.data<float>()[3] = 7.25f;
  CHECK(test::error_of([&] { train::pack_gptq_linear(fractional, train::GptqCheckpointFormat::gptq_v2, "f"); })
            .find("fractional zero point 7.25") != std::string::npos);
}

TEST_CASE("export gptq: a model with an adapter is merged, RTN-quantized and written exactly") {
  ml::Model model = tiny_model("int4-g32", nn::AdapterKind::qablora, 21);
  const test::TempDir dir;
  train::GptqExportOptions options;
  options.requantize = quant::QuantConfig::parse("int4-g32-sym");
  const auto result = train::export_gptq(model, dir / "gptq", options);
  CHECK(result.format.name() == "int4-g32-sym");
  CHECK(result.tokenizer_files.empty());
  check_gptq_directory(dir / "gptq", model, 4, 1, [&](const nn::Linear& linear) {
    return quant::dequantize(quant::quantize(linear.merged_weight(DType::f32), *options.requantize));
  });
  const nlohmann::json q = read_json(dir / "gptq" / "quantize_config.json");
  CHECK(q.at("bits") == 4);
  CHECK(q.at("group_size") == 32);
  CHECK(q.at("sym") == true);
  CHECK(q.at("desc_act") == false);
  CHECK(q.at("checkpoint_format") == "gptq");
  CHECK(q.at("quant_method") == "gptq");
  CHECK(q.at("model_file_base_name") == "model");
  const nlohmann::json config = read_json(dir / "gptq" / "config.json");
  CHECK(config.at("quantization_config") == q);
  CHECK(config.at("torch_dtype") == "float16");
  CHECK(config.at("tie_word_embeddings") == false);
  CHECK(io::SafetensorsFile(dir / "gptq" / "model.safetensors").entry("lm_head.weight").dtype == DType::f16);

  // Without a format to re-quantize into, an adapter (or a dense base) is refused and nothing is written.
  CHECK(test::error_of([&] { train::export_gptq(model, dir / "refused"); }).find("carries an adapter") != std::string::npos);
  ml::Model dense = tiny_model(nullptr, nn::AdapterKind::none, 22);
  CHECK(test::error_of([&] { train::export_gptq(dense, dir / "refused"); }).find("dense base") != std::string::npos);
  options.requantize = quant::QuantConfig::parse("nf4");
  CHECK(test::error_of([&] { train::export_gptq(dense, dir / "refused", options); }).find("no GPTQ form") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "refused"));
}

TEST_CASE("qlora quantize -> qlora export --to gptq: every layer dequantizes to the quantized model's weights") {
  const fs::path hf = test::fresh_output_path("gptq-src"), quantized = test::fresh_output_path("gptq-q"),
                 out = test::fresh_output_path("gptq-out"), out_v2 = test::fresh_output_path("gptq-out-v2");
  {
    ml::Model dense = tiny_model(nullptr, nn::AdapterKind::none, 31);
    train::export_hf(dense, hf, DType::f32);
  }
  Result r = run_tool("quantize " + hf.string() + " --method rtn --format int4-g32 --out " + quantized.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_tool("export " + quantized.string() + " --to gptq --out " + out.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.out.find("int4-g32") != std::string::npos);
  ml::Model model = ml::load_model(quantized);  // the stored codes, exactly
  check_gptq_directory(out, model, 4, 1, [](const nn::Linear& linear) { return linear.merged_weight(DType::f32); });
  const nlohmann::json q = read_json(out / "quantize_config.json");
  CHECK(q.at("sym") == false);
  CHECK(q.at("damp_percent") == 0.01);
  CHECK(read_json(out / "config.json").at("quantization_config").at("quant_method") == "gptq");

  r = run_tool("export " + quantized.string() + " --to gptq --gptq-format gptq_v2 --out " + out_v2.string());
  REQUIRE(r.status == 0);
  check_gptq_directory(out_v2, model, 4, 0, [](const nn::Linear& linear) { return linear.merged_weight(DType::f32); });
  CHECK(read_json(out_v2 / "quantize_config.json").at("checkpoint_format") == "gptq_v2");

  // 3 bits: codes straddle int32 words (AutoGPTQ's 3-bit unpacking above reads them).
  const fs::path quantized3 = test::fresh_output_path("gptq-q3"), out3 = test::fresh_output_path("gptq-out3");
  r = run_tool("quantize " + hf.string() + " --method rtn --format int3-g32 --out " + quantized3.string());
  REQUIRE(r.status == 0);
  r = run_tool("export " + quantized3.string() + " --to gptq --out " + out3.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  ml::Model model3 = ml::load_model(quantized3);
  check_gptq_directory(out3, model3, 3, 1, [](const nn::Linear& linear) { return linear.merged_weight(DType::f32); });
  CHECK(read_json(out3 / "quantize_config.json").at("bits") == 3);
}

TEST_CASE("qlora export --to gptq: bad input gives one line, a non-zero exit and no output") {
  const fs::path hf = test::fresh_output_path("gptq-bad-src"), nf4 = test::fresh_output_path("gptq-bad-nf4"),
                 out = test::fresh_output_path("gptq-bad-out");
  {
    ml::Model dense = tiny_model(nullptr, nn::AdapterKind::none, 41);
    train::export_hf(dense, hf, DType::f32);
  }
  REQUIRE(run_tool("quantize " + hf.string() + " --method nf4 --out " + nf4.string()).status == 0);
  const auto refused = [&](const std::string& args, const std::string& needle) {
    const Result r = run_tool("export " + args + " --out " + out.string());
    INFO(args);
    INFO(r.err);
    CHECK(r.status != 0);
    CHECK(r.err.find(needle) != std::string::npos);
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
    CHECK_FALSE(fs::exists(out));
  };
  refused(nf4.string() + " --to gptq", "nf4 has no GPTQ form");
  refused(hf.string() + " --to gptq", "dense base");
  refused(hf.string() + " --to gptq --quant dint4-g32", "no GPTQ form");
  refused(hf.string() + " --to gptq --quant int4-g32 --gptq-format gptq_v3", "gptq_v3");
  refused(hf.string() + " --to hf --gptq-format gptq_v2", "--gptq-format applies to --to gptq only");
  const fs::path adapter = test::fresh_output_path("gptq-bad-adapter");
  {
    ml::LoadOptions o;
    o.quant = quant::QuantConfig::parse("int4-g32");
    o.adapter.kind = nn::AdapterKind::qablora;
    o.adapter.rank = 4;
    o.adapter.alpha = 8;
    ml::Model m = ml::load_model(hf, o);
    train::AdapterDescription d;
    d.adapter = o.adapter;
    d.targets = o.targets;
    d.quant = "int4-g32";
    train::save_adapter(adapter, d, m.params());
  }
  refused(hf.string() + " --adapter " + adapter.string() + " --to gptq", "needs --quant");
  // With --quant the adapter is merged and re-quantized.
  const Result r = run_tool("export " + hf.string() + " --adapter " + adapter.string() + " --to gptq --quant int8-g0 --out " +
                            out.string());
  INFO(r.err);
  CHECK(r.status == 0);
  CHECK(fs::exists(out / "quantize_config.json"));
  CHECK(read_json(out / "quantize_config.json").at("group_size") == -1);
}

TEST_CASE("qlora export --to gptq on stories260K (int8 per channel: its 172-wide MLP packs only at 8 bits)") {
  if (!qlora::test::shared_file_present(kStories)) return;
  const fs::path quantized = test::fresh_output_path("stories-q8"), out = test::fresh_output_path("stories-gptq"),
                 refused = test::fresh_output_path("stories-gptq-int4"), q4 = test::fresh_output_path("stories-q4");
  Result r = run_tool("quantize " + kStories.string() + " --tokenizer " + kStoriesTokenizer.string() +
                      " --method rtn --format int8-g0 --out " + quantized.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  r = run_tool("export " + quantized.string() + " --to gptq --out " + out.string());
  REQUIRE(r.status == 0);
  ml::Model model = ml::load_model(quantized);
  check_gptq_directory(out, model, 8, 1, [](const nn::Linear& linear) { return linear.merged_weight(DType::f32); });
  // At 4 bits the 172 MLP features are not whole words of eight codes: refused, naming the layer.
  REQUIRE(run_tool("quantize " + kStories.string() + " --tokenizer " + kStoriesTokenizer.string() +
                   " --method rtn --format int4-g0 --out " + q4.string()).status == 0);
  r = run_tool("export " + q4.string() + " --to gptq --out " + refused.string());
  CHECK(r.status != 0);
  CHECK(r.err.find("mlp") != std::string::npos);
  CHECK(r.err.find("multiples of 8") != std::string::npos);
  CHECK_FALSE(fs::exists(refused));
}

TEST_CASE("qlora export --to gguf-f16 from a Hugging Face directory without tokenizer files") {
  const fs::path hf = test::fresh_output_path("gguf-no-tok-src"), gguf = test::fresh_output_path("gguf-no-tok.gguf");
  ml::Model dense = tiny_model(nullptr, nn::AdapterKind::none, 51);
  train::export_hf(dense, hf, DType::f32);
  REQUIRE_FALSE(fs::exists(hf / "tokenizer.model"));
  REQUIRE_FALSE(fs::exists(hf / "tokenizer.json"));
  const Result r = run_tool("export " + hf.string() + " --to gguf-f16 --out " + gguf.string());
  INFO(r.err);
  REQUIRE(r.status == 0);
  CHECK(r.err.find("llama.cpp needs one") != std::string::npos);  // a warning, not an error
  const io::GgufFile file(gguf);
  CHECK_FALSE(file.has("tokenizer.ggml.model"));
  CHECK(file.tensor("blk.0.attn_q.weight").type == std::uint32_t(io::GgmlType::F16));
  // The weights round-trip within f16 rounding (half an ulp: 2^-11 relative, 2^-25 absolute among f16's
  // subnormals), the q/k permutation undone by our reader.
  ml::Model back = ml::load_model(gguf);
  const Tensor a = back.block(1).linear(ml::DecoderBlock::k_proj).merged_weight(),
               b = dense.block(1).linear(ml::DecoderBlock::k_proj).merged_weight();
  double worst = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.data<float>()[i], y = b.data<float>()[i];
    worst = std::max(worst, std::fabs(x - y) / (std::fabs(y) * 0x1p-11 + 0x1p-25));
  }
  CHECK(worst <= 1.0);
}
