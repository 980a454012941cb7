#pragma once
// AWQ / AQAS scaling of one Llama decoder block before its linears are quantized (w4a8-aqas-slac-dint.md
// section 1; the search itself: qlora/quant/aqas.hpp; usage: docs/ptq.md, "W4A8"). The four groups, in the
// order of llm-awq's auto_scale_block, each with the op whose output channels absorb diag(s)^-1:
//   qkv         q, k, v      after input_layernorm            judged on the attention module's output
//                                                             o(attention(rope q, rope k, v)), o unchanged
//   v_to_o      o            after v (v's rows)               judged on o itself; skipped when v's width
//                                                             differs from o's input (GQA), as llm-awq does
//   gate_up     gate, up     after post_attention_layernorm   judged on the MLP's output down(silu(g) * u)
//   up_to_down  down         after up (up's rows)             judged on down itself
// Every search runs on the original block (its statistics come from one forward over the calibration
// inputs); the four scalings are folded at the end. Folding is exact without quantization: the norm's
// weight (or the previous linear's row c) is divided by s[c] and the group's column c multiplied by s[c],
// so the block computes the same function (tested in f64 to 1e-12).
//
// The attention objective re-runs the block's forward with the candidate's q, k, v and the folded
// input norm and reads the o_proj input through nn::Context::observe_linear_input: exact, and the block
// has no attention-only entry point, at the price of also running the MLP once per candidate and input.
// The MLP objective needs no block forward: it starts from the observed gate_proj input.
//
// The block's linears must be dense without adapters (PTQ runs before any adapter is attached); they are
// rebuilt with nn::make_linear (their activation_bits kept) and swapped in with replace_linear.
//
// Across ranks (docs/distributed.md, "Block transforms"): each rank passes the block inputs of its own
// windows only (window k on rank k % size, dist::ShardedRows' deal). Every statistic and objective of the
// search is a sum over windows of per-window partials (quant/aqas.hpp, "Sums over the calibration
// inputs"): each rank computes its windows' rows, the rows are exchanged exactly and added in window order
// in double, so every rank gets one process's x_mag and err(a) bit for bit, picks the same scales and folds
// them itself (the fold is deterministic: no weights are broadcast). One process is the world of one.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/dist/communicator.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/sharded_rows.hpp"
#include "qlora/dist/single_process.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/quant/aqas.hpp"
#include "models/llama/block.hpp"

namespace qlora::models::llama {

struct AqasOptions {
  quant::QuantConfig weight_format;  // Qw of the search (the format the block is quantized to next)
  int activation_bits = 8;           // Qa: per-token fake quantization of the scaled linear inputs
  bool quantize_activations = true;  // false: the AWQ baseline (Qa = identity)
  int grid = 20;                     // a in {0, 1/grid, ..., (grid-1)/grid}
  bool include_identity = true;      // also try s = 1 (quant/aqas.hpp: never worse than no scaling)

  quant::ScaleSearchOptions search_options() const {
    return {weight_format, quantize_activations ? activation_bits : 0, grid, include_identity};
  }
};

enum class ScaleGroup { qkv, v_to_o, gate_up, up_to_down };

inline const char* scale_group_name(ScaleGroup g) {
  switch (g) {
    case ScaleGroup::qkv: return "input_layernorm -> q,k,v";
    case ScaleGroup::v_to_o: return "v -> o";
    case ScaleGroup::gate_up: return "post_attention_layernorm -> gate,up";
    case ScaleGroup::up_to_down: return "up -> down";
  }
  return "?";
}

// What apply_aqas searched and folded (v_to_o is empty when it was skipped).
struct AqasReport {
  std::optional<quant::ScaleSearchResult> qkv, v_to_o, gate_up, up_to_down;
};

namespace detail {

using DenseLinear = nn::QuantLinear<nn::DenseBase, nn::NoAdapter>;

inline const Tensor& dense_weight(const DecoderBlock& block, DecoderBlock::Proj p, const char* who) {
  const auto* dense = dynamic_cast<const DenseLinear*>(&block.linear(p));
  QLORA_CHECK(dense != nullptr, std::string(who) + ": block " + std::to_string(block.index()) + "'s " +
                                    block.linear(p).name() + " must be a dense linear without an adapter (scales are " +
                                    "folded before quantization), got " + block.linear(p).describe());
  return dense->base().weight();
}

// Swaps linear p for a dense one with weight w, keeping its name and activation bits unless given.
inline void replace_dense(DecoderBlock& block, DecoderBlock::Proj p, Tensor w, std::optional<int> activation_bits = {}) {
  const int bits = activation_bits.value_or(block.linear(p).activation_bits());
  const std::uint64_t stream = std::uint64_t(block.index()) * DecoderBlock::kProjCount + std::uint64_t(p);
  auto linear = nn::make_linear(block.linear(p).name(), std::move(w), nn::AdapterConfig{nn::AdapterKind::none}, 0, stream);
  linear->set_activation_bits(bits);
  block.replace_linear(p, std::move(linear));
}

inline std::vector<double> inverse(const std::vector<double>& s) {
  std::vector<double> out(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) out[i] = 1.0 / s[i];
  return out;
}

// The block's norms and dense linears as they were, to undo the candidates' temporary swaps.
class BlockSnapshot {
 public:
  explicit BlockSnapshot(DecoderBlock& block) : block_(block), input_norm_(block.input_norm()), post_norm_(block.post_norm()) {
    for (int p = 0; p < DecoderBlock::kProjCount; ++p) {
      weights_[std::size_t(p)] = dense_weight(block, DecoderBlock::Proj(p), "apply_aqas");
      bits_[std::size_t(p)] = block.linear(DecoderBlock::Proj(p)).activation_bits();
    }
  }
  void restore(DecoderBlock::Proj p) { replace_dense(block_, p, weights_[std::size_t(p)], bits_[std::size_t(p)]); }
  void restore_norms() {
    block_.input_norm() = input_norm_;
    block_.post_norm() = post_norm_;
  }
  const Tensor& weight(DecoderBlock::Proj p) const { return weights_[std::size_t(p)]; }
  const Tensor& input_norm() const { return input_norm_; }

 private:
  DecoderBlock& block_;
  Tensor input_norm_, post_norm_;
  std::array<Tensor, DecoderBlock::kProjCount> weights_;
  std::array<int, DecoderBlock::kProjCount> bits_{};
};

// The search's quant::InputSums over the windows of every rank: this rank's rows are those of its windows
// (`windows` in all, dealt as dist::ShardedRows deals them), computed inside dist::fail_together (a failure
// on one rank stops every rank instead of leaving them in the exchange), exchanged exactly and summed in
// window order. In a world of one: the rows summed in order, as quant::sum_in_input_order does.
inline quant::InputSums window_sums(dist::Communicator& comm, std::int64_t windows) {
  return [&comm, windows](std::size_t width, const quant::LocalRows& local_rows) {
    dist::ShardedRows table(comm, windows, std::int64_t(width));
    dist::fail_together(comm, [&] {
      const std::vector<std::vector<double>> rows = local_rows();
      const std::vector<std::int64_t> mine = table.my_items();
      QLORA_CHECK(rows.size() == mine.size(), "apply_aqas: " + std::to_string(rows.size()) + " rows for rank " +
                                                  std::to_string(comm.rank()) + "'s " + std::to_string(mine.size()) +
                                                  " windows");
      for (std::size_t i = 0; i < rows.size(); ++i) {
        QLORA_CHECK(rows[i].size() == width, "apply_aqas: a row of " + std::to_string(rows[i].size()) +
                                                 " values, expected " + std::to_string(width));
        std::copy(rows[i].begin(), rows[i].end(), table.row(mine[i]));
      }
    });
    table.exchange();
    return table.column_sums();
  };
}

}  // namespace detail

// v -> o needs one scale per v output channel to be the scale of o's input channel: false under GQA.
inline bool can_fold(const DecoderBlock& block, ScaleGroup group) {
  if (group != ScaleGroup::v_to_o) return true;
  return block.linear(DecoderBlock::v_proj).out_features() == block.linear(DecoderBlock::o_proj).in_features();
}

// Folds s (one per input channel of the group) into the block: exact in exact arithmetic.
inline void fold_scales(DecoderBlock& block, ScaleGroup group, const std::vector<double>& s) {
  using P = DecoderBlock;
  const std::string who = std::string("fold_scales (") + scale_group_name(group) + ")";
  QLORA_CHECK(can_fold(block, group), who + ": block " + std::to_string(block.index()) + " has v_proj width " +
                                          std::to_string(block.linear(P::v_proj).out_features()) + " but o_proj input " +
                                          std::to_string(block.linear(P::o_proj).in_features()) + " (GQA)");
  for (double v : s) QLORA_CHECK(v > 0 && std::isfinite(v), who + ": scales must be finite and positive");
  const std::vector<double> inv = detail::inverse(s);
  const auto fold_into_columns = [&](std::initializer_list<P::Proj> projs) {
    for (P::Proj p : projs) detail::replace_dense(block, p, quant::scale_columns(detail::dense_weight(block, p, who.c_str()), s));
  };
  switch (group) {
    case ScaleGroup::qkv:
      for (P::Proj p : {P::q_proj, P::k_proj, P::v_proj}) detail::dense_weight(block, p, who.c_str());  // check first
      block.input_norm() = quant::scale_columns(block.input_norm(), inv);
      fold_into_columns({P::q_proj, P::k_proj, P::v_proj});
      break;
    case ScaleGroup::v_to_o:
      detail::replace_dense(block, P::v_proj, quant::scale_rows(detail::dense_weight(block, P::v_proj, who.c_str()), inv));
      fold_into_columns({P::o_proj});
      break;
    case ScaleGroup::gate_up:
      for (P::Proj p : {P::gate_proj, P::up_proj}) detail::dense_weight(block, p, who.c_str());
      block.post_norm() = quant::scale_columns(block.post_norm(), inv);
      fold_into_columns({P::gate_proj, P::up_proj});
      break;
    case ScaleGroup::up_to_down:
      detail::replace_dense(block, P::up_proj, quant::scale_rows(detail::dense_weight(block, P::up_proj, who.c_str()), inv));
      fold_into_columns({P::down_proj});
      break;
  }
}

// Searches the four groups' scales on block_inputs ((batch, L, hidden) inputs of this block, in the
// block's dtype on its device) and folds them. The calibration pipeline's BlockTransform hook.
// Collective over comm: block_inputs are this rank's windows' inputs, in window order (window k on rank
// k % comm.size(); a rank may have none); every rank ends with the same block, one process's bit for bit.
inline AqasReport apply_aqas(DecoderBlock& block, const std::vector<Tensor>& block_inputs, const AqasOptions& options,
                             dist::Communicator& comm = dist::single_process()) {
  using P = DecoderBlock;
  const quant::ScaleSearchOptions search = options.search_options();
  search.validate();
  const auto windows = std::int64_t(comm.all_reduce_sum(double(block_inputs.size())));
  QLORA_CHECK(windows > 0, "apply_aqas: block " + std::to_string(block.index()) + " has no calibration inputs");
  const quant::InputSums sums = detail::window_sums(comm, windows);

  // One forward of the original block: every linear's input, per calibration input; then the reference
  // outputs of the attention and MLP objectives. Local work, so inside fail_together.
  std::optional<detail::BlockSnapshot> snapshot;
  std::map<std::string, std::vector<Tensor>> seen;
  std::vector<Tensor> attention_ref, mlp_ref;
  nn::Context ctx;
  ctx.training = false;
  dist::fail_together(comm, [&] {
    const auto mine = std::int64_t(dist::ShardedRows(comm, windows, 1).my_items().size());
    QLORA_CHECK(std::int64_t(block_inputs.size()) == mine,
                "apply_aqas: rank " + std::to_string(comm.rank()) + " holds " + std::to_string(block_inputs.size()) +
                    " block inputs, but " + std::to_string(mine) + " of the " + std::to_string(windows) +
                    " windows are its own (window k on rank k % " + std::to_string(comm.size()) + ")");
    for (const Tensor& x : block_inputs)
      QLORA_CHECK(x.defined() && x.rank() == 3, "apply_aqas: block inputs must be (batch, L, hidden), got " +
                                                    (x.defined() ? x.str() : std::string("(undefined)")));
    snapshot.emplace(block);  // also checks that every linear is dense
    nn::Context observe;
    observe.training = false;
    observe.observe_linear_input = [&](const std::string& name, const Tensor& x) { seen[name].push_back(x); };
    for (const Tensor& x : block_inputs) block.forward(observe, x);
    for (const Tensor& x : seen[block.linear(P::o_proj).name()])
      attention_ref.push_back(block.linear(P::o_proj).forward(ctx, x));
    for (const Tensor& x : seen[block.linear(P::down_proj).name()])
      mlp_ref.push_back(block.linear(P::down_proj).forward(ctx, x));
  });
  detail::BlockSnapshot& original = *snapshot;
  const auto inputs_of = [&](P::Proj p) { return seen[block.linear(p).name()]; };  // empty on a rank without windows
  const auto weights_of = [&](std::initializer_list<P::Proj> projs) {
    std::vector<Tensor> w;
    for (P::Proj p : projs) w.push_back(original.weight(p));
    return w;
  };
  const std::vector<Tensor> o_inputs = inputs_of(P::o_proj), down_inputs = inputs_of(P::down_proj);

  AqasReport report;
  try {
    // q, k, v: the attention module's output, o(o_input), through the block's own forward.
    const auto attention_error = [&](const quant::ScaleCandidate& c) {
      block.input_norm() = quant::scale_columns(original.input_norm(), detail::inverse(c.scales));
      const P::Proj members[] = {P::q_proj, P::k_proj, P::v_proj};  // the order of c.weights
      for (std::size_t i = 0; i < 3; ++i) detail::replace_dense(block, members[i], c.weights[i], c.activation_bits);
      Tensor o_input;
      nn::Context eval;
      eval.training = false;
      eval.observe_linear_input = [&](const std::string& name, const Tensor& x) {
        if (name == block.linear(P::o_proj).name()) o_input = x;
      };
      std::vector<quant::InputError> errors;
      for (std::size_t b = 0; b < block_inputs.size(); ++b) {
        block.forward(eval, block_inputs[b]);
        errors.push_back({quant::squared_difference(block.linear(P::o_proj).forward(ctx, o_input), attention_ref[b]),
                          double(attention_ref[b].numel())});
      }
      return errors;
    };
    report.qkv = quant::search_scales(weights_of({P::q_proj, P::k_proj, P::v_proj}), inputs_of(P::q_proj), search,
                                      attention_error, sums);
    original.restore_norms();
    for (P::Proj p : {P::q_proj, P::k_proj, P::v_proj}) original.restore(p);

    if (can_fold(block, ScaleGroup::v_to_o))
      report.v_to_o = quant::search_scales(weights_of({P::o_proj}), o_inputs, search, {}, sums);

    // gate, up: the MLP's output down(silu(gate(x)) * up(x)), from the observed gate_proj input.
    const std::vector<Tensor> mlp_inputs = inputs_of(P::gate_proj);
    const auto mlp_error = [&](const quant::ScaleCandidate& c) {
      std::vector<quant::InputError> errors;
      for (std::size_t b = 0; b < mlp_inputs.size(); ++b) {
        const Tensor x = c.scaled_input(mlp_inputs[b]);
        const Tensor hidden = ops::swiglu(ops::matmul(x, c.weights[0], false, true), ops::matmul(x, c.weights[1], false, true));
        errors.push_back({quant::squared_difference(block.linear(P::down_proj).forward(ctx, hidden), mlp_ref[b]),
                          double(mlp_ref[b].numel())});
      }
      return errors;
    };
    report.gate_up = quant::search_scales(weights_of({P::gate_proj, P::up_proj}), mlp_inputs, search, mlp_error, sums);
    report.up_to_down = quant::search_scales(weights_of({P::down_proj}), down_inputs, search, {}, sums);
  } catch (...) {
    original.restore_norms();
    for (int p = 0; p < P::kProjCount; ++p) original.restore(P::Proj(p));
    throw;
  }

  // Fold, in llm-awq's order (the four scalings commute: they touch different sides of v and up).
  const auto fold = [&](ScaleGroup g, const std::optional<quant::ScaleSearchResult>& r) {
    if (r && !r->identity_chosen) fold_scales(block, g, r->scales);
  };
  fold(ScaleGroup::qkv, report.qkv);
  fold(ScaleGroup::v_to_o, report.v_to_o);
  fold(ScaleGroup::gate_up, report.gate_up);
  fold(ScaleGroup::up_to_down, report.up_to_down);
  return report;
}

}  // namespace qlora::models::llama
