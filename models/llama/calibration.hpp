#pragma once
// Calibration for post-training quantization (docs/ptq.md, "Calibration"), as GPTQ does it
// (../shared/methods/baselines.md section 3; IST-DASLab/gptq datautils.get_wikitext2 and llama.py):
//
// Sampling. The calibration text is tokenized once (one BOS at the start; JSONL {"text"} rows joined with
// "\n\n", exactly as perplexity evaluation reads a file), and N windows of L tokens start at seeded random
// positions i drawn uniformly from [0, n - L - 1] (GPTQ's random.randint(0, n - L - 1)). The draws are
// Philox (core/philox.hpp), so a seed gives the same windows on every machine. L is a parameter because
// the calibration length changes the activation statistics (SLAC, w4a8-aqas-slac-dint.md section 2); it
// is shrunk, with a warning, to the model's context or to what the text can give.
//
// The sequential pass. Every window is embedded; then block by block:
//   1. the BlockTransform (AWQ / AQAS scaling) sees the block's inputs (this rank's windows');
//   2. for each true-sequential group [q,k,v] -> [o] -> [gate,up] -> [down] (or all seven at once), the
//      block runs over every window, one window at a time, and Context::observe_linear_input feeds each
//      group member's GramAccumulator (H = X^T X / N, streaming: memory does not grow with N); then the
//      LayerQuantizer turns (name, dense f32 CPU weight, H) into a QuantizedTensor that replaces the
//      linear, so the next group's inputs already come through the quantized members before it;
//   3. the quantized block runs over every window to give the next block its inputs: block l is
//      calibrated on the outputs of the already quantized blocks < l.
// Raw input rows are not kept for the quantizers (no max_sample_rows): every method registered here works
// from H, and the per-block transforms receive the block's inputs themselves.
//
// Across ranks (docs/distributed.md, "Distributed calibration"): every rank holds the whole model and the
// same seeded window list; window k is forwarded by rank k % size (dist::ShardedRows), so the forwards are
// sharded. Before each group's solves one all-reduce sums the ranks' raw X^T X and one their row counts;
// H = sum / N then equals one process's (f64 sums rounded to f32 once, quant/gram.hpp: the summation order
// does not show, bar an element within 1e-16 of an f32 rounding midpoint; on CUDA, to f32 rounding). Each
// solve runs once, on one rank (member j of the group on rank j % size), and its QuantizedTensor is
// broadcast byte for byte: every rank installs the same codes, and the group's independent solves run in
// parallel. A BlockTransform runs on every rank with that rank's windows' block inputs only; apply_aqas
// exchanges its per-window statistics and errors exactly, so every rank picks one process's scales and folds
// them itself (models/llama/aqas.hpp). Local work between collectives runs in dist::fail_together, so a
// failure on one rank stops all of them instead of leaving them waiting.

#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/philox.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/dist/communicator.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/sharded_rows.hpp"
#include "qlora/dist/single_process.hpp"
#include "qlora/io/tokenizer.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/gram.hpp"
#include "qlora/train/evaluation.hpp"
#include "models/llama/aqas.hpp"
#include "models/llama/model.hpp"

namespace qlora::models::llama {

// ---- sampling ------------------------------------------------------------------------------------------

struct CalibrationSampling {
  std::int64_t samples = 128;   // N windows (GPTQ's nsamples)
  std::int64_t seq_len = 2048;  // L tokens each (GPTQ's seqlen; SLAC's calibration length)
  std::uint64_t seed = 0;
};

struct CalibrationSet {
  std::vector<Tensor> windows;       // N i32 CPU tensors (1, L)
  std::vector<std::int64_t> starts;  // the token offset of each window in the tokenized text
  std::int64_t seq_len = 0;          // L actually used (after shrinking)
  std::int64_t text_tokens = 0;      // tokens of the whole text
  std::vector<std::string> warnings; // what was shrunk, and why
};

// Philox subsequence of the calibration draws (0 and 1 are the uniform and normal streams).
inline constexpr std::uint32_t kCalibrationStream = 2;

// The start of window k: a 64-bit Philox draw reduced modulo the number of starts (a bias below
// starts / 2^64, far below anything measurable).
inline std::int64_t calibration_start(std::uint64_t seed, std::int64_t k, std::int64_t starts) {
  const PhiloxBlock b = philox_block(seed, std::uint64_t(k), kCalibrationStream);
  const std::uint64_t bits = std::uint64_t(b.x[0]) | (std::uint64_t(b.x[1]) << 32);
  return std::int64_t(bits % std::uint64_t(starts));
}

// Windows of the tokenized text `ids`; max_positions is the model's context (max_position_embeddings).
inline CalibrationSet sample_calibration_windows(const std::vector<std::int32_t>& ids, const CalibrationSampling& s,
                                                 std::int64_t max_positions) {
  QLORA_CHECK(s.samples >= 1, "calibration: the number of samples must be at least 1, got " + std::to_string(s.samples));
  QLORA_CHECK(s.seq_len >= 2, "calibration: the sequence length must be at least 2, got " + std::to_string(s.seq_len));
  CalibrationSet out;
  out.text_tokens = std::int64_t(ids.size());
  std::int64_t len = s.seq_len;
  if (len > max_positions) {
    out.warnings.push_back("calibration sequence length " + std::to_string(len) + " shrunk to the model's context of " +
                           std::to_string(max_positions) + " tokens");
    len = max_positions;
  }
  // GPTQ's starts: 0 .. n - L - 1, so the text must hold at least L + 1 tokens.
  if (len > out.text_tokens - 1) {
    QLORA_CHECK(out.text_tokens - 1 >= 2, "calibration: the text has only " + std::to_string(out.text_tokens) +
                                              " tokens, too few for a window of at least 2");
    out.warnings.push_back("calibration sequence length " + std::to_string(len) + " shrunk to " +
                           std::to_string(out.text_tokens - 1) + ": the text has only " +
                           std::to_string(out.text_tokens) + " tokens");
    len = out.text_tokens - 1;
  }
  out.seq_len = len;
  const std::int64_t starts = out.text_tokens - len;
  for (std::int64_t k = 0; k < s.samples; ++k) {
    const std::int64_t start = calibration_start(s.seed, k, starts);
    out.starts.push_back(start);
    const std::vector<std::int32_t> window(ids.begin() + start, ids.begin() + start + len);
    out.windows.push_back(Tensor::from(window, Shape{1, len}));
  }
  return out;
}

// The windows of a calibration file (plain text, or JSONL of {"text"} rows).
inline CalibrationSet calibration_windows(const io::Tokenizer& tokenizer, const std::string& path,
                                          const CalibrationSampling& s, std::int64_t max_positions) {
  return sample_calibration_windows(train::perplexity_ids(tokenizer, path), s, max_positions);
}

// ---- the sequential pass -------------------------------------------------------------------------------

// (layer name, its dense weight [out, in] f32 on the CPU, its Gram H = X^T X / N [in, in] f32 on the CPU;
// undefined for methods without calibration) -> the quantized weight.
using LayerQuantizer =
    std::function<quant::QuantizedTensor(const std::string& layer, const Tensor& weight, const Tensor& gram)>;
// A per-block transform run before the block's linears are quantized (AWQ / AQAS scaling), with the block's
// inputs of this rank's windows (window k on rank k % comm.size(), dist::ShardedRows' deal; all of them in a
// world of one), one (1, L, hidden) tensor per window in window order, on the model's device. Collective:
// every rank calls it; it must leave the block identical on every rank and fail alike on every rank
// (apply_aqas does both: see models/llama/aqas.hpp).
using BlockTransform =
    std::function<void(DecoderBlock& block, const std::vector<Tensor>& block_inputs, dist::Communicator& comm)>;
// One line per quantized layer ("block 3/32 q_proj: 1.2 s").
using CalibrationProgress = std::function<void(const std::string& line)>;

struct CalibrationOptions {
  // GPTQ's --true-sequential: [q,k,v] -> [o] -> [gate,up] -> [down], the block re-run between groups so
  // each group is calibrated on the outputs of the quantized groups before it. Off: all seven from one pass.
  bool true_sequential = true;
};

struct QuantizationSummary {
  std::int64_t layers = 0;           // linears quantized
  std::int64_t calibration_rows = 0; // tokens per layer (N * L), 0 without calibration
  double seconds = 0;
};

namespace detail {

using Proj = DecoderBlock::Proj;

inline std::vector<std::vector<Proj>> sequential_groups(bool true_sequential) {
  if (!true_sequential)
    return {{Proj::q_proj, Proj::k_proj, Proj::v_proj, Proj::o_proj, Proj::gate_proj, Proj::up_proj, Proj::down_proj}};
  return {{Proj::q_proj, Proj::k_proj, Proj::v_proj}, {Proj::o_proj}, {Proj::gate_proj, Proj::up_proj}, {Proj::down_proj}};
}

// The quantizer's output for one linear of the block, checked against the linear's shape.
inline quant::QuantizedTensor solve_linear(const DecoderBlock& block, Proj p, const LayerQuantizer& quantizer,
                                           const Tensor& gram) {
  const nn::Linear& linear = block.linear(p);
  const std::string name = linear.name();
  const Tensor weight = linear.merged_weight(DType::f32);
  quant::QuantizedTensor q = quantizer(name, weight, gram);
  QLORA_CHECK(q.rows == linear.out_features() && q.cols == linear.in_features(),
              "quantizer for " + name + " returned a " + std::to_string(q.rows) + " x " + std::to_string(q.cols) +
                  " matrix, expected " + std::to_string(linear.out_features()) + " x " +
                  std::to_string(linear.in_features()));
  q.check(name);
  return q;
}

// Replaces one linear of the block by its quantized weight (no adapter; same dropout stream as load).
inline void install_quantized(DecoderBlock& block, Proj p, const quant::QuantizedTensor& q, Device device) {
  const std::string name = block.linear(p).name();
  const std::uint64_t stream = std::uint64_t(block.index()) * DecoderBlock::kProjCount + std::uint64_t(p);
  block.replace_linear(p, nn::make_linear(name, nn::BaseWeight(q.to(device)), nn::AdapterConfig{nn::AdapterKind::none},
                                          0, stream));
}

// ---- collectives of the distributed pass (identities in a world of one) ----

// The members of a QuantizedTensor, in QuantizedTensor::to's order.
inline std::vector<Tensor*> quantized_members(quant::QuantizedTensor& q) {
  return {&q.codes, &q.scales, &q.zeros, &q.absmax_codes, &q.absmax_scales};
}

// q = root's q on every rank (on the host), byte for byte. The other ranks' q is ignored: root first
// broadcasts the layout (config name, rows, cols, absmax_mean's bits, each member's dtype and shape), then
// each member's bytes.
inline void broadcast_quantized(dist::Communicator& comm, quant::QuantizedTensor& q, int root) {
  if (comm.size() == 1) return;
  const bool sender = comm.rank() == root;
  std::vector<std::int64_t> layout;
  std::string header;
  if (sender) {
    q = q.to(Device::cpu());
    std::uint32_t mean_bits = 0;
    std::memcpy(&mean_bits, &q.absmax_mean, sizeof mean_bits);
    layout = {q.rows, q.cols, std::int64_t(mean_bits)};
    for (Tensor* t : quantized_members(q)) {
      layout.push_back(t->defined() ? std::int64_t(t->dtype()) : -1);
      layout.push_back(t->defined() ? t->rank() : 0);
      for (int i = 0; i < Shape::kMaxRank; ++i) layout.push_back(t->defined() && i < t->rank() ? t->dim(i) : 0);
    }
    header.assign(reinterpret_cast<const char*>(layout.data()), layout.size() * sizeof(std::int64_t));
    header += q.config.name();
  }
  header = comm.broadcast_bytes(header, root);
  if (!sender) {
    constexpr std::size_t kWords = 3 + 5 * (2 + Shape::kMaxRank);
    QLORA_CHECK(header.size() > kWords * sizeof(std::int64_t), "broadcast of a quantized layer: truncated layout");
    layout.resize(kWords);
    std::memcpy(layout.data(), header.data(), kWords * sizeof(std::int64_t));
    q = quant::QuantizedTensor{};
    q.config = quant::QuantConfig::parse(header.substr(kWords * sizeof(std::int64_t)));
    q.rows = layout[0];
    q.cols = layout[1];
    const auto mean_bits = std::uint32_t(layout[2]);
    std::memcpy(&q.absmax_mean, &mean_bits, sizeof mean_bits);
    std::size_t at = 3;
    for (Tensor* t : quantized_members(q)) {
      const std::int64_t dtype = layout[at], rank = layout[at + 1];
      Shape shape;
      for (std::int64_t i = 0; i < rank; ++i) shape = shape.appended(layout[at + 2 + std::size_t(i)]);
      if (dtype >= 0) *t = Tensor::empty(shape, DType(dtype), Device::cpu());
      at += 2 + Shape::kMaxRank;
    }
  }
  for (Tensor* t : quantized_members(q))
    if (t->defined()) comm.broadcast_(*t, root);
}

// The Grams of one group over every rank's rows: one all-reduce of the raw sums X^T X packed end to end (in
// f64, the CPU accumulator's dtype: see quant/gram.hpp for why), one of the row counts, then H = sum / N
// (GramAccumulator::gram) on every rank.
inline std::vector<Tensor> reduced_grams(dist::Communicator& comm, std::vector<quant::GramAccumulator*> grams) {
  if (comm.size() > 1) {
    std::int64_t total = 0;
    for (const quant::GramAccumulator* g : grams) total += g->features() * g->features();
    Tensor packed = Tensor::empty(Shape{total}, DType::f64, Device::cpu());
    std::vector<double> rows;
    std::int64_t at = 0;
    for (quant::GramAccumulator* g : grams) {
      const Tensor& sum = g->raw_sum();
      packed.slice(at, at + sum.numel()).copy_from(sum.to(Device::cpu()).to(DType::f64).reshape(Shape{sum.numel()}));
      at += sum.numel();
      rows.push_back(double(g->rows()));
    }
    comm.all_reduce_sum_(packed);
    rows = comm.all_reduce_sums(std::move(rows));
    at = 0;
    for (std::size_t j = 0; j < grams.size(); ++j) {
      Tensor& sum = grams[j]->raw_sum();
      sum.copy_from(packed.slice(at, at + sum.numel()).reshape(sum.shape()).to(sum.dtype()));
      at += sum.numel();
      grams[j]->set_rows(std::int64_t(rows[j]));
    }
  }
  std::vector<Tensor> out;
  for (const quant::GramAccumulator* g : grams) out.push_back(g->gram());
  return out;
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// "1.23 s" for progress lines.
inline std::string seconds_text(double s) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.2f s", s);
  return buffer;
}

inline std::string short_name(const std::string& layer) { return layer.substr(layer.rfind('.') + 1); }

}  // namespace detail

// Without calibration (RTN, NF4): every block linear through the quantizer with an undefined Gram.
inline QuantizationSummary quantize_model_weights(Model& model, const LayerQuantizer& quantizer,
                                                  const CalibrationProgress& progress = {}) {
  QLORA_CHECK(bool(quantizer), "quantize_model_weights: no layer quantizer");
  const auto t0 = std::chrono::steady_clock::now();
  QuantizationSummary summary;
  for (std::int64_t i = 0; i < model.num_layers(); ++i) {
    const auto tb = std::chrono::steady_clock::now();
    for (int p = 0; p < DecoderBlock::kProjCount; ++p) {
      const auto proj = detail::Proj(p);
      detail::install_quantized(model.block(i), proj, detail::solve_linear(model.block(i), proj, quantizer, Tensor()),
                                model.device());
      ++summary.layers;
    }
    if (progress)
      progress("block " + std::to_string(i + 1) + "/" + std::to_string(model.num_layers()) + ": " +
               detail::seconds_text(detail::seconds_since(tb)));
  }
  summary.seconds = detail::seconds_since(t0);
  return summary;
}

// The sequential calibrated pass (see the file comment). windows: i32 (1, L) token tensors (any device),
// the same list on every rank of `comm`; the model is modified in place: every block linear ends up
// quantized, with no adapter, identically on every rank. Collective: every rank of comm calls it alike.
inline QuantizationSummary quantize_model_sequential(Model& model, const std::vector<Tensor>& windows,
                                                     const LayerQuantizer& quantizer,
                                                     const CalibrationOptions& options = {},
                                                     const BlockTransform& transform = {},
                                                     const CalibrationProgress& progress = {},
                                                     dist::Communicator& comm = dist::single_process()) {
  QLORA_CHECK(bool(quantizer), "quantize_model_sequential: no layer quantizer");
  QLORA_CHECK(!windows.empty(), "quantize_model_sequential: no calibration windows");
  const auto t0 = std::chrono::steady_clock::now();
  const Device device = model.device();
  QuantizationSummary summary;
  for (const Tensor& w : windows) {
    QLORA_CHECK(w.defined() && w.rank() == 2 && w.dtype() == DType::i32,
                "calibration windows must be i32 (batch, seq) token tensors, got " +
                    (w.defined() ? w.str() : std::string("(undefined)")));
    summary.calibration_rows += w.numel();
  }
  // This rank's windows (all of them in a world of one) and their block inputs, in window order.
  const dist::ShardedRows deal(comm, std::int64_t(windows.size()), 1);
  std::vector<Tensor> inputs;
  dist::fail_together(comm, [&] {
    for (std::size_t k = 0; k < windows.size(); ++k)
      if (deal.mine(std::int64_t(k))) inputs.push_back(model.embed(windows[k]));
  });

  nn::Context ctx;
  ctx.training = false;
  const auto run_block = [&](DecoderBlock& block, bool keep_outputs) {
    std::vector<Tensor> outputs;
    for (const Tensor& x : inputs) {
      Tensor y = block.forward(ctx, x);
      if (keep_outputs) outputs.push_back(std::move(y));
    }
    return outputs;
  };

  const std::int64_t n_blocks = model.num_layers();
  for (std::int64_t i = 0; i < n_blocks; ++i) {
    DecoderBlock& block = model.block(i);
    const std::string where = "block " + std::to_string(i + 1) + "/" + std::to_string(n_blocks);
    if (transform) {
      // Every rank on its own windows. The transform's own collectives share its failures; fail_together
      // also stops every rank when a transform without collectives throws on one of them.
      const auto tt = std::chrono::steady_clock::now();
      dist::fail_together(comm, [&] { transform(block, inputs, comm); });
      if (progress) progress(where + " transform: " + detail::seconds_text(detail::seconds_since(tt)));
    }
    for (const std::vector<detail::Proj>& group : detail::sequential_groups(options.true_sequential)) {
      std::map<std::string, quant::GramAccumulator> grams;
      std::vector<quant::GramAccumulator*> in_order;
      for (detail::Proj p : group) {
        const nn::Linear& l = block.linear(p);
        in_order.push_back(&grams.emplace(l.name(), quant::GramAccumulator(l.in_features(), device)).first->second);
      }
      dist::fail_together(comm, [&] {
        ctx.observe_linear_input = [&](const std::string& layer, const Tensor& x) {
          const auto it = grams.find(layer);
          if (it != grams.end()) it->second.add(x);
        };
        (void)run_block(block, false);
        ctx.observe_linear_input = nullptr;
      });
      const std::vector<Tensor> hs = detail::reduced_grams(comm, in_order);
      // Member j is solved by rank j % size; the table carries each solve's seconds to every rank.
      dist::ShardedRows solves(comm, std::int64_t(group.size()), 1);
      std::vector<quant::QuantizedTensor> solved(group.size());
      dist::fail_together(comm, [&] {
        for (std::size_t j = 0; j < group.size(); ++j) {
          if (!solves.mine(std::int64_t(j))) continue;
          const auto tl = std::chrono::steady_clock::now();
          solved[j] = detail::solve_linear(block, group[j], quantizer, hs[j]);
          *solves.row(std::int64_t(j)) = detail::seconds_since(tl);
        }
      });
      solves.exchange();
      for (std::size_t j = 0; j < group.size(); ++j) {
        detail::broadcast_quantized(comm, solved[j], solves.owner(std::int64_t(j)));
        detail::install_quantized(block, group[j], solved[j], device);
        ++summary.layers;
        if (progress)
          progress(where + " " + detail::short_name(block.linear(group[j]).name()) + ": " +
                   detail::seconds_text(*solves.at(std::int64_t(j))));
      }
    }
    dist::fail_together(comm, [&] { inputs = run_block(block, true); });  // the next block's inputs
  }
  summary.seconds = detail::seconds_since(t0);
  return summary;
}

}  // namespace qlora::models::llama
