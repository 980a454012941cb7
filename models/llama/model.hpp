#pragma once
// The Llama model: token embedding -> decoder blocks -> final RMSNorm -> LM head (docs/model.md).
// Forward and backward are explicit. Training computes the mean cross-entropy over targets != -100
// through ops::linear_cross_entropy, which never holds the full tokens x vocab logits, and returns
// gradients for the adapters only: the embedding, the norms, the LM head and every base are frozen and
// get none. With `checkpointing`, each block keeps only its input after the forward and runs its forward
// again just before its backward.

#include <cstdint>
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
  double loss = 0;  // mean over valid targets
  double loss_sum = 0;
  std::int64_t valid_tokens = 0;
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
  LossResult forward_loss_embedded(nn::Context& ctx, const Tensor& x, const Tensor& targets) {
    Tensor h = x;
    for (auto& b : blocks_) {
      h = b->forward(ctx, h);
      b->release_saved();
    }
    return head_loss(ops::rmsnorm(h, final_norm_, float(config_.rms_norm_eps)).y, targets, nullptr);
  }

  // One training forward and backward: the loss, and d(loss)/d(adapter) added into each Param's grad.
  LossResult forward_backward(nn::Context& ctx, const Tensor& ids, const Tensor& targets) {
    return forward_backward_embedded(ctx, embed(ids), targets, nullptr);
  }

  // The same from already-embedded inputs x (batch, t, hidden); when dx is given it receives d(loss)/dx
  // (the gradient that would flow into the frozen embedding: a test hook for finite differences).
  LossResult forward_backward_embedded(nn::Context& ctx, const Tensor& x, const Tensor& targets, Tensor* dx) {
    QLORA_CHECK(ctx.training, "llama: forward_backward needs a training context (ctx.training = true)");
    QLORA_CHECK(x.rank() == 3 && x.dim(2) == config_.hidden_size,
                "llama: embedded inputs must be (batch, seq, " + std::to_string(config_.hidden_size) + "), got " + x.shape().str());
    std::vector<Tensor> block_inputs;  // checkpointing: the only activation kept per block
    Tensor h = x;
    for (auto& b : blocks_) {
      if (checkpointing) block_inputs.push_back(h);
      h = b->forward(ctx, h);
      if (checkpointing) b->release_saved();
    }
    const ops::RmsNormResult n = ops::rmsnorm(h, final_norm_, float(config_.rms_norm_eps));
    Tensor dn;
    const LossResult loss = head_loss(n.y, targets, &dn);
    Tensor dh = ops::rmsnorm_backward(h, final_norm_, n.rstd, dn.reshape(h.shape()));
    for (std::int64_t i = num_layers() - 1; i >= 0; --i) {
      DecoderBlock& b = *blocks_[std::size_t(i)];
      if (checkpointing) (void)b.forward(ctx, block_inputs[std::size_t(i)]);  // recompute what backward needs
      dh = b.backward(ctx, dh);
      if (checkpointing) block_inputs[std::size_t(i)] = Tensor();
    }
    if (dx) *dx = dh;
    return loss;
  }

 private:
  // Chunked LM head + cross-entropy over hidden (batch, t, d); dhidden (N, d) when requested.
  LossResult head_loss(const Tensor& hidden, const Tensor& targets, Tensor* dhidden) const {
    QLORA_CHECK(targets.defined() && targets.dtype() == DType::i32 && targets.numel() == hidden.shape().rows(),
                "llama: targets must be i32 with one per token (" + std::to_string(hidden.shape().rows()) + "), got " +
                    (targets.defined() ? targets.str() : std::string("none")));
    const Tensor h2 = hidden.reshape({hidden.shape().rows(), hidden.shape().last()});
    const Tensor t = targets.reshape({targets.numel()}).to(device());
    const ops::LinearCrossEntropyResult r = ops::linear_cross_entropy(h2, head_weight(), t, loss_chunk_rows, dhidden);
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
