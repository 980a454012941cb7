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
//   1. the BlockTransform (AWQ / AQAS scaling) sees the block's inputs;
//   2. for each true-sequential group [q,k,v] -> [o] -> [gate,up] -> [down] (or all seven at once), the
//      block runs over every window, one window at a time, and Context::observe_linear_input feeds each
//      group member's GramAccumulator (H = X^T X / N, streaming: memory does not grow with N); then the
//      LayerQuantizer turns (name, dense f32 CPU weight, H) into a QuantizedTensor that replaces the
//      linear, so the next group's inputs already come through the quantized members before it;
//   3. the quantized block runs over every window to give the next block its inputs: block l is
//      calibrated on the outputs of the already quantized blocks < l.
// Raw input rows are not kept for the quantizers (no max_sample_rows): every method registered here works
// from H, and the per-block transforms receive the block's inputs themselves.

#include <chrono>
#include <cstdio>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/philox.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/io/tokenizer.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/gram.hpp"
#include "qlora/train/evaluation.hpp"
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
// A per-block transform run before the block's linears are quantized (AWQ / AQAS scaling), with the
// block's inputs, one (1, L, hidden) tensor per window on the model's device.
using BlockTransform = std::function<void(DecoderBlock& block, const std::vector<Tensor>& block_inputs)>;
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

// Replaces one linear of the block by the quantizer's output (no adapter; same dropout stream as load).
inline void quantize_linear(DecoderBlock& block, Proj p, const LayerQuantizer& quantizer, const Tensor& gram,
                            Device device) {
  nn::Linear& linear = block.linear(p);
  const std::string name = linear.name();
  const Tensor weight = linear.merged_weight(DType::f32);
  quant::QuantizedTensor q = quantizer(name, weight, gram);
  QLORA_CHECK(q.rows == linear.out_features() && q.cols == linear.in_features(),
              "quantizer for " + name + " returned a " + std::to_string(q.rows) + " x " + std::to_string(q.cols) +
                  " matrix, expected " + std::to_string(linear.out_features()) + " x " +
                  std::to_string(linear.in_features()));
  q.check(name);
  const std::uint64_t stream = std::uint64_t(block.index()) * DecoderBlock::kProjCount + std::uint64_t(p);
  block.replace_linear(p, nn::make_linear(name, nn::BaseWeight(q.to(device)), nn::AdapterConfig{nn::AdapterKind::none},
                                          0, stream));
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
      detail::quantize_linear(model.block(i), detail::Proj(p), quantizer, Tensor(), model.device());
      ++summary.layers;
    }
    if (progress)
      progress("block " + std::to_string(i + 1) + "/" + std::to_string(model.num_layers()) + ": " +
               detail::seconds_text(detail::seconds_since(tb)));
  }
  summary.seconds = detail::seconds_since(t0);
  return summary;
}

// The sequential calibrated pass (see the file comment). windows: i32 (1, L) token tensors (any device);
// the model is modified in place: every block linear ends up quantized, with no adapter.
inline QuantizationSummary quantize_model_sequential(Model& model, const std::vector<Tensor>& windows,
                                                     const LayerQuantizer& quantizer,
                                                     const CalibrationOptions& options = {},
                                                     const BlockTransform& transform = {},
                                                     const CalibrationProgress& progress = {}) {
  QLORA_CHECK(bool(quantizer), "quantize_model_sequential: no layer quantizer");
  QLORA_CHECK(!windows.empty(), "quantize_model_sequential: no calibration windows");
  const auto t0 = std::chrono::steady_clock::now();
  const Device device = model.device();
  QuantizationSummary summary;
  std::vector<Tensor> inputs;
  inputs.reserve(windows.size());
  for (const Tensor& w : windows) {
    QLORA_CHECK(w.defined() && w.rank() == 2 && w.dtype() == DType::i32,
                "calibration windows must be i32 (batch, seq) token tensors, got " +
                    (w.defined() ? w.str() : std::string("(undefined)")));
    summary.calibration_rows += w.numel();
    inputs.push_back(model.embed(w));
  }

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
      const auto tt = std::chrono::steady_clock::now();
      transform(block, inputs);
      if (progress) progress(where + " transform: " + detail::seconds_text(detail::seconds_since(tt)));
    }
    for (const std::vector<detail::Proj>& group : detail::sequential_groups(options.true_sequential)) {
      std::map<std::string, quant::GramAccumulator> grams;
      for (detail::Proj p : group) {
        const nn::Linear& l = block.linear(p);
        grams.emplace(l.name(), quant::GramAccumulator(l.in_features(), device));
      }
      ctx.observe_linear_input = [&](const std::string& layer, const Tensor& x) {
        const auto it = grams.find(layer);
        if (it != grams.end()) it->second.add(x);
      };
      (void)run_block(block, false);
      ctx.observe_linear_input = nullptr;
      for (detail::Proj p : group) {
        const auto tl = std::chrono::steady_clock::now();
        const std::string name = block.linear(p).name();
        detail::quantize_linear(block, p, quantizer, grams.at(name).gram(), device);
        ++summary.layers;
        if (progress)
          progress(where + " " + detail::short_name(name) + ": " + detail::seconds_text(detail::seconds_since(tl)));
      }
    }
    inputs = run_block(block, true);  // the quantized block's outputs: the next block's inputs
  }
  summary.seconds = detail::seconds_since(t0);
  return summary;
}

}  // namespace qlora::models::llama
