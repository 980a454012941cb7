// Distributed calibration (models/llama/calibration.hpp with this process's world): run directly (a world of
// one) and under `mpirun -np 2` / `-np 3` by CTest. Every rank also runs the one-process pipeline itself
// (dist::single_process()) on an identical model, so each case compares N ranks with one process in one
// test. The one-process Grams are themselves checked against X^T X / N formed in double from saved inputs
// (tests/models/calibration_test.cpp); here:
//   * each Gram a rank hands its quantizer equals one process's Gram over all windows, bit for bit: the
//     ranks' sums are added in another order than one process adds the windows, but in f64, rounded to f32
//     once (quant/gram.hpp; the contract is 1e-5 relative, checked too; exact equality holds unless an
//     element lies within 1e-16 of an f32 rounding midpoint, and these inputs are fixed); every layer is
//     solved exactly once in the whole world;
//   * GPTQ gives one process's codes exactly and its scales to f32 rounding, with the same codes on every
//     rank (their bytes all-gathered and compared);
//   * AWQ (a block transform: rank 0 searches over every window's block input, the block is broadcast) and
//     round to nearest give one process's model bit for bit (no Gram, so no summation order to differ);
//   * a solve failing on one rank makes every rank throw instead of leaving them waiting.
// Five windows: uneven shares on 2 and 3 ranks.

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "dist/dist_test_util.hpp"
#include "models/llama/aqas.hpp"
#include "models/llama/calibration.hpp"
#include "models/llama/load.hpp"
#include "qlora/dist/single_process.hpp"
#include "qlora/quant/gptq.hpp"
#include "qlora/quant/quantize.hpp"
#include "support/random.hpp"

using namespace qlora;
namespace ml = qlora::models::llama;
using qlora::test::world;

namespace {

// Width 64 (so GPTQ's groups of 16 and its error feedback have room to act), GQA, two blocks.
ml::Config config() {
  ml::Config c;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 53;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

ml::Model model() { return ml::random_model(config(), ml::LoadOptions{}, 17, 0.2f); }

std::vector<Tensor> windows() {
  std::vector<Tensor> out;
  for (std::uint64_t w = 0; w < 5; ++w) {
    const auto v = test::random_vector<double>(24, 300 + w, 0.0, 53.0);
    std::vector<std::int32_t> ids;
    for (double x : v) ids.push_back(std::int32_t(x));
    out.push_back(Tensor::from(ids, Shape{1, 24}));
  }
  return out;
}

const quant::QuantConfig kFormat = quant::QuantConfig::parse("int4-g16");

// GPTQ that also records the Gram it was given per layer.
struct RecordingGptq {
  std::map<std::string, Tensor> grams;
  ml::LayerQuantizer fn() {
    return [this](const std::string& name, const Tensor& w, const Tensor& h) {
      grams[name] = h.clone();
      return quant::gptq_quantize(w, h, kFormat);
    };
  }
};

std::vector<float> floats(const Tensor& t) {
  const Tensor f = t.to(DType::f32);
  return std::vector<float>(f.data<float>(), f.data<float>() + f.numel());
}

std::vector<std::uint8_t> bytes_of(const Tensor& t) {
  const auto* p = static_cast<const std::uint8_t*>(t.data());
  return std::vector<std::uint8_t>(p, p + t.nbytes());
}

const quant::QuantizedTensor& quantized(ml::Model& m, std::int64_t block, int p) {
  const quant::QuantizedTensor* q = m.block(block).linear(ml::DecoderBlock::Proj(p)).quantized_weight();
  REQUIRE(q != nullptr);
  return *q;
}

// Every linear's codes, scales and zeros end to end (the model's whole quantized content).
std::vector<std::uint8_t> quantized_bytes(ml::Model& m) {
  std::vector<std::uint8_t> out;
  for (std::int64_t i = 0; i < m.num_layers(); ++i)
    for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
      const quant::QuantizedTensor& q = quantized(m, i, p);
      for (const Tensor* t : {&q.codes, &q.scales, &q.zeros}) {
        const auto b = bytes_of(*t);
        out.insert(out.end(), b.begin(), b.end());
      }
    }
  return out;
}

// Whether every rank holds the same bytes (all-gathered as rows of one u8 tensor).
bool same_on_every_rank(std::vector<std::uint8_t> bytes) {
  const Tensor mine = Tensor::from(bytes, Shape{1, std::int64_t(bytes.size())});
  const Tensor all = world().all_gather(mine);
  for (int r = 0; r < world().size(); ++r)
    if (std::memcmp(all.select(r).data(), bytes.data(), bytes.size()) != 0) return false;
  return true;
}

}  // namespace

TEST_CASE("distributed calibration: each reduced Gram equals one process's over all windows") {
  ml::Model spread = model(), alone = model();
  RecordingGptq in_world, in_one;
  const ml::QuantizationSummary s =
      ml::quantize_model_sequential(spread, windows(), in_world.fn(), {}, {}, {}, world());
  const ml::QuantizationSummary s1 = ml::quantize_model_sequential(alone, windows(), in_one.fn());
  CHECK(s.layers == 14);
  CHECK(s.calibration_rows == s1.calibration_rows);
  CHECK(s.calibration_rows == 5 * 24);
  // Each layer solved exactly once in the world: this rank's solves plus the others' make 14.
  CHECK(world().all_reduce_sum(double(in_world.grams.size())) == 14.0);
  REQUIRE(in_one.grams.size() == 14);
  for (const auto& [name, h] : in_world.grams) {
    INFO(name);
    const Tensor& h1 = in_one.grams.at(name);
    REQUIRE(h.shape() == h1.shape());
    const double err = test::rel_error(floats(h), floats(h1));
    CHECK(err < 1e-5);
    CHECK(err == 0.0);
  }
}

TEST_CASE("distributed calibration: GPTQ gives one process's codes, the same on every rank") {
  ml::Model spread = model(), alone = model();
  RecordingGptq in_world, in_one;
  (void)ml::quantize_model_sequential(spread, windows(), in_world.fn(), {}, {}, {}, world());
  (void)ml::quantize_model_sequential(alone, windows(), in_one.fn());
  for (std::int64_t i = 0; i < spread.num_layers(); ++i)
    for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
      const quant::QuantizedTensor &q = quantized(spread, i, p), &q1 = quantized(alone, i, p);
      INFO(spread.block(i).linear(ml::DecoderBlock::Proj(p)).name());
      CHECK(q.config == q1.config);
      CHECK(bytes_of(q.codes) == bytes_of(q1.codes));
      CHECK(bytes_of(q.zeros) == bytes_of(q1.zeros));
      // GPTQ's scales come from the error-updated weights, hence from H: f32 rounding of the Gram's sum.
      CHECK(test::rel_error(floats(q.scales), floats(q1.scales)) < 1e-5);
    }
  CHECK(same_on_every_rank(quantized_bytes(spread)));
}

TEST_CASE("distributed calibration: AWQ (a block transform on rank 0) gives one process's model bit for bit") {
  ml::AqasOptions awq;
  awq.weight_format = kFormat;
  awq.quantize_activations = false;
  awq.grid = 4;  // a short search is enough to move the scales
  std::vector<std::int64_t> transformed;
  const ml::BlockTransform transform = [&](ml::DecoderBlock& block, const std::vector<Tensor>& inputs) {
    CHECK(inputs.size() == 5);  // every window's block input, whatever the world
    transformed.push_back(block.index());
    (void)ml::apply_aqas(block, inputs, awq);
  };
  const ml::LayerQuantizer rtn = [](const std::string&, const Tensor& w, const Tensor&) {
    return quant::quantize(w, kFormat);
  };
  ml::Model spread = model(), alone = model();
  (void)ml::quantize_model_sequential(spread, windows(), rtn, {}, transform, {}, world());
  CHECK(transformed == (world().is_root() ? std::vector<std::int64_t>{0, 1} : std::vector<std::int64_t>{}));
  (void)ml::quantize_model_sequential(alone, windows(), rtn, {}, transform);
  CHECK(quantized_bytes(spread) == quantized_bytes(alone));
  for (std::int64_t i = 0; i < spread.num_layers(); ++i) {
    CHECK(floats(spread.block(i).input_norm()) == floats(alone.block(i).input_norm()));
    CHECK(floats(spread.block(i).post_norm()) == floats(alone.block(i).post_norm()));
  }
  // The scaling did act: the model differs from plain round to nearest.
  ml::Model plain = model();
  (void)ml::quantize_model_weights(plain, rtn);
  CHECK(quantized_bytes(plain) != quantized_bytes(alone));
  CHECK(same_on_every_rank(quantized_bytes(spread)));
}

TEST_CASE("distributed calibration: a solve failing on one rank stops every rank") {
  // k_proj of block 0 is solved by rank 1 % size: that rank throws, the others learn of it.
  const ml::LayerQuantizer failing = [](const std::string& name, const Tensor& w, const Tensor&) {
    if (name == "model.layers.0.self_attn.k_proj") throw Error("no solve for " + name);
    return quant::quantize(w, kFormat);
  };
  ml::Model m = model();
  std::string message;
  try {
    (void)ml::quantize_model_sequential(m, windows(), failing, {}, {}, {}, world());
  } catch (const Error& e) {
    message = e.what();
  }
  const bool solver = world().rank() == 1 % world().size();
  INFO(message);
  CHECK(message.find(solver ? "no solve for model.layers.0.self_attn.k_proj" : "other rank") != std::string::npos);
  // Every rank is still in step: a collective after the failure completes.
  CHECK(world().all_reduce_sum(1.0) == double(world().size()));
}
