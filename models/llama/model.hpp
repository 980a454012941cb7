#pragma once
// The Llama model: token embedding -> decoder blocks -> final RMSNorm -> LM head (docs/model.md).
// Forward and backward are explicit. Training computes the mean cross-entropy over targets != -100
// through ops::linear_cross_entropy, which never holds the full tokens x vocab logits, and returns
// gradients for the adapters only: the embedding, the norms, the LM head and every base are frozen and
// get none. With `checkpointing`, each block keeps only its input after the forward and runs its forward
// again just before its backward. Distillation objectives (docs/objectives.md) weight the cross-entropy
// and add a HiddenStateLoss on the residual stream, whose gradients enter the same backward sweep.

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qlora/autograd/param.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/ops/cross_entropy.hpp"
#include "qlora/ops/embedding.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/ops/rmsnorm.hpp"
#include "models/llama/block.hpp"
#include "models/llama/config.hpp"
#include "models/llama/kv_cache.hpp"

namespace qlora::models::llama {

struct LossResult {
  double loss = 0;  // cross-entropy: mean over valid targets (0 when TrainingLoss::ce_weight is 0)
  double loss_sum = 0;
  std::int64_t valid_tokens = 0;
  double hidden_loss = 0;  // the HiddenStateLoss terms, summed
  double total = 0;        // ce_weight * loss + hidden_loss: the function whose gradient is formed
};

// A point of the residual stream where a HiddenStateLoss looks: block `layer`'s attention branch output
// (o_proj's output, before the residual add), block `layer`'s output, or the hidden state after the final
// RMSNorm (layer = num_layers), all (batch, t, hidden).
struct HiddenPoint {
  enum Kind { attention_output, block_output, final_hidden } kind = final_hidden;
  std::int64_t layer = 0;
};

struct HiddenLossTerm {
  double loss = 0;
  Tensor grad;  // d loss / d value, shaped as the value (undefined: no gradient)
};

// An extra loss on hidden states (RILQ's discrepancy, Teacher Intervention's distillation terms). `term`
// is called once per wanted point per call of forward_backward_embedded (during the backward sweep, so
// checkpointing keeps only block inputs) or forward_loss_embedded (want_grad false).
struct HiddenStateLoss {
  bool attention_outputs = false, block_outputs = false, final_hidden = false;
  std::function<HiddenLossTerm(const HiddenPoint& point, const Tensor& value, bool want_grad)> term;
};

// What a training forward differentiates: ce_weight * cross-entropy (0: not computed, targets unread) plus
// the hidden-state loss, when given.
struct TrainingLoss {
  double ce_weight = 1.0;
  const HiddenStateLoss* hidden = nullptr;
};

class Model {
 public:
  // lm_head undefined: tied to the embedding (tie_word_embeddings).
  Model(Config config, LoadOptions options, Tensor embedding, std::vector<std::unique_ptr<DecoderBlock>> blocks,
        Tensor final_norm, Tensor lm_head)
      : config_(std::move(config)),
        options_(std::move(options)),
        embedding_(std::move(embedding)),
        blocks_(std::move(blocks)),
        final_norm_(std::move(final_norm)),
        lm_head_(std::move(lm_head)) {}

  // Per-block activation checkpointing in training.
  bool checkpointing = false;
  // Rows of logits computed at once by the training loss (the chunk of linear_cross_entropy).
  std::int64_t loss_chunk_rows = 1024;
  // Vocabulary columns computed at once by the loss (0: the whole vocabulary). With a vocabulary of 128256
  // (Llama 3) a 1024-row chunk of f32 logits is 525 MB; 16384 columns cut that to 67 MB for one more LM-head
  // GEMM in the backward (ops::linear_cross_entropy). Same loss and gradients up to summation order.
  std::int64_t loss_vocab_chunk = 0;
  // Data parallelism (train/trainer.hpp): when set, forward_backward calls it after each block's backward with
  // that block's adapter parameters, whose gradients are then final, so that their all-reduce starts while
  // the earlier blocks' backward runs.
  std::function<void(const std::vector<autograd::Param*>&)> after_block_backward;

  const Config& config() const { return config_; }
  const LoadOptions& options() const { return options_; }
  Device device() const { return options_.device; }
  DType dtype() const { return embedding_.dtype(); }
  std::int64_t num_layers() const { return std::int64_t(blocks_.size()); }
  DecoderBlock& block(std::int64_t i) { return *blocks_[std::size_t(i)]; }
  const Tensor& embedding() const { return embedding_; }
  const Tensor& final_norm() const { return final_norm_; }
  bool tied_head() const { return !lm_head_.defined(); }
  const Tensor& head_weight() const { return lm_head_.defined() ? lm_head_ : embedding_; }

  // Trainable parameters: the adapters of every block, nothing else.
  std::vector<autograd::Param*> params() {
    std::vector<autograd::Param*> out;
    for (auto& b : blocks_)
      for (autograd::Param* p : b->params()) out.push_back(p);
    return out;
  }
  void zero_grad() {
    for (autograd::Param* p : params()) p->zero_grad();
  }
  std::int64_t trainable_parameter_count() {
    std::int64_t n = 0;
    for (autograd::Param* p : params()) n += p->value.numel();
    return n;
  }
  // Parameters of the base model (what config.json describes), counting a tied head once.
  std::int64_t base_parameter_count() const {
    const Config& c = config_;
    const std::int64_t h = c.hidden_size;
    const std::int64_t per_block = 2 * h + h * c.q_dim() * 2 + h * c.kv_dim() * 2 + 3 * h * c.intermediate_size;
    return c.vocab_size * h * (tied_head() ? 1 : 2) + h + c.num_hidden_layers * per_block;
  }
  // Bytes of the frozen weights as stored on the device.
  std::size_t base_bytes() const {
    std::size_t n = embedding_.nbytes() + final_norm_.nbytes() + (lm_head_.defined() ? lm_head_.nbytes() : 0);
    for (const auto& b : blocks_) n += b->base_bytes();
    return n;
  }

  // ids (batch, t) i32 (host or device) -> (batch, t, hidden) in the model's dtype.
  Tensor embed(const Tensor& ids) const {
    QLORA_CHECK(ids.defined() && ids.rank() == 2 && ids.dtype() == DType::i32,
                "llama: token ids must be an i32 (batch, seq) tensor, got " + (ids.defined() ? ids.str() : std::string("none")));
    return ops::embedding(embedding_, ids.to(device()));
  }

  // Logits (f32; f64 for an f64 model) of the ids at positions cache->length() ... (0 without a cache),
  // all positions (batch, t, vocab) or only the last one (batch, 1, vocab). Inference: nothing is saved.
  // With a cache, the new keys and values are appended and the cache advanced by t.
  Tensor logits(const Tensor& ids, KvCache* cache = nullptr, bool last_only = false) {
    nn::Context ctx;
    ctx.training = false;
    Tensor h = embed(ids);
    const std::int64_t batch = h.dim(0), t = h.dim(1);
    if (cache) {
      QLORA_CHECK(cache->batch() == batch, "llama: a kv cache of batch " + std::to_string(cache->batch()) +
                                               " cannot serve a batch of " + std::to_string(batch));
      QLORA_CHECK(cache->length() + t <= cache->max_len(),
                  "llama: " + std::to_string(cache->length() + t) + " positions exceed the kv cache's " +
                      std::to_string(cache->max_len()));
    }
    for (auto& b : blocks_) h = b->forward(ctx, h, cache);
    if (cache) cache->advance(t);
    Tensor n = ops::rmsnorm(h, final_norm_, float(config_.rms_norm_eps)).y;
    if (last_only) {
      Tensor last = Tensor::empty({batch, 1, n.dim(2)}, n.dtype(), n.device());
      for (std::int64_t b = 0; b < batch; ++b) last.select(b).copy_from(n.select(b).slice(t - 1, t));
      n = last;
    }
    const DType out = dtype() == DType::f64 ? DType::f64 : DType::f32;
    return ops::matmul(n, head_weight(), false, true, 1.f, out);
  }

  // Mean cross-entropy of the next-token targets (batch, t) i32 (-100 = ignored), without gradients
  // (inference: no dropout, nothing saved).
  LossResult evaluate_loss(const Tensor& ids, const Tensor& targets) {
    nn::Context ctx;
    ctx.training = false;
    return forward_loss_embedded(ctx, embed(ids), targets);
  }

  // The loss of embedded inputs x (batch, t, hidden) under ctx (in training: with its dropout masks, the
  // function forward_backward differentiates), without a backward; nothing stays saved.
  LossResult forward_loss_embedded(nn::Context& ctx, const Tensor& x, const Tensor& targets,
                                   const TrainingLoss& terms = {}) {
    const HiddenStateLoss* hidden = active(terms.hidden);
    for (auto& b : blocks_) b->keep_attention_output = hidden && hidden->attention_outputs;
    double hidden_loss = 0;
    Tensor h = x;
    for (std::int64_t i = 0; i < num_layers(); ++i) {
      DecoderBlock& b = *blocks_[std::size_t(i)];
      h = b.forward(ctx, h);
      if (hidden && hidden->attention_outputs)
        hidden_loss += hidden->term({HiddenPoint::attention_output, i}, b.attention_output(), false).loss;
      if (hidden && hidden->block_outputs) hidden_loss += hidden->term({HiddenPoint::block_output, i}, h, false).loss;
      b.release_saved();
      b.keep_attention_output = false;
    }
    const Tensor n = ops::rmsnorm(h, final_norm_, float(config_.rms_norm_eps)).y;
    LossResult r = terms.ce_weight != 0 ? head_loss(n, targets, nullptr) : LossResult{};
    if (hidden && hidden->final_hidden) hidden_loss += hidden->term({HiddenPoint::final_hidden, num_layers()}, n, false).loss;
    return with_total(r, terms.ce_weight, hidden_loss);
  }

  // One training forward and backward: the loss, and d(loss)/d(adapter) added into each Param's grad.
  LossResult forward_backward(nn::Context& ctx, const Tensor& ids, const Tensor& targets) {
    return forward_backward_embedded(ctx, embed(ids), targets, nullptr);
  }

  // The same from already-embedded inputs x (batch, t, hidden); when dx is given it receives d(loss)/dx
  // (the gradient that would flow into the frozen embedding: a test hook for finite differences).
  // `terms` weights the cross-entropy and adds a hidden-state loss: its gradient at each block output is
  // added into dh before that block's backward, at an attention output it enters the block's backward
  // beside dh, at the final hidden state it is added to the LM head's.
  LossResult forward_backward_embedded(nn::Context& ctx, const Tensor& x, const Tensor& targets, Tensor* dx,
                                       const TrainingLoss& terms = {}) {
    QLORA_CHECK(ctx.training, "llama: forward_backward needs a training context (ctx.training = true)");
    QLORA_CHECK(x.rank() == 3 && x.dim(2) == config_.hidden_size,
                "llama: embedded inputs must be (batch, seq, " + std::to_string(config_.hidden_size) + "), got " + x.shape().str());
    const HiddenStateLoss* hidden = active(terms.hidden);
    const bool want_outputs = hidden && hidden->block_outputs, want_attention = hidden && hidden->attention_outputs;
    std::vector<Tensor> block_inputs;  // checkpointing: the only activation kept per block
    std::vector<Tensor> outputs(want_outputs ? blocks_.size() : 0);  // the next block's input: no extra memory
    Tensor h = x;
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      DecoderBlock& b = *blocks_[i];
      b.keep_attention_output = want_attention;
      if (checkpointing) block_inputs.push_back(h);
      h = b.forward(ctx, h);
      if (want_outputs) outputs[i] = h;
      if (checkpointing) b.release_saved();
    }
    const ops::RmsNormResult n = ops::rmsnorm(h, final_norm_, float(config_.rms_norm_eps));
    Tensor dn;
    LossResult loss;
    if (terms.ce_weight != 0) {
      loss = head_loss(n.y, targets, &dn);
      if (terms.ce_weight != 1) ops::scale_(dn, float(terms.ce_weight));
      dn = dn.reshape(h.shape());
    } else {
      dn = Tensor::zeros(h.shape(), h.dtype(), h.device());
    }
    double hidden_loss = 0;
    const auto add_term = [&](const HiddenPoint& point, const Tensor& value, Tensor& grad) {
      HiddenLossTerm t = hidden->term(point, value, true);
      hidden_loss += t.loss;
      if (t.grad.defined()) ops::axpy_(grad, 1.f, t.grad.reshape(grad.shape()));
    };
    if (hidden && hidden->final_hidden) add_term({HiddenPoint::final_hidden, num_layers()}, n.y, dn);
    Tensor dh = ops::rmsnorm_backward(h, final_norm_, n.rstd, dn);
    for (std::int64_t i = num_layers() - 1; i >= 0; --i) {
      DecoderBlock& b = *blocks_[std::size_t(i)];
      if (checkpointing) (void)b.forward(ctx, block_inputs[std::size_t(i)]);  // recompute what backward needs
      if (want_outputs) {
        add_term({HiddenPoint::block_output, i}, outputs[std::size_t(i)], dh);
        outputs[std::size_t(i)] = Tensor();
      }
      Tensor d_attention;
      if (want_attention) {
        d_attention = Tensor::zeros(h.shape(), h.dtype(), h.device());
        add_term({HiddenPoint::attention_output, i}, b.attention_output(), d_attention);
      }
      dh = b.backward(ctx, dh, want_attention ? &d_attention : nullptr);
      if (after_block_backward) after_block_backward(b.params());
      b.keep_attention_output = false;
      if (checkpointing) block_inputs[std::size_t(i)] = Tensor();
    }
    if (dx) *dx = dh;
    return with_total(loss, terms.ce_weight, hidden_loss);
  }

 private:
  static const HiddenStateLoss* active(const HiddenStateLoss* h) {
    if (!h || !(h->attention_outputs || h->block_outputs || h->final_hidden)) return nullptr;
    QLORA_CHECK(bool(h->term), "llama: a hidden-state loss without its term function");
    return h;
  }
  static LossResult with_total(LossResult r, double ce_weight, double hidden_loss) {
    r.hidden_loss = hidden_loss;
    r.total = (ce_weight != 0 ? ce_weight * r.loss : 0.0) + hidden_loss;
    return r;
  }

  // Chunked LM head + cross-entropy over hidden (batch, t, d); dhidden (N, d) when requested.
  LossResult head_loss(const Tensor& hidden, const Tensor& targets, Tensor* dhidden) const {
    QLORA_CHECK(targets.defined() && targets.dtype() == DType::i32 && targets.numel() == hidden.shape().rows(),
                "llama: targets must be i32 with one per token (" + std::to_string(hidden.shape().rows()) + "), got " +
                    (targets.defined() ? targets.str() : std::string("none")));
    const Tensor h2 = hidden.reshape({hidden.shape().rows(), hidden.shape().last()});
    const Tensor t = targets.reshape({targets.numel()}).to(device());
    const ops::LinearCrossEntropyResult r = ops::linear_cross_entropy(h2, head_weight(), t, loss_chunk_rows, dhidden, nullptr,
                                                                             loss_vocab_chunk);
    return {r.loss, r.loss_sum, r.valid_tokens};
  }

  Config config_;
  LoadOptions options_;
  Tensor embedding_;
  std::vector<std::unique_ptr<DecoderBlock>> blocks_;
  Tensor final_norm_;
  Tensor lm_head_;
};

}  // namespace qlora::models::llama
