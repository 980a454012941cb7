#pragma once
// Generation: prefill the prompt through the KV cache in one forward, then decode one token at a time,
// each step feeding only the new token. Sampling: greedy (temperature 0), or temperature with optional
// top-k and top-p (nucleus) filtering, drawing from the Philox stream of a seed so that a run is
// reproducible on any machine. Stops at an EOS id or after max_new_tokens.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/philox.hpp"
#include "models/llama/kv_cache.hpp"
#include "models/llama/model.hpp"

namespace qlora::models::llama {

struct SamplingOptions {
  float temperature = 0.f;  // 0: greedy (argmax)
  int top_k = 0;            // 0: no top-k filtering
  float top_p = 1.f;        // 1: no nucleus filtering
  std::uint64_t seed = 0;

  void validate() const {
    QLORA_CHECK(std::isfinite(temperature) && temperature >= 0.f,
                "sampling: temperature must be >= 0, got " + std::to_string(temperature));
    QLORA_CHECK(top_k >= 0, "sampling: top_k must be >= 0, got " + std::to_string(top_k));
    QLORA_CHECK(top_p > 0.f && top_p <= 1.f, "sampling: top_p must be in (0, 1], got " + std::to_string(top_p));
  }
};

// The first index of the largest value (as llama2.c's argmax: ties go to the lower id).
inline std::int32_t argmax(std::span<const float> logits) {
  return std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// Draws token ids from logits. Draw i uses philox_uniform(seed, i): the same sequence on every machine.
class Sampler {
 public:
  explicit Sampler(SamplingOptions options) : o_(options) { o_.validate(); }

  std::int32_t sample(std::span<const float> logits) {
    for (float x : logits)
      QLORA_CHECK(!std::isnan(x), "sampling: the logits hold NaN (a diverged or corrupt model)");
    if (o_.temperature == 0.f) return argmax(logits);
    // Candidates sorted by logit (descending, ties by id), cut to top_k.
    std::vector<std::int32_t> ids(logits.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::stable_sort(ids.begin(), ids.end(), [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b]; });
    if (o_.top_k > 0 && std::size_t(o_.top_k) < ids.size()) ids.resize(std::size_t(o_.top_k));
    // Softmax at the temperature, in double.
    std::vector<double> p(ids.size());
    const double top = logits[ids[0]];
    double sum = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) sum += p[i] = std::exp((double(logits[ids[i]]) - top) / o_.temperature);
    for (double& x : p) x /= sum;
    // Nucleus: the smallest prefix whose probability reaches top_p.
    if (o_.top_p < 1.f) {
      double cum = 0;
      std::size_t keep = 0;
      while (keep < p.size()) {
        cum += p[keep++];
        if (cum >= o_.top_p) break;
      }
      ids.resize(keep);
      p.resize(keep);
      for (double& x : p) x /= cum;
    }
    const double u = philox_uniform(o_.seed, draws_++);
    double cum = 0;
    for (std::size_t i = 0; i < p.size(); ++i) {
      cum += p[i];
      if (u < cum) return ids[i];
    }
    return ids.back();  // rounding: u just below 1
  }

 private:
  SamplingOptions o_;
  std::uint64_t draws_ = 0;
};

struct GenerateOptions {
  std::int64_t max_new_tokens = 128;
  SamplingOptions sampling;
  std::vector<std::int32_t> eos_ids;  // stop after generating any of these (it is included in the output)
  // Called with every new token as soon as it is chosen (streaming output); may be empty.
  std::function<void(std::int32_t)> on_token;
};

struct GenerateResult {
  std::vector<std::int32_t> tokens;  // the new tokens only
  bool stopped_at_eos = false;
  std::int64_t prompt_tokens = 0;
};

// Continues one prompt (batch 1). The cache holds prompt + max_new_tokens positions (capped at
// max_position_embeddings is the caller's business: positions past it are extrapolated RoPE).
inline GenerateResult generate(Model& model, std::span<const std::int32_t> prompt, const GenerateOptions& options) {
  QLORA_CHECK(!prompt.empty(), "generate: the prompt has no tokens (add BOS)");
  QLORA_CHECK(options.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  const std::int64_t n = std::int64_t(prompt.size());
  KvCache cache(model.config(), 1, n + std::max<std::int64_t>(options.max_new_tokens, 1), model.dtype(), model.device());
  Sampler sampler(options.sampling);
  GenerateResult result;
  result.prompt_tokens = n;
  Tensor ids = Tensor::from(std::vector<std::int32_t>(prompt.begin(), prompt.end()), {1, n});
  for (std::int64_t step = 0; step < options.max_new_tokens; ++step) {
    const Tensor logits = model.logits(ids, &cache, true).to(Device::cpu()).to(DType::f32);
    const std::int32_t next = sampler.sample(std::span<const float>(logits.data<float>(), std::size_t(logits.numel())));
    result.tokens.push_back(next);
    if (options.on_token) options.on_token(next);
    if (std::find(options.eos_ids.begin(), options.eos_ids.end(), next) != options.eos_ids.end()) {
      result.stopped_at_eos = true;
      break;
    }
    ids = Tensor::from(std::vector<std::int32_t>{next}, {1, 1});
  }
  return result;
}

}  // namespace qlora::models::llama
