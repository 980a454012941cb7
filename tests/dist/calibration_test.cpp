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
//   * AWQ and AQAS (a block transform: every rank searches on its own windows' block inputs only, exchanging
//     per-window statistics and errors exactly) give one process's scales, dense block (weights and norms)
//     and, after round to nearest, quantized model bit for bit, with nothing broadcast; the transform sees
//     exactly this rank's windows, in window order (compared with the embeddings of those windows);
//   * apply_aqas alone on a block gives one process's report (every err(a), the chosen scales) and block bit
//     for bit, also when a rank holds no window (2 windows on 3 ranks);
//   * a solve failing on one rank, or a malformed block input on one rank, makes every rank throw instead of
//     leaving them waiting.
// Five windows: uneven shares on 2 and 3 ranks.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "dist/dist_test_util.hpp"
#include "models/llama/aqas.hpp"
#include "models/llama/calibration.hpp"
#include "models/llama/load.hpp"
#include "qlora/dist/sharded_rows.hpp"
#include "qlora/dist/single_process.hpp"
#include "qlora/quant/gptq.hpp"
#include "qlora/quant/quantize.hpp"
#include "support/files.hpp"
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

ml::Model model(DType dtype = DType::f32) {
  ml::LoadOptions o;
  o.dtype = dtype;
  return ml::random_model(config(), o, 17, 0.2f);
}

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

namespace {

// AWQ (activations unquantized in the search) or AQAS (8-bit activations), with a short grid: enough to move
// the scales, and every grid point is still compared across worlds.
ml::AqasOptions scale_search(bool quantize_activations) {
  ml::AqasOptions o;
  o.weight_format = kFormat;
  o.quantize_activations = quantize_activations;
  o.grid = 4;
  return o;
}

// The block's norms and dense weights end to end, as bytes of their own dtype.
std::vector<std::uint8_t> dense_block_bytes(const ml::DecoderBlock& block) {
  std::vector<std::uint8_t> out;
  const auto append = [&](const Tensor& t) {
    const auto b = bytes_of(t);
    out.insert(out.end(), b.begin(), b.end());
  };
  append(block.input_norm());
  append(block.post_norm());
  for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) append(ml::detail::dense_weight(block, ml::DecoderBlock::Proj(p), "test"));
  return out;
}

// Everything a search reports, as doubles end to end (bitwise comparable).
std::vector<double> report_values(const ml::AqasReport& r) {
  std::vector<double> out;
  for (const auto* s : {&r.qkv, &r.v_to_o, &r.gate_up, &r.up_to_down}) {
    out.push_back(s->has_value() ? 1.0 : 0.0);
    if (!s->has_value()) continue;
    const quant::ScaleSearchResult& v = **s;
    out.insert(out.end(), v.errors.begin(), v.errors.end());
    out.push_back(v.identity_error);
    out.push_back(double(v.best_grid));
    out.push_back(v.identity_chosen ? 1.0 : 0.0);
    out.insert(out.end(), v.scales.begin(), v.scales.end());
  }
  return out;
}

// This rank's windows of `all` (window k on rank k % size), in window order.
std::vector<Tensor> my_share(const std::vector<Tensor>& all) {
  std::vector<Tensor> out;
  for (std::int64_t k : dist::ShardedRows(world(), std::int64_t(all.size()), 1).my_items()) out.push_back(all[std::size_t(k)]);
  return out;
}

}  // namespace

TEST_CASE("distributed calibration: AWQ and AQAS on each rank's windows give one process's block and model bit for bit") {
  for (const bool aqas : {false, true}) {
    INFO((aqas ? "AQAS" : "AWQ"));
    const ml::AqasOptions options = scale_search(aqas);
    const std::vector<Tensor> ids = windows();
    // What each transform saw and made: the block's dense bytes after the search, per block.
    std::map<std::int64_t, std::vector<std::uint8_t>> spread_blocks, alone_blocks;
    std::vector<std::size_t> seen_counts;
    ml::Model spread = model(), alone = model();
    const ml::Model reference = model();  // block 0's inputs are these embeddings
    const auto recording = [&](std::map<std::int64_t, std::vector<std::uint8_t>>& made, bool check_share) {
      return [&, check_share, made = &made](ml::DecoderBlock& block, const std::vector<Tensor>& inputs,
                                            dist::Communicator& comm) {
        if (check_share) {
          // Only this rank's windows, in window order: block 0's inputs are exactly their embeddings.
          const std::vector<std::int64_t> mine = dist::ShardedRows(comm, std::int64_t(ids.size()), 1).my_items();
          seen_counts.push_back(inputs.size());
          REQUIRE(inputs.size() == mine.size());
          if (block.index() == 0)
            for (std::size_t i = 0; i < mine.size(); ++i)
              CHECK(floats(inputs[i]) == floats(reference.embed(ids[std::size_t(mine[i])])));
        }
        (void)ml::apply_aqas(block, inputs, options, comm);
        (*made)[block.index()] = dense_block_bytes(block);
      };
    };
    const ml::LayerQuantizer rtn = [](const std::string&, const Tensor& w, const Tensor&) {
      return quant::quantize(w, kFormat);
    };
    (void)ml::quantize_model_sequential(spread, ids, rtn, {}, recording(spread_blocks, true), {}, world());
    (void)ml::quantize_model_sequential(alone, ids, rtn, {}, recording(alone_blocks, false));
    // 5 windows: 5 in one process, 3 + 2 on two ranks, 2 + 2 + 1 on three.
    const std::size_t share = std::size_t((5 - world().rank() + world().size() - 1) / world().size());
    CHECK(seen_counts == std::vector<std::size_t>{share, share});
    CHECK(world().all_reduce_sum(double(seen_counts.front())) == 5.0);
    REQUIRE(spread_blocks.size() == 2);
    REQUIRE(alone_blocks.size() == 2);
    for (std::int64_t i = 0; i < 2; ++i) {
      INFO("block " << i);
      CHECK(spread_blocks.at(i) == alone_blocks.at(i));
      CHECK(same_on_every_rank(spread_blocks.at(i)));
      CHECK(floats(spread.block(i).input_norm()) == floats(alone.block(i).input_norm()));
      CHECK(floats(spread.block(i).post_norm()) == floats(alone.block(i).post_norm()));
    }
    CHECK(quantized_bytes(spread) == quantized_bytes(alone));
    CHECK(same_on_every_rank(quantized_bytes(spread)));
    // The scaling did act: the model differs from plain round to nearest.
    ml::Model plain = model();
    (void)ml::quantize_model_weights(plain, rtn);
    CHECK(quantized_bytes(plain) != quantized_bytes(alone));
  }
}

TEST_CASE("distributed calibration: the search's window sums are one process's sums, bit for bit") {
  // Rows whose sum depends on the order of the additions (magnitudes 1e-6 .. 1e6, full 53-bit mantissas),
  // unlike f32 block outputs, whose few windows' sums in double are often exact in any order.
  const std::size_t width = 7;
  std::vector<std::vector<double>> all;
  for (std::uint64_t k = 0; k < 11; ++k) {
    std::vector<double> row = test::random_vector<double>(width, 900 + k);
    for (double& v : row) v *= std::pow(10.0, double(int(k % 13) - 6));
    all.push_back(row);
  }
  std::vector<std::vector<double>> mine;
  for (std::int64_t k : dist::ShardedRows(world(), 11, 1).my_items()) mine.push_back(all[std::size_t(k)]);
  const std::vector<double> spread = ml::detail::window_sums(world(), 11)(width, [&] { return mine; });
  const std::vector<double> alone = quant::sum_in_input_order(width, [&] { return all; });
  CHECK(spread == alone);
  // The order does matter for these rows: summed by rank (rank 0's windows, then rank 1's ...) they differ.
  std::vector<double> by_rank(width, 0.0);
  for (int r = 0; r < 3; ++r)
    for (std::size_t k = std::size_t(r); k < all.size(); k += 3)
      for (std::size_t c = 0; c < width; ++c) by_rank[c] += all[k][c];
  CHECK(by_rank != alone);
}

TEST_CASE("distributed calibration: apply_aqas on each rank's windows reports one process's search bit for bit") {
  // f32 as quantize runs it, and f64, where every partial carries a full double mantissa and the order of the
  // additions over windows shows in the last bits.
  for (const DType dtype : {DType::f32, DType::f64}) {
    const ml::Model embedder = model(dtype);
    std::vector<Tensor> all;
    for (const Tensor& w : windows()) all.push_back(embedder.embed(w));
    // Five windows, and two (on three ranks, rank 2 then holds none and still takes part).
    for (const std::size_t n : {std::size_t(5), std::size_t(2)}) {
      const std::vector<Tensor> inputs(all.begin(), all.begin() + std::ptrdiff_t(n));
      for (const bool aqas : {false, true}) {
        INFO((aqas ? "AQAS" : "AWQ") << " on " << n << " windows, " << dtype_name(dtype));
        ml::Model spread = model(dtype), alone = model(dtype);
        const ml::AqasReport r = ml::apply_aqas(spread.block(0), my_share(inputs), scale_search(aqas), world());
        const ml::AqasReport r1 = ml::apply_aqas(alone.block(0), inputs, scale_search(aqas));
        CHECK(report_values(r) == report_values(r1));
        CHECK(dense_block_bytes(spread.block(0)) == dense_block_bytes(alone.block(0)));
        // The search moved something (else the comparison would be empty): some group chose a non-identity s.
        CHECK(dense_block_bytes(alone.block(0)) != dense_block_bytes(model(dtype).block(0)));
        REQUIRE(r.qkv.has_value());
        CHECK(r.qkv->errors.size() == 4);
        CHECK(!r.v_to_o.has_value());  // GQA: v -> o skipped
      }
    }
  }
}

TEST_CASE("distributed calibration: a malformed block input on one rank stops apply_aqas on every rank") {
  const ml::Model embedder = model();
  std::vector<Tensor> all;
  for (const Tensor& w : windows()) all.push_back(embedder.embed(w));
  std::vector<Tensor> mine = my_share(all);
  const int bad = world().size() - 1;  // holds at least one of the five windows
  if (world().rank() == bad) mine[0] = mine[0].reshape(Shape{mine[0].dim(1), mine[0].dim(2)});  // 2-D
  ml::Model m = model();
  const std::vector<std::uint8_t> before = dense_block_bytes(m.block(0));
  const std::string message = test::error_of([&] { (void)ml::apply_aqas(m.block(0), mine, scale_search(false), world()); });
  INFO(message);
  CHECK(message.find(world().rank() == bad ? "apply_aqas: block inputs must be (batch, L, hidden)" : "other rank") !=
        std::string::npos);
  CHECK(dense_block_bytes(m.block(0)) == before);  // nothing folded
  CHECK(world().all_reduce_sum(1.0) == double(world().size()));
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
