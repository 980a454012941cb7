// AWQ / AQAS on a Llama block (models/llama/aqas.hpp): folding is exact (f64, 1e-12), v -> o is refused
// under GQA, apply_aqas searches and folds all groups and lowers the W4A8 error of the quantized block,
// and SLAC: calibration statistics (per-channel mean |x|, H = X^T X / N) depend on the calibration length.

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "models/llama/aqas.hpp"
#include "models/llama/load.hpp"
#include "qlora/io/tokenizer_load.hpp"
#include "qlora/ops/random.hpp"
#include "support/files.hpp"
#include "support/random.hpp"
#include "support/shared_data.hpp"
#include "support/tiny_llama.hpp"

using namespace qlora;
using namespace qlora::models::llama;
namespace fs = std::filesystem;

namespace {

using P = DecoderBlock;

// The tiny Llama with as many KV heads as query heads (v -> o can be folded), or the GQA original.
Config tiny_config(bool gqa) {
  Config c = test::tiny_llama_config();
  if (!gqa) c.num_key_value_heads = c.num_attention_heads;
  return c;
}

Model tiny_model(bool gqa, DType dtype) {
  LoadOptions o;
  o.dtype = dtype;
  return random_model(tiny_config(gqa), o, 3, 0.3f);
}

// Block inputs with outlier channels (hidden dims 2 and 9 x 8), as residual streams have.
std::vector<Tensor> block_inputs(std::int64_t count, std::int64_t len, std::int64_t hidden, DType dtype, std::uint64_t seed) {
  std::vector<Tensor> xs;
  for (std::int64_t i = 0; i < count; ++i) {
    std::vector<float> x = test::gaussian(std::size_t(len * hidden), seed + std::uint64_t(i), 1.0);
    for (std::size_t j = 0; j < x.size(); ++j)
      if (j % std::size_t(hidden) == 2 || j % std::size_t(hidden) == 9) x[j] *= 8.f;
    xs.push_back(Tensor::from(x, Shape{1, len, hidden}).to(dtype));
  }
  return xs;
}

Tensor run(DecoderBlock& block, const Tensor& x) {
  nn::Context ctx;
  ctx.training = false;
  return block.forward(ctx, x);
}

std::vector<double> values(const Tensor& t) { return t.to(DType::f64).to_vector<double>(); }

std::vector<double> random_scales(std::size_t n, std::uint64_t seed) {
  std::vector<double> s = test::random_vector<double>(n, seed, -1.0, 1.0);
  for (double& v : s) v = std::exp(v);  // e^-1 .. e
  return s;
}

// Mean squared difference of the block outputs over the inputs.
double output_mse(DecoderBlock& block, const std::vector<Tensor>& xs, const std::vector<Tensor>& refs) {
  double sum = 0, count = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    const std::vector<double> y = values(run(block, xs[i])), r = values(refs[i]);
    for (std::size_t j = 0; j < y.size(); ++j) sum += (y[j] - r[j]) * (y[j] - r[j]);
    count += double(y.size());
  }
  return sum / count;
}

// Every linear of the block replaced by its RTN-quantized self, inputs fake-quantized to `bits`.
void quantize_block(DecoderBlock& block, const quant::QuantConfig& format, int bits) {
  for (int p = 0; p < P::kProjCount; ++p) {
    const nn::Linear& l = block.linear(P::Proj(p));
    auto q = nn::make_linear(l.name(), quant::quantize(l.merged_weight(DType::f32), format), nn::AdapterConfig{nn::AdapterKind::none},
                             0, 0);
    q->set_activation_bits(bits);
    block.replace_linear(P::Proj(p), std::move(q));
  }
}

}  // namespace

TEST_CASE("aqas block: folded scales leave the block's function unchanged (f64, 1e-12)") {
  for (const bool gqa : {false, true}) {
    CAPTURE(gqa);
    Model m = tiny_model(gqa, DType::f64);
    DecoderBlock& block = m.block(0);
    const Config c = tiny_config(gqa);
    const std::vector<Tensor> xs = block_inputs(2, 7, c.hidden_size, DType::f64, 10);
    std::vector<Tensor> before;
    for (const Tensor& x : xs) before.push_back(run(block, x));
    const std::vector<double> q_before = values(block.linear(P::q_proj).merged_weight(DType::f64));
    const std::vector<double> norm_before = values(block.input_norm());

    const std::vector<double> s_qkv = random_scales(std::size_t(c.hidden_size), 20);
    fold_scales(block, ScaleGroup::qkv, s_qkv);
    CHECK(can_fold(block, ScaleGroup::v_to_o) == !gqa);
    if (!gqa) fold_scales(block, ScaleGroup::v_to_o, random_scales(std::size_t(c.q_dim()), 21));
    fold_scales(block, ScaleGroup::gate_up, random_scales(std::size_t(c.hidden_size), 22));
    fold_scales(block, ScaleGroup::up_to_down, random_scales(std::size_t(c.intermediate_size), 23));

    // The weights did change: q's column j times s[j], the norm's weight j divided by s[j].
    const std::vector<double> q_after = values(block.linear(P::q_proj).merged_weight(DType::f64));
    const std::vector<double> norm_after = values(block.input_norm());
    const std::size_t d = std::size_t(c.hidden_size);
    for (std::size_t i = 0; i < q_after.size(); ++i) CHECK(q_after[i] == doctest::Approx(q_before[i] * s_qkv[i % d]).epsilon(1e-15));
    for (std::size_t j = 0; j < d; ++j) CHECK(norm_after[j] == doctest::Approx(norm_before[j] / s_qkv[j]).epsilon(1e-15));
    for (std::size_t i = 0; i < xs.size(); ++i) {
      const std::vector<double> after = values(run(block, xs[i]));
      CHECK(test::rel_error(after, values(before[i])) < 1e-12);
    }
  }
}

TEST_CASE("aqas block: v -> o is refused under GQA, and non-dense or adapted linears are refused") {
  Model gqa = tiny_model(true, DType::f32);
  CHECK(test::error_of([&] { fold_scales(gqa.block(0), ScaleGroup::v_to_o, std::vector<double>(16, 1.0)); })
            .find("v_proj width 8 but o_proj input 16 (GQA)") != std::string::npos);
  CHECK(test::error_of([&] { fold_scales(gqa.block(0), ScaleGroup::qkv, std::vector<double>(16, -1.0)); })
            .find("scales must be finite and positive") != std::string::npos);

  LoadOptions o;
  o.adapter.kind = nn::AdapterKind::lora;
  o.adapter.rank = 2;
  Model adapted = random_model(tiny_config(false), o);
  const std::vector<Tensor> xs = block_inputs(1, 4, 16, DType::f32, 1);
  const AqasOptions options{quant::QuantConfig::parse("int4-g16")};
  CHECK(test::error_of([&] { apply_aqas(adapted.block(0), xs, options); })
            .find("model.layers.0.self_attn.q_proj must be a dense linear without an adapter") != std::string::npos);
  CHECK(test::error_of([&] { apply_aqas(gqa.block(0), {}, options); }).find("no calibration inputs") != std::string::npos);
}

TEST_CASE("aqas block: apply_aqas folds all groups, keeps the function, and lowers the W4A8 error") {
  const quant::QuantConfig format = quant::QuantConfig::parse("int4-g16");
  for (const bool gqa : {false, true}) {
    CAPTURE(gqa);
    const Config c = tiny_config(gqa);
    const std::vector<Tensor> calib = block_inputs(4, 16, c.hidden_size, DType::f32, 100);
    const std::vector<Tensor> test_inputs = block_inputs(4, 16, c.hidden_size, DType::f32, 200);

    // The reference outputs of the original block, and the W4A8 error without any scaling.
    Model plain = tiny_model(gqa, DType::f32);
    std::vector<Tensor> refs;
    for (const Tensor& x : test_inputs) refs.push_back(run(plain.block(0), x));
    quantize_block(plain.block(0), format, 8);
    const double unscaled = output_mse(plain.block(0), test_inputs, refs);

    double errors[2] = {0, 0};  // AWQ, AQAS
    for (const bool aqas : {false, true}) {
      Model m = tiny_model(gqa, DType::f32);
      AqasOptions options{format};
      options.quantize_activations = aqas;
      const AqasReport report = apply_aqas(m.block(0), calib, options);
      CHECK(report.qkv.has_value());
      CHECK(report.v_to_o.has_value() == !gqa);
      CHECK(report.gate_up.has_value());
      CHECK(report.up_to_down.has_value());
      for (const auto* r : {&report.qkv, &report.v_to_o, &report.gate_up, &report.up_to_down})
        if (r->has_value()) CHECK((*r)->error() <= (*r)->identity_error);
      // Folding alone keeps the block (f32 rounding).
      CHECK(output_mse(m.block(0), test_inputs, refs) < 1e-10);
      for (int p = 0; p < P::kProjCount; ++p) CHECK(m.block(0).linear(P::Proj(p)).describe() == "dense f32");
      quantize_block(m.block(0), format, 8);
      errors[aqas] = output_mse(m.block(0), test_inputs, refs);
      MESSAGE(std::string(aqas ? "AQAS" : "AWQ") << (gqa ? " (GQA)" : " (MHA)") << ": a(qkv) = "
                                      << (report.qkv->alpha() ? *report.qkv->alpha() : -1.0) << ", a(gate,up) = "
                                      << (report.gate_up->alpha() ? *report.gate_up->alpha() : -1.0));
    }
    MESSAGE("W4A8 int4-g16 block output MSE on held-out inputs" << (gqa ? " (GQA)" : " (MHA)") << ": unscaled " << unscaled
                                                                << ", AWQ " << errors[0] << ", AQAS " << errors[1]);
    CHECK(errors[1] < unscaled);
    CHECK(errors[0] < unscaled);
  }
}

namespace {

// Per-channel mean |x| and H = X^T X / N of block 0's o_proj and down_proj inputs over windows of `len`
// tokens taken back to back from `ids`, `count` windows (the same total tokens at every length).
struct Statistics {
  std::vector<double> mean_abs, gram;
};
Statistics block0_statistics(Model& m, const std::vector<std::int32_t>& ids, std::int64_t offset, std::int64_t len,
                             std::int64_t count) {
  std::vector<Tensor> o_inputs;
  nn::Context ctx;
  ctx.training = false;
  ctx.observe_linear_input = [&](const std::string& name, const Tensor& x) {
    if (name == m.block(0).linear(P::o_proj).name()) o_inputs.push_back(x.clone());
  };
  for (std::int64_t w = 0; w < count; ++w) {
    const std::vector<std::int32_t> window(ids.begin() + offset + w * len, ids.begin() + offset + (w + 1) * len);
    m.block(0).forward(ctx, m.embed(Tensor::from(window, Shape{1, len})));
  }
  Statistics s;
  s.mean_abs = quant::input_magnitude(o_inputs);
  const std::int64_t d = o_inputs[0].shape().last();
  s.gram.assign(std::size_t(d * d), 0.0);
  double rows = 0;
  for (const Tensor& x : o_inputs) {
    const std::vector<double> v = values(x);
    const std::int64_t n = x.shape().rows();
    for (std::int64_t t = 0; t < n; ++t)
      for (std::int64_t i = 0; i < d; ++i)
        for (std::int64_t j = 0; j < d; ++j) s.gram[std::size_t(i * d + j)] += v[std::size_t(t * d + i)] * v[std::size_t(t * d + j)];
    rows += double(n);
  }
  for (double& g : s.gram) g /= rows;
  return s;
}

}  // namespace

TEST_CASE("SLAC: calibration statistics (mean |x|, H) depend on the calibration length") {
  // stories260K on TinyStories when ../shared/data is present (real activations), else the tiny random Llama
  // on seeded token ids. 1024 tokens at each length: 64 windows of 16 against 2 windows of 512; the control
  // is a second, disjoint set of 64 windows of 16.
  std::unique_ptr<Model> model;
  std::vector<std::int32_t> ids;
  if (fs::exists(test::kStories260K) && fs::exists(test::kStories260KTokenizer)) {
    model = std::make_unique<Model>(load_model(test::kStories260K));
    const auto tok = io::load_tokenizer(test::kStories260KTokenizer);
    std::ifstream in(test::kTinyStoriesValid, std::ios::binary);
    ids = tok->encode(std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()), true);
  } else {
    MESSAGE("stories260K absent: SLAC statistics on the tiny random Llama");
    model = std::make_unique<Model>(tiny_model(true, DType::f32));
    const std::vector<double> r = test::random_vector<double>(4096, 5, 0.0, 37.0);
    for (double v : r) ids.push_back(std::int32_t(v));
  }
  REQUIRE(ids.size() >= 2048 + 64);
  const Statistics short_a = block0_statistics(*model, ids, 0, 16, 64);
  const Statistics short_b = block0_statistics(*model, ids, 1024, 16, 64);
  const Statistics long_a = block0_statistics(*model, ids, 0, 512, 2);
  const double mag_length = test::rel_error(long_a.mean_abs, short_a.mean_abs);
  const double mag_control = test::rel_error(short_b.mean_abs, short_a.mean_abs);
  const double gram_length = test::rel_error(long_a.gram, short_a.gram);
  const double gram_control = test::rel_error(short_b.gram, short_a.gram);
  MESSAGE("block 0 o_proj inputs, relative change of mean|x|: length 16 -> 512 " << mag_length << " (same tokens), "
          << "other tokens at length 16 " << mag_control << "; of H: " << gram_length << " vs " << gram_control);
  CHECK(mag_length > 0.05);
  CHECK(gram_length > 0.05);
  CHECK(mag_length > mag_control);  // the length moves the statistics more than resampling does
  CHECK(gram_length > gram_control);
}
