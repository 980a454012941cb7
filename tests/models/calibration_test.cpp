// The calibration pipeline (models/llama/calibration.hpp): GPTQ-style seeded window sampling, and the
// sequential pass checked against direct computations. Each Gram the pipeline hands the quantizer is
// compared with X^T X / N formed in double from the inputs a separate forward saved (through
// Context::observe_linear_input) on a model prepared by hand: the full-precision model, or one whose
// earlier layers were replaced by their quantized versions, whichever the property says block l sees.

#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "support/files.hpp"
#include "support/random.hpp"
#include "support/tiny_llama.hpp"

#include "models/llama/calibration.hpp"
#include "models/llama/load.hpp"
#include "qlora/quant/quantize.hpp"

namespace ml = qlora::models::llama;
using namespace qlora;

namespace {

std::vector<std::int32_t> iota_ids(std::int64_t n) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) ids[std::size_t(i)] = std::int32_t(i);
  return ids;
}

ml::Model tiny_model() { return ml::random_model(test::tiny_llama_config(), ml::LoadOptions{}, 11, 0.3f); }

std::vector<Tensor> random_windows(std::int64_t count, std::int64_t len, std::uint64_t seed) {
  std::vector<Tensor> out;
  for (std::int64_t w = 0; w < count; ++w) {
    const auto v = test::random_vector<double>(std::size_t(len), seed + std::uint64_t(w), 0.0, 37.0);
    std::vector<std::int32_t> ids;
    for (double x : v) ids.push_back(std::int32_t(x));
    out.push_back(Tensor::from(ids, Shape{1, len}));
  }
  return out;
}

// A quantizer that records the Gram it was given for each layer.
struct RecordingQuantizer {
  explicit RecordingQuantizer(const quant::QuantConfig& f) : format(f) {}
  quant::QuantConfig format;
  std::map<std::string, Tensor> grams;
  ml::LayerQuantizer fn() {
    return [this](const std::string& name, const Tensor& w, const Tensor& h) {
      grams[name] = h.defined() ? h.clone() : Tensor();
      return quant::quantize(w, format);
    };
  }
};

// Replaces a block linear of `m` by quantize(its weight, format), as the pipeline does.
void quantize_by_hand(ml::Model& m, std::int64_t layer, ml::DecoderBlock::Proj p, const quant::QuantConfig& format) {
  nn::Linear& l = m.block(layer).linear(p);
  const std::string name = l.name();
  m.block(layer).replace_linear(
      p, nn::make_linear(name, nn::BaseWeight(quant::quantize(l.merged_weight(DType::f32), format)),
                         nn::AdapterConfig{nn::AdapterKind::none}, 0, 0));
}

// X^T X / N in double over the inputs `layer` receives when blocks 0..upto of m run over the windows.
std::vector<double> direct_gram(ml::Model& m, const std::vector<Tensor>& windows, std::int64_t upto,
                                const std::string& layer) {
  std::vector<Tensor> rows;
  nn::Context ctx;
  ctx.training = false;
  ctx.observe_linear_input = [&](const std::string& name, const Tensor& x) {
    if (name == layer) rows.push_back(x.clone());
  };
  for (const Tensor& w : windows) {
    Tensor h = m.embed(w);
    for (std::int64_t i = 0; i <= upto; ++i) h = m.block(i).forward(ctx, h);
  }
  REQUIRE(!rows.empty());
  const std::int64_t d = rows[0].dim(1);
  std::vector<double> g(std::size_t(d * d), 0.0);
  std::int64_t n = 0;
  for (const Tensor& x : rows) {
    const float* p = x.data<float>();
    for (std::int64_t r = 0; r < x.dim(0); ++r, ++n)
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t j = 0; j < d; ++j) g[std::size_t(i * d + j)] += double(p[r * d + i]) * double(p[r * d + j]);
  }
  for (double& v : g) v /= double(n);
  return g;
}

std::vector<double> values(const Tensor& t) {
  const Tensor d = t.to(DType::f64);
  return {d.data<double>(), d.data<double>() + d.numel()};
}

std::vector<float> logits_of(ml::Model& m, const Tensor& ids) {
  const Tensor l = m.logits(ids);
  return {l.data<float>(), l.data<float>() + l.numel()};
}

const std::string kQ0 = "model.layers.0.self_attn.q_proj", kO0 = "model.layers.0.self_attn.o_proj";
const std::string kQ1 = "model.layers.1.self_attn.q_proj", kDown0 = "model.layers.0.mlp.down_proj";

}  // namespace

TEST_CASE("calibration: seeded windows are GPTQ's random starts, reproducible and inside the text") {
  const auto ids = iota_ids(1000);
  const ml::CalibrationSet a = ml::sample_calibration_windows(ids, {6, 50, 7}, 512);
  // Golden starts: an independent Python Philox4x32-10 (Random123 constants; counter (k, 0, 2, 0), key
  // (seed, 0)), 64 bits from lanes 0 and 1, modulo the 950 = 1000 - 50 starts of GPTQ's randint(0, n-L-1).
  CHECK(a.starts == std::vector<std::int64_t>{881, 679, 43, 481, 789, 430});
  CHECK(a.seq_len == 50);
  CHECK(a.warnings.empty());
  REQUIRE(a.windows.size() == 6);
  for (std::size_t k = 0; k < a.windows.size(); ++k) {
    CHECK(a.windows[k].shape() == Shape{1, 50});
    const std::int32_t* w = a.windows[k].data<std::int32_t>();
    for (std::int64_t j = 0; j < 50; ++j) CHECK(w[j] == ids[std::size_t(a.starts[k] + j)]);
  }
  const ml::CalibrationSet again = ml::sample_calibration_windows(ids, {6, 50, 7}, 512);
  CHECK(again.starts == a.starts);
  CHECK(ml::sample_calibration_windows(ids, {6, 50, 8}, 512).starts != a.starts);

  // Many draws stay in [0, n - L - 1] and spread over it.
  const ml::CalibrationSet many = ml::sample_calibration_windows(ids, {400, 100, 3}, 512);
  std::int64_t lo = 1000, hi = -1;
  for (std::int64_t s : many.starts) lo = std::min(lo, s), hi = std::max(hi, s);
  CHECK(lo >= 0);
  CHECK(hi <= 1000 - 100 - 1);
  CHECK(lo < 50);
  CHECK(hi > 850);
}

TEST_CASE("calibration: the sequence length shrinks to the context and the text, with a warning") {
  const auto ids = iota_ids(300);
  const ml::CalibrationSet ctx = ml::sample_calibration_windows(ids, {4, 2048, 1}, 128);
  CHECK(ctx.seq_len == 128);
  REQUIRE(ctx.warnings.size() == 1);
  CHECK(ctx.warnings[0].find("context of 128") != std::string::npos);
  for (const Tensor& w : ctx.windows) CHECK(w.dim(1) == 128);

  const ml::CalibrationSet text = ml::sample_calibration_windows(ids, {4, 2048, 1}, 4096);
  CHECK(text.seq_len == 299);
  for (std::int64_t s : text.starts) CHECK(s == 0);
  CHECK(text.warnings.at(0).find("only 300 tokens") != std::string::npos);

  CHECK(test::error_of([&] { (void)ml::sample_calibration_windows(iota_ids(2), {1, 16, 0}, 64); })
            .find("only 2 tokens") != std::string::npos);
  CHECK(test::error_of([&] { (void)ml::sample_calibration_windows(ids, {0, 16, 0}, 64); }).find("samples") !=
        std::string::npos);
}

TEST_CASE("calibration: the pipeline's Gram of the first layer is X^T X / N of a full-precision forward") {
  ml::Model model = tiny_model();
  ml::Model reference = tiny_model();
  const auto windows = random_windows(3, 8, 5);
  RecordingQuantizer rec{quant::QuantConfig::parse("int4-g16")};
  const ml::QuantizationSummary s = ml::quantize_model_sequential(model, windows, rec.fn());
  CHECK(s.layers == 14);
  CHECK(s.calibration_rows == 24);
  REQUIRE(rec.grams.count(kQ0));
  const Tensor& h = rec.grams.at(kQ0);
  CHECK(h.shape() == Shape{16, 16});
  CHECK(h.device().is_cpu());
  CHECK(test::rel_error(values(h), direct_gram(reference, windows, 0, kQ0)) < 1e-5);
}

TEST_CASE("calibration: true-sequential groups see the quantized groups before them; off, one pass serves all") {
  const auto windows = random_windows(3, 8, 6);
  const quant::QuantConfig int4 = quant::QuantConfig::parse("int4-g16");
  ml::Model fp = tiny_model();
  const std::vector<double> fp_o = direct_gram(fp, windows, 0, kO0);

  // o_proj after q, k, v were quantized.
  ml::Model qkv = tiny_model();
  for (auto p : {ml::DecoderBlock::q_proj, ml::DecoderBlock::k_proj, ml::DecoderBlock::v_proj})
    quantize_by_hand(qkv, 0, p, int4);
  const std::vector<double> qkv_o = direct_gram(qkv, windows, 0, kO0);
  CHECK(test::rel_error(qkv_o, fp_o) > 1e-3);  // quantizing q, k, v moves o_proj's inputs measurably

  ml::Model model = tiny_model();
  RecordingQuantizer rec{int4};
  (void)ml::quantize_model_sequential(model, windows, rec.fn());
  CHECK(test::rel_error(values(rec.grams.at(kO0)), qkv_o) < 1e-5);

  ml::Model one_pass = tiny_model();
  RecordingQuantizer rec1{int4};
  ml::CalibrationOptions options;
  options.true_sequential = false;
  (void)ml::quantize_model_sequential(one_pass, windows, rec1.fn(), options);
  CHECK(test::rel_error(values(rec1.grams.at(kO0)), fp_o) < 1e-5);
  CHECK(test::rel_error(values(rec1.grams.at(kDown0)), direct_gram(fp, windows, 0, kDown0)) < 1e-5);
}

TEST_CASE("calibration: block 1 is calibrated on the outputs of the quantized block 0") {
  const auto windows = random_windows(4, 8, 7);
  const quant::QuantConfig int4 = quant::QuantConfig::parse("int4-g16");
  ml::Model fp = tiny_model();
  const std::vector<double> fp_q1 = direct_gram(fp, windows, 1, kQ1);

  ml::Model block0 = tiny_model();
  for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) quantize_by_hand(block0, 0, ml::DecoderBlock::Proj(p), int4);
  const std::vector<double> seq_q1 = direct_gram(block0, windows, 1, kQ1);
  CHECK(test::rel_error(seq_q1, fp_q1) > 1e-3);

  ml::Model model = tiny_model();
  RecordingQuantizer rec{int4};
  (void)ml::quantize_model_sequential(model, windows, rec.fn());
  CHECK(test::rel_error(values(rec.grams.at(kQ1)), seq_q1) < 1e-5);
  CHECK(test::rel_error(values(rec.grams.at(kQ1)), fp_q1) > 1e-3);
}

TEST_CASE("calibration: a near-identity quantizer (int8) leaves the logits close; the transform sees block inputs") {
  const auto windows = random_windows(2, 8, 8);
  ml::Model fp = tiny_model();
  ml::Model model = tiny_model();
  RecordingQuantizer rec{quant::QuantConfig::parse("int8-g16")};
  std::vector<std::int64_t> transformed;
  const ml::BlockTransform transform = [&](ml::DecoderBlock& block, const std::vector<Tensor>& inputs,
                                           dist::Communicator&) {
    CHECK(inputs.size() == windows.size());
    CHECK(inputs[0].shape() == Shape{1, 8, 16});
    transformed.push_back(block.index());
  };
  std::vector<std::string> lines;
  (void)ml::quantize_model_sequential(model, windows, rec.fn(), {}, transform,
                                      [&](const std::string& line) { lines.push_back(line); });
  CHECK(transformed == std::vector<std::int64_t>{0, 1});
  CHECK(lines.size() == 16);  // 14 layers and 2 transforms
  CHECK(lines.front().find("block 1/2") != std::string::npos);
  for (std::int64_t i = 0; i < model.num_layers(); ++i)
    for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p)
      CHECK(model.block(i).linear(ml::DecoderBlock::Proj(p)).quantized_weight() != nullptr);
  ml::Model int4 = tiny_model();
  RecordingQuantizer rec4{quant::QuantConfig::parse("int4-g16")};
  (void)ml::quantize_model_sequential(int4, windows, rec4.fn());
  const Tensor ids = random_windows(1, 12, 99)[0];
  const double err = test::rel_error(logits_of(model, ids), logits_of(fp, ids));
  const double err4 = test::rel_error(logits_of(int4, ids), logits_of(fp, ids));
  MESSAGE("relative logit error after the sequential pass: int8-g16 " << err << ", int4-g16 " << err4);
  CHECK(err > 0);
  CHECK(err < 5e-2);
  CHECK(err < 0.1 * err4);  // 16 times finer grid: about 16 times less error
}

TEST_CASE("calibration: without calibration every linear is quantize(W) exactly") {
  ml::Model model = tiny_model();
  ml::Model fp = tiny_model();
  const quant::QuantConfig nf4 = quant::QuantConfig::parse("nf4-g16");
  RecordingQuantizer rec{nf4};
  const ml::QuantizationSummary s = ml::quantize_model_weights(model, rec.fn());
  CHECK(s.layers == 14);
  CHECK(s.calibration_rows == 0);
  for (const auto& [name, h] : rec.grams) CHECK_FALSE(h.defined());
  for (std::int64_t i = 0; i < model.num_layers(); ++i)
    for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
      const auto proj = ml::DecoderBlock::Proj(p);
      const quant::QuantizedTensor* q = model.block(i).linear(proj).quantized_weight();
      REQUIRE(q != nullptr);
      const quant::QuantizedTensor expect = quant::quantize(fp.block(i).linear(proj).merged_weight(), nf4);
      CHECK(q->codes.to_vector<std::uint8_t>() == expect.codes.to_vector<std::uint8_t>());
      CHECK(q->absmax_codes.to_vector<std::uint8_t>() == expect.absmax_codes.to_vector<std::uint8_t>());
    }
}

TEST_CASE("calibration: a quantizer returning the wrong shape is refused by name") {
  ml::Model model = tiny_model();
  const auto bad = [](const std::string&, const Tensor&, const Tensor&) {
    return quant::quantize(Tensor::from(test::random_vector(32, 1), Shape{2, 16}), quant::QuantConfig::parse("int4-g16"));
  };
  const std::string e = test::error_of([&] { (void)ml::quantize_model_sequential(model, random_windows(1, 4, 1), bad); });
  CHECK(e.find("model.layers.0.self_attn.q_proj") != std::string::npos);
  CHECK(e.find("2 x 16") != std::string::npos);
}
