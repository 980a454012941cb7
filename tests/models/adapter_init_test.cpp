// Model-level adapter initialisation (models/llama/adapter_init.hpp) on the tiny Llama (2 blocks, hidden 16):
// after LoftQ or CLoQ the int2 / int3 model's logits are closer to the full-precision model's than with the
// default init (B = 0, the quantized base alone), for LoRA, Q-BLoRA and hira; LoftQ rebuilds each layer with
// the same adapter, parameter names, initial draw and dropout stream as build_model; CLoQ keeps the base;
// the per-layer objectives go down; refusals leave the model as it was.

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "models/llama/adapter_init.hpp"
#include "models/llama/load.hpp"
#include "qlora/io/model_files.hpp"
#include "qlora/io/tokenizer_load.hpp"
#include "qlora/ops/random.hpp"
#include "support/files.hpp"
#include "support/shared_data.hpp"
#include "support/tiny_llama.hpp"

using namespace qlora;
using namespace qlora::models::llama;

namespace {

// The tiny Llama's full-precision weights, served by HF name (a TensorSource), drawn once.
struct TinyWeights {
  Config config = test::tiny_llama_config();
  std::map<std::string, Tensor> tensors;
  TinyWeights() {
    std::uint64_t seed = 1000;
    for (const auto& spec : io::llama_tensor_specs(config))
      tensors[spec.name] = spec.shape.rank() == 1 ? ops::rand(spec.shape, seed++, Device::cpu(), 0.8f, 1.2f)
                                                  : ops::randn(spec.shape, seed++, Device::cpu(), 0.f, 0.25f);
  }
  TensorSource source() const {
    return [this](const std::string& name) { return tensors.at(name).clone(); };
  }
};

LoadOptions quantized_options(const char* format, nn::AdapterKind kind, int rank, int pool = 0, int repeat = 0) {
  LoadOptions o;
  o.adapter.pool = pool;
  o.adapter.repeat = repeat;
  o.quant = quant::QuantConfig::parse(format);
  o.adapter.kind = kind;
  o.adapter.rank = rank;
  o.adapter.alpha = 8.f;
  o.seed = 3;
  return o;
}

// Four sequences of 12 tokens and their next-token targets.
Tensor token_ids(std::uint64_t seed) {
  std::vector<std::int32_t> ids(48);
  std::uint64_t state = seed;
  for (auto& id : ids) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    id = std::int32_t((state >> 33) % 37);
  }
  return Tensor::from(ids, {4, 12});
}

// H = X^T X / N of every block linear's inputs in a forward of the model (calibration hook of nn::Context).
std::map<std::string, quant::GramAccumulator> grams_of(Model& m, const Tensor& ids) {
  std::map<std::string, quant::GramAccumulator> grams;
  nn::Context ctx;
  ctx.training = false;
  ctx.observe_linear_input = [&](const std::string& layer, const Tensor& x) {
    auto it = grams.find(layer);
    if (it == grams.end()) it = grams.emplace(layer, quant::GramAccumulator(x.dim(1), Device::cpu())).first;
    it->second.add(x);
  };
  m.forward_loss_embedded(ctx, m.embed(ids), ids);
  return grams;
}

double distance(const Tensor& a, const Tensor& b) {
  const std::vector<float> x = a.to_vector<float>(), y = b.to_vector<float>();
  double d = 0;
  for (std::size_t i = 0; i < x.size(); ++i) d += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
  return std::sqrt(d);
}

std::vector<std::string> param_names(Model& m) {
  std::vector<std::string> names;
  for (autograd::Param* p : m.params()) names.push_back(p->name);
  return names;
}

}  // namespace

TEST_CASE("adapter init: LoftQ and CLoQ bring the int2 / int3 model's logits closer to full precision") {
  const TinyWeights weights;
  Model fp = build_model(weights.config, weights.source(), LoadOptions{});
  const Tensor calibration = token_ids(1), held_out = token_ids(2);
  const std::map<std::string, quant::GramAccumulator> grams = grams_of(fp, calibration);
  REQUIRE(grams.size() == 14);
  const Tensor fp_logits = fp.logits(held_out);

  // hira on 2 x 2 tiles: its preset 8 x 4 tiles leave a 16-wide layer 8 parameters, too few to move the
  // logits (measured: CLoQ lowers each layer's calibrated error, yet the held-out logits end 0.5 % further).
  struct Case {
    const char* format;
    nn::AdapterKind kind;
    int rank, pool, repeat;
  };
  for (const Case c : {Case{"int2-g16", nn::AdapterKind::lora, 4, 0, 0}, Case{"int3-g16", nn::AdapterKind::lora, 4, 0, 0},
                       Case{"int2-g16", nn::AdapterKind::qblora, 2, 0, 0}, Case{"int3-g16", nn::AdapterKind::qblora, 2, 0, 0},
                       Case{"int2-g16", nn::AdapterKind::hira, 2, 2, 2}}) {
    CAPTURE(std::string(c.format));
    CAPTURE(std::string(nn::adapter_kind_name(c.kind)));
    const LoadOptions options = quantized_options(c.format, c.kind, c.rank, c.pool, c.repeat);
    Model standard = build_model(weights.config, weights.source(), options);
    const double before = distance(standard.logits(held_out), fp_logits);

    Model loftq = build_model(weights.config, weights.source(), options);
    const std::vector<std::string> names = param_names(loftq);
    const std::vector<LayerInitResult> loftq_layers =
        init_adapters(loftq, weights.source(), AdapterInitMethod::loftq, {{5}, {}, std::nullopt});
    CHECK(loftq_layers.size() == 14);
    for (const LayerInitResult& r : loftq_layers) CHECK(r.error_after < r.error_before);
    CHECK(param_names(loftq) == names);
    const double after_loftq = distance(loftq.logits(held_out), fp_logits);

    Model cloq = build_model(weights.config, weights.source(), options);
    const std::vector<LayerInitResult> cloq_layers =
        init_adapters(cloq, weights.source(), AdapterInitMethod::cloq, {}, gram_lookup(grams));
    CHECK(cloq_layers.size() == 14);
    for (const LayerInitResult& r : cloq_layers) CHECK(r.error_after < r.error_before);
    const double after_cloq = distance(cloq.logits(held_out), fp_logits);

    MESSAGE(std::string(c.format) << " " << nn::adapter_kind_name(c.kind) << " r=" << c.rank
                     << ": ||logits - fp logits|| on held-out tokens: default " << before << ", loftq(T=5) "
                     << after_loftq << ", cloq " << after_cloq);
    CHECK(after_loftq < before);
    CHECK(after_cloq < before);
  }
}

TEST_CASE("adapter init: LoftQ with T = 1 keeps quant(W) as the base and rebuilds layers as build_model does") {
  const TinyWeights weights;
  const LoadOptions options = quantized_options("int3-g16", nn::AdapterKind::qblora, 2);
  Model standard = build_model(weights.config, weights.source(), options);
  Model m = build_model(weights.config, weights.source(), options);
  init_adapters(m, weights.source(), AdapterInitMethod::loftq);
  for (std::int64_t b = 0; b < m.num_layers(); ++b) {
    for (int p = 0; p < DecoderBlock::kProjCount; ++p) {
      const nn::Linear& before = standard.block(b).linear(DecoderBlock::Proj(p));
      nn::Linear& after = m.block(b).linear(DecoderBlock::Proj(p));
      CAPTURE(after.name());
      CHECK(after.describe() == before.describe());
      // T = 1: Q = quant(W), the base the model already had; the merged weight moved towards W.
      const std::vector<float> merged = after.merged_weight().to_vector<float>();
      const std::vector<float> base = before.merged_weight().to_vector<float>();  // B = 0: the base alone
      const std::vector<float> w = weights.tensors.at(after.name() + ".weight").to_vector<float>();
      double e_before = 0, e_after = 0;
      for (std::size_t i = 0; i < w.size(); ++i) {
        e_before += (double(base[i]) - w[i]) * (double(base[i]) - w[i]);
        e_after += (double(merged[i]) - w[i]) * (double(merged[i]) - w[i]);
      }
      CHECK(e_after < e_before);
    }
  }
  // The same dropout streams: with T = 1 the rebuilt layers have build_model's base, so a model built
  // normally and given the LoftQ adapters computes the same training loss under dropout only if every layer
  // kept its stream id (a different stream drops different features).
  LoadOptions dropout = options;
  dropout.adapter.dropout = 0.3f;
  Model x = build_model(weights.config, weights.source(), dropout);
  Model y = build_model(weights.config, weights.source(), dropout);
  init_adapters(y, weights.source(), AdapterInitMethod::loftq);
  const auto xp = x.params(), yp = y.params();
  for (std::size_t i = 0; i < xp.size(); ++i) xp[i]->value.copy_from(yp[i]->value);
  nn::Context cx, cy;
  cx.seed = cy.seed = 17;
  const Tensor ids = token_ids(5);
  CHECK(x.forward_loss_embedded(cx, x.embed(ids), ids).loss == y.forward_loss_embedded(cy, y.embed(ids), ids).loss);
}

TEST_CASE("adapter init: default leaves the model alone, refusals name the problem and change nothing") {
  const TinyWeights weights;
  const LoadOptions options = quantized_options("int2-g16", nn::AdapterKind::lora, 2);
  Model m = build_model(weights.config, weights.source(), options);
  const Tensor ids = token_ids(3);
  const Tensor logits = m.logits(ids);
  CHECK(init_adapters(m, weights.source(), AdapterInitMethod::standard).empty());
  CHECK(distance(m.logits(ids), logits) == 0.0);

  CHECK(parse_adapter_init_method("loftq") == AdapterInitMethod::loftq);
  CHECK(parse_adapter_init_method("cloq") == AdapterInitMethod::cloq);
  CHECK(parse_adapter_init_method("default") == AdapterInitMethod::standard);
  CHECK(test::error_of([] { parse_adapter_init_method("pissa"); }).find("expected default, loftq or cloq") !=
        std::string::npos);

  // CLoQ without Grams; a missing layer; a Gram of the wrong size.
  CHECK(test::error_of([&] { init_adapters(m, weights.source(), AdapterInitMethod::cloq); }).find("needs the Gram") !=
        std::string::npos);
  std::map<std::string, quant::GramAccumulator> grams = grams_of(m, ids);
  grams.erase("model.layers.1.mlp.down_proj");
  CHECK(test::error_of([&] { init_adapters(m, weights.source(), AdapterInitMethod::cloq, {}, gram_lookup(grams)); })
            .find("no calibration Gram for layer model.layers.1.mlp.down_proj") != std::string::npos);
  grams["model.layers.1.mlp.down_proj"] = quant::GramAccumulator(16, Device::cpu());
  CHECK(test::error_of([&] { init_adapters(m, weights.source(), AdapterInitMethod::cloq, {}, gram_lookup(grams)); })
            .find("the calibration Gram of model.layers.1.mlp.down_proj has 16 features, the layer's input has 24") !=
        std::string::npos);
  // A wrong full-precision weight.
  const TensorSource wrong = [&](const std::string& name) {
    return name == "model.layers.0.self_attn.k_proj.weight" ? Tensor::zeros(Shape{16, 16}) : weights.tensors.at(name);
  };
  CHECK(test::error_of([&] { init_adapters(m, wrong, AdapterInitMethod::loftq); })
            .find("loftq: the full-precision weight model.layers.0.self_attn.k_proj.weight is (16, 16)") !=
        std::string::npos);
  CHECK(distance(m.logits(ids), logits) == 0.0);  // nothing changed by the refusals

  // A dense base: no quantization error to start from; LoftQ needs a format.
  LoadOptions dense = options;
  dense.quant.reset();
  Model d = build_model(weights.config, weights.source(), dense);
  CHECK(test::error_of([&] { init_adapters(d, weights.source(), AdapterInitMethod::loftq); }).find("no --quant") !=
        std::string::npos);
  CHECK(test::error_of([&] { init_adapters(d, weights.source(), AdapterInitMethod::cloq, {}, gram_lookup(grams)); })
            .find("the base of model.layers.0.self_attn.q_proj is dense") != std::string::npos);
}

TEST_CASE("adapter init: stories260K at int3 / int2: LoftQ and CLoQ lower the TinyStories loss of the default init") {
  if (!test::shared_files_present({test::kStories260K, test::kStories260KTokenizer, test::kTinyStoriesValid})) return;
  const auto tok = io::load_tokenizer(test::kStories260KTokenizer);
  std::ifstream in(test::kTinyStoriesValid, std::ios::binary);
  const std::vector<std::int32_t> ids = tok->encode(std::string(std::istreambuf_iterator<char>(in), {}), true);
  REQUIRE(ids.size() > 4200);
  // Evaluation: tokens [0, 1024] in windows of 128; calibration: 8 windows of 128 from token 2048 on.
  const auto window = [&](std::size_t start, std::int64_t n) {
    return Tensor::from(std::vector<std::int32_t>(ids.begin() + std::ptrdiff_t(start), ids.begin() + std::ptrdiff_t(start) + n),
                        {1, n});
  };
  const auto loss = [&](Model& m) {
    double sum = 0;
    std::int64_t count = 0;
    for (std::size_t start = 0; start < 1024; start += 128) {
      const LossResult r = m.evaluate_loss(window(start, 128), window(start + 1, 128));
      sum += r.loss_sum;
      count += r.valid_tokens;
    }
    return sum / double(count);
  };
  const std::unique_ptr<io::ModelFiles> files = io::open_model_files(test::kStories260K);
  const TensorSource fp_weights = [&](const std::string& name) { return files->load(name, DType::f32); };
  Model fp = build_model(*files, LoadOptions{});
  std::vector<std::int32_t> calibration;
  for (std::size_t w = 0; w < 8; ++w)
    calibration.insert(calibration.end(), ids.begin() + std::ptrdiff_t(2048 + 256 * w),
                       ids.begin() + std::ptrdiff_t(2048 + 256 * w + 128));
  const std::map<std::string, quant::GramAccumulator> grams = grams_of(fp, Tensor::from(calibration, {8, 128}));
  const double fp_loss = loss(fp);
  for (const char* format : {"int3-g32", "int2-g32"}) {
    CAPTURE(std::string(format));
    const LoadOptions options = quantized_options(format, nn::AdapterKind::lora, 8);
    Model standard = build_model(*files, options);
    Model loftq = build_model(*files, options);
    Model cloq = build_model(*files, options);
    init_adapters(loftq, fp_weights, AdapterInitMethod::loftq, {{5}, {}, std::nullopt});
    init_adapters(cloq, fp_weights, AdapterInitMethod::cloq, {}, gram_lookup(grams));
    const double base_loss = loss(standard), loftq_loss = loss(loftq), cloq_loss = loss(cloq);
    MESSAGE("stories260K " << std::string(format) << " lora r=8, TinyStories loss (1024 tokens): f32 " << fp_loss << ", default "
                           << base_loss << ", loftq(T=5) " << loftq_loss << ", cloq " << cloq_loss);
    CHECK(loftq_loss < base_loss);
    CHECK(cloq_loss < base_loss);
  }
}
