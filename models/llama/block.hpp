#pragma once
// One Llama decoder block, forward and backward written out (docs/model.md):
//   h = x + o( attention( rope(q(n1)), rope(k(n1)), v(n1) ) ),  n1 = rmsnorm(x) * w_in
//   y = h + down( silu(gate(n2)) * up(n2) ),                   n2 = rmsnorm(h) * w_post
// Every linear is an nn::Linear (frozen base + adapter); it saves its own input. The block saves what its
// own backward needs beyond that: x and h with their 1/rms, q and k after RoPE, v, the attention output
// and log-sum-exp, gate and up. Norm weights are frozen: their gradients are never formed.

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
    ops::RmsNormResult n1 = ops::rmsnorm(x, input_norm_, eps_);
    Tensor q = linears_[q_proj]->forward(ctx, n1.y).reshape({batch, t, heads_, head_dim_});
    Tensor k = linears_[k_proj]->forward(ctx, n1.y).reshape({batch, t, kv_heads_, head_dim_});
    Tensor v = linears_[v_proj]->forward(ctx, n1.y).reshape({batch, t, kv_heads_, head_dim_});
    ops::rope_(q, inv_freq_, pos);
    ops::rope_(k, inv_freq_, pos);

    ops::AttentionResult attn;
    if (cache) {
      cache->append(index_, k, v);
      attn.out = Tensor::empty(q.shape(), q.dtype(), q.device());
      for (std::int64_t b = 0; b < batch; ++b) {  // the cache is contiguous per sequence, not across the batch
        const Tensor qb = q.select(b).reshape({1, t, heads_, head_dim_});
        const ops::AttentionResult r =
            ops::attention(qb, cache->keys(index_, b, pos + t), cache->values(index_, b, pos + t));
        attn.out.select(b).copy_from(r.out.select(0));
      }
    } else {
      attn = ops::attention(q, k, v);
    }
    const Tensor o = linears_[o_proj]->forward(ctx, attn.out.reshape({batch, t, heads_ * head_dim_}));
    Tensor h = ops::add(x, o);

    ops::RmsNormResult n2 = ops::rmsnorm(h, post_norm_, eps_);
    Tensor gate = linears_[gate_proj]->forward(ctx, n2.y);
    Tensor up = linears_[up_proj]->forward(ctx, n2.y);
    const Tensor down = linears_[down_proj]->forward(ctx, ops::swiglu(gate, up));
    Tensor y = ops::add(h, down);

    if (ctx.training && !cache)
      saved_ = Saved{x, std::move(n1.rstd), std::move(q), std::move(k), std::move(v), std::move(attn),
                     std::move(h), std::move(n2.rstd), std::move(gate), std::move(up)};
    return y;
  }

  // dy (batch, t, hidden) -> dx; adds the adapters' gradients. Needs the saved training forward.
  Tensor backward(nn::Context& ctx, const Tensor& dy) {
    if (!saved_.x.defined()) throw Error("llama block " + std::to_string(index_) + ": backward without a saved forward");
    Saved s = std::move(saved_);
    saved_ = Saved{};
    const std::int64_t batch = s.x.dim(0), t = s.x.dim(1);

    // MLP branch: y = h + down(swiglu(gate(n2), up(n2))).
    const Tensor d_act = linears_[down_proj]->backward(ctx, dy);
    const ops::SwigluGrads g = ops::swiglu_backward(s.gate, s.up, d_act);
    Tensor dn2 = linears_[gate_proj]->backward(ctx, g.dgate);
    ops::axpy_(dn2, 1.f, linears_[up_proj]->backward(ctx, g.dup));
    Tensor dh = ops::rmsnorm_backward(s.h, post_norm_, s.rstd2, dn2);
    ops::axpy_(dh, 1.f, dy);

    // Attention branch: h = x + o(attention(rope(q), rope(k), v)).
    const Tensor d_attn = linears_[o_proj]->backward(ctx, dh).reshape({batch, t, heads_, head_dim_});
    ops::AttentionGrads a = ops::attention_backward(s.q, s.k, s.v, s.attn, d_attn);
    ops::rope_backward_(a.dq, inv_freq_, 0);
    ops::rope_backward_(a.dk, inv_freq_, 0);
    Tensor dn1 = linears_[q_proj]->backward(ctx, a.dq.reshape({batch, t, heads_ * head_dim_}));
    ops::axpy_(dn1, 1.f, linears_[k_proj]->backward(ctx, a.dk.reshape({batch, t, kv_heads_ * head_dim_})));
    ops::axpy_(dn1, 1.f, linears_[v_proj]->backward(ctx, a.dv.reshape({batch, t, kv_heads_ * head_dim_})));
    Tensor dx = ops::rmsnorm_backward(s.x, input_norm_, s.rstd1, dn1);
    ops::axpy_(dx, 1.f, dh);
    return dx;
  }

  // Drops every saved activation (the block's and its linears'): activation checkpointing.
  void release_saved() {
    saved_ = Saved{};
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
  };

  std::int64_t index_, heads_, kv_heads_, head_dim_;
  float eps_;
  Tensor input_norm_, post_norm_;
  std::array<std::unique_ptr<nn::Linear>, kProjCount> linears_;
  Tensor inv_freq_;  // f32 on the model's device
  Saved saved_;
};

}  // namespace qlora::models::llama
