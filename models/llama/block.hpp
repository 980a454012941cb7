#pragma once
// One Llama decoder block, forward and backward written out (docs/model.md):
//   h = x + o( attention( rope(q(n1)), rope(k(n1)), v(n1) ) ),  n1 = rmsnorm(x) * w_in
//   y = h + down( silu(gate(n2)) * up(n2) ),                   n2 = rmsnorm(h) * w_post
// Every linear is an nn::Linear (frozen base + adapter); it saves its own input. The block saves what its
// own backward needs beyond that: x and h with their 1/rms, q and k after RoPE, v, the attention output
// and log-sum-exp, gate and up. Norm weights are frozen: their gradients are never formed.
// Distillation hooks (docs/objectives.md): a forward can record its attention signals (a teacher's), take a
// teacher's in place of its own (Teacher Intervention), and keep its attention branch output for a loss
// on it, whose gradient backward() then takes beside dy.

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qlora/autograd/param.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/nn/quant_linear.hpp"
#include "qlora/ops/attention.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/rmsnorm.hpp"
#include "qlora/ops/rope.hpp"
#include "qlora/train/ti_schedule.hpp"
#include "models/llama/config.hpp"
#include "models/llama/kv_cache.hpp"

namespace qlora::models::llama {

class DecoderBlock {
 public:
  // Indices into linears(), in all_block_linears() order.
  enum Proj { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, kProjCount };

  DecoderBlock(std::int64_t index, const Config& config, Tensor input_norm, Tensor post_norm,
               std::array<std::unique_ptr<nn::Linear>, kProjCount> linears, Tensor inv_freq)
      : index_(index),
        heads_(config.num_attention_heads),
        kv_heads_(config.num_key_value_heads),
        head_dim_(config.head_dim),
        eps_(float(config.rms_norm_eps)),
        input_norm_(std::move(input_norm)),
        post_norm_(std::move(post_norm)),
        linears_(std::move(linears)),
        inv_freq_(std::move(inv_freq)) {}

  std::int64_t index() const { return index_; }
  nn::Linear& linear(Proj p) { return *linears_[p]; }
  const nn::Linear& linear(Proj p) const { return *linears_[p]; }
  const Tensor& input_norm() const { return input_norm_; }
  const Tensor& post_norm() const { return post_norm_; }
  // Mutable norm weights: PTQ folds activation scales into them (AWQ/AQAS).
  Tensor& input_norm() { return input_norm_; }
  Tensor& post_norm() { return post_norm_; }

  // Swaps one linear for another of the same shape (PTQ replaces a dense base by its quantized one).
  void replace_linear(Proj p, std::unique_ptr<nn::Linear> linear) {
    QLORA_CHECK(linear && linear->in_features() == linears_[p]->in_features() &&
                    linear->out_features() == linears_[p]->out_features(),
                "llama block " + std::to_string(index_) + ": replacement for " + linears_[p]->name() +
                    " must be " + std::to_string(linears_[p]->out_features()) + " x " +
                    std::to_string(linears_[p]->in_features()));
    linears_[p] = std::move(linear);
  }

  // The attention signals of one forward (methods/teacher-intervention.md, "Mapping to a decoder-only
  // Llama"): q, k after RoPE (batch, t, heads | kv_heads, head_dim), the context = o_proj's input
  // (batch, t, heads * head_dim) and o_proj's output (batch, t, hidden).
  struct AttentionSignals {
    Tensor q, k, context, output;
  };

  // Later forwards (without a KV cache) store their signals into *signals; nullptr stops recording.
  void record_attention(AttentionSignals* signals) { record_ = signals; }

  // Later forwards (without a KV cache) replace the block's own signal at `point` by the teacher's, which
  // must stay alive and unchanged until the backward (and the checkpointing recompute) has run:
  //   map: attention(q_T, k_T, v); context: o_proj(context_T); output: output_T. The replaced path and
  // everything only it feeds (q, k under map; q, k, v, attention under context; also o_proj under output)
  // is not computed and gets no gradient: the reference code's detached inputs. none: the block's own.
  void intervene(train::InterventionPoint point, const AttentionSignals* teacher = nullptr) {
    if (point != train::InterventionPoint::none)
      QLORA_CHECK(teacher, "llama block " + std::to_string(index_) + ": intervention '" +
                               std::string(train::intervention_point_name(point)) + "' without the teacher's signals");
    intervention_ = point;
    teacher_ = point == train::InterventionPoint::none ? nullptr : teacher;
  }
  train::InterventionPoint intervention() const { return intervention_; }

  // Keep o_proj's output (the attention branch before the residual add) of the next forwards, readable
  // through attention_output() until release_saved() or the backward.
  bool keep_attention_output = false;
  const Tensor& attention_output() const { return attention_output_; }

  std::vector<autograd::Param*> params() {
    std::vector<autograd::Param*> out;
    for (auto& l : linears_)
      for (autograd::Param* p : l->params()) out.push_back(p);
    return out;
  }

  // x (batch, t, hidden) -> (batch, t, hidden). With a cache, the t tokens sit at positions
  // cache->length() ... and their keys and values are appended (the caller advances the cache once every
  // block has run). In training (ctx.training, no cache) the activations for backward() are saved.
  Tensor forward(nn::Context& ctx, const Tensor& x, KvCache* cache = nullptr) {
    const std::int64_t batch = x.dim(0), t = x.dim(1);
    const std::int64_t pos = cache ? cache->length() : 0;
    using train::InterventionPoint;
    const InterventionPoint point = cache ? InterventionPoint::none : intervention_;
    if (point != InterventionPoint::none) check_teacher_signals(point, batch, t);
    ops::RmsNormResult n1 = ops::rmsnorm(x, input_norm_, eps_);
    Tensor q, k, v;
    ops::AttentionResult attn;
    Tensor o;
    if (point == InterventionPoint::output) {
      o = teacher_->output;
    } else if (point == InterventionPoint::context) {
      o = linears_[o_proj]->forward(ctx, teacher_->context);
    } else {
      if (point == InterventionPoint::map) {
        q = teacher_->q;
        k = teacher_->k;
      } else {
        q = linears_[q_proj]->forward(ctx, n1.y).reshape({batch, t, heads_, head_dim_});
        k = linears_[k_proj]->forward(ctx, n1.y).reshape({batch, t, kv_heads_, head_dim_});
      }
      v = linears_[v_proj]->forward(ctx, n1.y).reshape({batch, t, kv_heads_, head_dim_});
      if (point != InterventionPoint::map) ops::rope_qk_(q, k, inv_freq_, pos);
      attend(q, k, v, attn, batch, t, pos, cache);
      o = linears_[o_proj]->forward(ctx, attn.out.reshape({batch, t, heads_ * head_dim_}));
    }
    if (record_ && !cache)
      *record_ = AttentionSignals{q, k, attn.out.defined() ? attn.out.reshape({batch, t, heads_ * head_dim_}) : teacher_->context,
                                  o};
    if (keep_attention_output) attention_output_ = o;
    // h = x + o and n2 = rmsnorm(h) in one pass.
    ops::AddRmsNormResult n2 = ops::add_rmsnorm(x, o, post_norm_, eps_);
    Tensor h = std::move(n2.sum);
    Tensor gate = linears_[gate_proj]->forward(ctx, n2.y);
    Tensor up = linears_[up_proj]->forward(ctx, n2.y);
    const Tensor down = linears_[down_proj]->forward(ctx, ops::swiglu(gate, up));
    Tensor y = ops::add(h, down);

    if (ctx.training && !cache)
      saved_ = Saved{x, std::move(n1.rstd), std::move(q), std::move(k), std::move(v), std::move(attn),
                     std::move(h), std::move(n2.rstd), std::move(gate), std::move(up), point};
    return y;
  }

  // dy (batch, t, hidden) -> dx; adds the adapters' gradients. Needs the saved training forward.
  // d_attention_output: an extra gradient at o_proj's output (a loss on attention_output()), or nullptr.
  Tensor backward(nn::Context& ctx, const Tensor& dy, const Tensor* d_attention_output = nullptr) {
    if (!saved_.x.defined()) throw Error("llama block " + std::to_string(index_) + ": backward without a saved forward");
    Saved s = std::move(saved_);
    saved_ = Saved{};
    attention_output_ = Tensor();
    const std::int64_t batch = s.x.dim(0), t = s.x.dim(1);
    using train::InterventionPoint;

    // MLP branch: y = h + down(swiglu(gate(n2), up(n2))).
    const Tensor d_act = linears_[down_proj]->backward(ctx, dy);
    const ops::SwigluGrads g = ops::swiglu_backward(s.gate, s.up, d_act);
    Tensor dn2 = linears_[gate_proj]->backward(ctx, g.dgate);
    ops::axpy_(dn2, 1.f, linears_[up_proj]->backward(ctx, g.dup));
    const Tensor dh = ops::add_rmsnorm_backward(s.h, post_norm_, s.rstd2, dn2, dy);  // norm's gradient + residual's

    // Attention branch: h = x + o(attention(rope(q), rope(k), v)); under an intervention it stops where the
    // teacher's signal entered.
    if (s.point == InterventionPoint::output) return dh;
    Tensor d_o = dh;
    if (d_attention_output) {
      d_o = dh.clone();
      ops::axpy_(d_o, 1.f, *d_attention_output);
    }
    const Tensor d_attn = linears_[o_proj]->backward(ctx, d_o).reshape({batch, t, heads_, head_dim_});
    if (s.point == InterventionPoint::context) return dh;
    ops::AttentionGrads a = ops::attention_backward(s.q, s.k, s.v, s.attn, d_attn);
    Tensor dn1;
    if (s.point == InterventionPoint::map) {
      dn1 = linears_[v_proj]->backward(ctx, a.dv.reshape({batch, t, kv_heads_ * head_dim_}));
    } else {
      ops::rope_qk_backward_(a.dq, a.dk, inv_freq_, 0);
      dn1 = linears_[q_proj]->backward(ctx, a.dq.reshape({batch, t, heads_ * head_dim_}));
      ops::axpy_(dn1, 1.f, linears_[k_proj]->backward(ctx, a.dk.reshape({batch, t, kv_heads_ * head_dim_})));
      ops::axpy_(dn1, 1.f, linears_[v_proj]->backward(ctx, a.dv.reshape({batch, t, kv_heads_ * head_dim_})));
    }
    return ops::add_rmsnorm_backward(s.x, input_norm_, s.rstd1, dn1, dh);  // norm's gradient + residual's
  }

  // Drops every saved activation (the block's and its linears'): activation checkpointing.
  void release_saved() {
    saved_ = Saved{};
    attention_output_ = Tensor();
    for (auto& l : linears_) l->release_saved();
  }
  bool has_saved() const { return saved_.x.defined(); }

  // Bytes of the frozen weights (bases and norms).
  std::size_t base_bytes() const {
    std::size_t n = input_norm_.nbytes() + post_norm_.nbytes();
    for (const auto& l : linears_) n += l->base_bytes();
    return n;
  }

 private:
  struct Saved {
    Tensor x, rstd1, q, k, v;
    ops::AttentionResult attn;
    Tensor h, rstd2, gate, up;
    train::InterventionPoint point = train::InterventionPoint::none;
  };

  // Causal attention over the new positions, through the cache when there is one.
  void attend(const Tensor& q, const Tensor& k, const Tensor& v, ops::AttentionResult& attn,
              std::int64_t batch, std::int64_t t, std::int64_t pos, KvCache* cache) {
    if (!cache) {
      attn = ops::attention(q, k, v);
      return;
    }
    cache->append(index_, k, v);
    attn.out = Tensor::empty(q.shape(), q.dtype(), q.device());
    for (std::int64_t b = 0; b < batch; ++b) {  // the cache is contiguous per sequence, not across the batch
      const Tensor qb = q.select(b).reshape({1, t, heads_, head_dim_});
      const ops::AttentionResult r = ops::attention(qb, cache->keys(index_, b, pos + t), cache->values(index_, b, pos + t));
      attn.out.select(b).copy_from(r.out.select(0));
    }
  }

  void check_teacher_signals(train::InterventionPoint point, std::int64_t batch, std::int64_t t) const {
    using train::InterventionPoint;
    const auto check = [&](const Tensor& s, const Shape& want, const char* what) {
      QLORA_CHECK(s.defined() && s.shape() == want,
                  "llama block " + std::to_string(index_) + ": the teacher's " + what + " for intervention '" +
                      std::string(train::intervention_point_name(point)) + "' must be " + want.str() + ", got " +
                      (s.defined() ? s.shape().str() : std::string("none")));
    };
    const std::int64_t hidden = linears_[o_proj]->out_features();
    if (point == InterventionPoint::map) {
      check(teacher_->q, Shape{batch, t, heads_, head_dim_}, "q");
      check(teacher_->k, Shape{batch, t, kv_heads_, head_dim_}, "k");
    }
    if (point == InterventionPoint::context) check(teacher_->context, Shape{batch, t, heads_ * head_dim_}, "context");
    if (point == InterventionPoint::output) check(teacher_->output, Shape{batch, t, hidden}, "attention output");
  }

  std::int64_t index_, heads_, kv_heads_, head_dim_;
  float eps_;
  Tensor input_norm_, post_norm_;
  std::array<std::unique_ptr<nn::Linear>, kProjCount> linears_;
  Tensor inv_freq_;  // f32 on the model's device
  Saved saved_;
  AttentionSignals* record_ = nullptr;
  train::InterventionPoint intervention_ = train::InterventionPoint::none;
  const AttentionSignals* teacher_ = nullptr;
  Tensor attention_output_;
};

}  // namespace qlora::models::llama
