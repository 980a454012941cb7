// The Llama model on a tiny random configuration (2 layers, hidden 16, 4 query heads sharing 2 key/value
// heads, vocab 37): float64 finite differences of the whole model's loss with respect to the adapters and
// the input embeddings (LoRA and Q-BLoRA, with and without checkpointing), checkpointing giving the same
// gradients, adapters at B = 0 giving the base model, and KV-cache decoding giving the full forward's logits.

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "models/llama/generate.hpp"
#include "models/llama/load.hpp"
#include "qlora/autograd/gradcheck.hpp"
#include "qlora/ops/random.hpp"
#include "support/random.hpp"
#include "support/tiny_llama.hpp"

using namespace qlora;
using namespace qlora::models::llama;

namespace {

using qlora::test::tiny_llama_config;

LoadOptions f64_options(nn::AdapterKind kind, float dropout = 0.f) {
  LoadOptions o;
  o.dtype = DType::f64;
  o.param_dtype = DType::f64;
  o.adapter.kind = kind;
  o.adapter.rank = 2;
  o.adapter.alpha = 4.f;
  o.adapter.dropout = dropout;
  o.seed = 5;
  return o;
}

// Adapters away from their B = 0 start, so that every gradient is non-trivial.
void randomize_adapters(Model& m, std::uint64_t seed) {
  for (autograd::Param* p : m.params())
    p->value.copy_from(ops::randn(p->value.shape(), seed++, Device::cpu(), 0.f, 0.3f).to(p->value.dtype()));
}

Tensor ids_tensor(const std::vector<std::int32_t>& ids, std::int64_t batch) {
  return Tensor::from(ids, {batch, std::int64_t(ids.size()) / batch});
}

// Two sequences of 6 tokens; next-token targets with one ignored position.
const std::vector<std::int32_t> kIds = {1, 5, 17, 33, 8, 2, 1, 30, 4, 4, 19, 36};
const std::vector<std::int32_t> kTargets = {5, 17, 33, 8, 2, -100, 30, 4, 4, 19, 36, 11};

std::vector<std::vector<double>> grads_of(Model& m) {
  std::vector<std::vector<double>> g;
  for (autograd::Param* p : m.params()) g.push_back(p->grad.to(DType::f64).to_vector<double>());
  return g;
}

}  // namespace

TEST_CASE("llama tiny model: finite differences of the loss w.r.t. adapters and input embeddings") {
  for (const nn::AdapterKind kind : {nn::AdapterKind::lora, nn::AdapterKind::qblora}) {
    for (const bool checkpointing : {false, true}) {
      CAPTURE(std::string(nn::adapter_kind_name(kind)));
      CAPTURE(checkpointing);
      Model m = random_model(tiny_llama_config(), f64_options(kind), 7, 0.3f);
      m.checkpointing = checkpointing;
      m.loss_chunk_rows = 5;  // several chunks of the LM-head loss, one of them ragged
      randomize_adapters(m, 100);
      REQUIRE(m.params().size() == 2 * 7 * 2);  // A and B of the 7 linears of both blocks

      const Tensor ids = ids_tensor(kIds, 2), targets = ids_tensor(kTargets, 2);
      Tensor x = m.embed(ids).clone();
      nn::Context ctx;
      Tensor dx;
      const LossResult r = m.forward_backward_embedded(ctx, x, targets, &dx);
      CHECK(r.valid_tokens == 11);
      CHECK(std::isfinite(r.loss));
      const auto loss = [&] { return m.forward_loss_embedded(ctx, x, targets).loss; };
      CHECK(std::abs(loss() - r.loss) < 1e-12);  // forward_backward's loss is the function differentiated

      for (autograd::Param* p : m.params()) {
        CAPTURE(p->name);
        REQUIRE(p->grad.defined());
        const Tensor analytic = p->grad.clone();
        CHECK(autograd::gradient_error(loss, p->value, analytic) < 1e-6);
      }
      CHECK(autograd::gradient_error(loss, x, dx) < 1e-6);
    }
  }
}

TEST_CASE("llama tiny model: a vocabulary-chunked loss gives the whole-vocabulary loss and gradients") {
  // The reference is the whole-vocabulary path, checked against finite differences above; chunks of 10
  // columns cut the 37-token vocabulary into 4, the last one ragged.
  Model m = random_model(tiny_llama_config(), f64_options(nn::AdapterKind::lora), 7, 0.3f);
  randomize_adapters(m, 100);
  m.loss_chunk_rows = 5;
  const Tensor ids = ids_tensor(kIds, 2), targets = ids_tensor(kTargets, 2);
  nn::Context ctx;
  Tensor dx_whole, dx_chunked;
  const LossResult whole = m.forward_backward_embedded(ctx, m.embed(ids), targets, &dx_whole);
  const auto g_whole = grads_of(m);
  m.zero_grad();
  m.loss_vocab_chunk = 10;
  const LossResult chunked = m.forward_backward_embedded(ctx, m.embed(ids), targets, &dx_chunked);
  CHECK(chunked.valid_tokens == whole.valid_tokens);
  CHECK(std::abs(chunked.loss - whole.loss) < 1e-12 * std::abs(whole.loss));
  CHECK(std::abs(m.forward_loss_embedded(ctx, m.embed(ids), targets).loss - whole.loss) < 1e-12 * std::abs(whole.loss));
  const auto g_chunked = grads_of(m);
  REQUIRE(g_chunked.size() == g_whole.size());
  for (std::size_t i = 0; i < g_whole.size(); ++i) CHECK(test::rel_error(g_chunked[i], g_whole[i]) < 1e-12);
  CHECK(test::rel_error(dx_chunked.to_vector<double>(), dx_whole.to_vector<double>()) < 1e-12);
}

TEST_CASE("llama tiny model: the ids path equals the embedded path and the frozen weights get no gradient") {
  Model m = random_model(tiny_llama_config(), f64_options(nn::AdapterKind::lora), 7, 0.3f);
  randomize_adapters(m, 100);
  const Tensor ids = ids_tensor(kIds, 2), targets = ids_tensor(kTargets, 2);
  nn::Context ctx;
  const LossResult a = m.forward_backward(ctx, ids, targets);
  const auto ga = grads_of(m);
  m.zero_grad();
  Tensor dx;
  const LossResult b = m.forward_backward_embedded(ctx, m.embed(ids), targets, &dx);
  CHECK(a.loss == b.loss);
  const auto gb = grads_of(m);
  for (std::size_t i = 0; i < ga.size(); ++i) CHECK(test::rel_error(ga[i], gb[i]) == 0.0);
  // Only adapter matrices are parameters: 7 linears x (A, B) x 2 blocks, with LoRA's counts.
  const Config c = tiny_llama_config();
  const std::int64_t per_block = 2 * (c.hidden_size + c.q_dim()) + 2 * 2 * (c.hidden_size + c.kv_dim()) +
                                 2 * (c.q_dim() + c.hidden_size) + 2 * 2 * (c.hidden_size + c.intermediate_size) +
                                 2 * (c.intermediate_size + c.hidden_size);
  CHECK(m.trainable_parameter_count() == 2 * per_block);
}

TEST_CASE("llama tiny model: checkpointing gives the same gradients as keeping activations, with dropout") {
  for (const nn::AdapterKind kind : {nn::AdapterKind::lora, nn::AdapterKind::qblora}) {
    CAPTURE(std::string(nn::adapter_kind_name(kind)));
    std::vector<std::vector<double>> grads[2];
    double losses[2];
    for (const bool checkpointing : {false, true}) {
      Model m = random_model(tiny_llama_config(), f64_options(kind, 0.2f), 7, 0.3f);
      randomize_adapters(m, 100);
      m.checkpointing = checkpointing;
      nn::Context ctx;
      ctx.seed = 42;
      ctx.step = 3;
      losses[checkpointing] = m.forward_backward(ctx, ids_tensor(kIds, 2), ids_tensor(kTargets, 2)).loss;
      grads[checkpointing] = grads_of(m);
      for (std::int64_t i = 0; i < m.num_layers(); ++i) CHECK_FALSE(m.block(i).has_saved());
    }
    CHECK(losses[0] == losses[1]);
    for (std::size_t i = 0; i < grads[0].size(); ++i) CHECK(test::rel_error(grads[1][i], grads[0][i]) == 0.0);
  }
}

TEST_CASE("llama tiny model: adapters at B = 0 give the base model's logits exactly") {
  LoadOptions base_options;
  Model base = random_model(tiny_llama_config(), base_options, 7, 0.3f);
  for (const nn::AdapterKind kind : {nn::AdapterKind::lora, nn::AdapterKind::qblora, nn::AdapterKind::hira}) {
    CAPTURE(std::string(nn::adapter_kind_name(kind)));
    LoadOptions o;
    o.adapter.kind = kind;
    o.adapter.rank = 4;
    Model adapted = random_model(tiny_llama_config(), o, 7, 0.3f);
    REQUIRE(adapted.trainable_parameter_count() > 0);
    const Tensor ids = ids_tensor(kIds, 2);
    const std::vector<float> a = adapted.logits(ids).to_vector<float>(), b = base.logits(ids).to_vector<float>();
    REQUIRE(a.size() == 2 * 6 * 37);
    CHECK(a == b);
    // A non-zero B changes them (the comparison above can fail).
    randomize_adapters(adapted, 9);
    CHECK(test::rel_error(adapted.logits(ids).to_vector<float>(), b) > 1e-3);
  }
}

TEST_CASE("llama tiny model: incremental decoding through the KV cache equals the full forward") {
  LoadOptions o;
  o.adapter.kind = nn::AdapterKind::lora;
  o.adapter.rank = 2;
  Model m = random_model(tiny_llama_config(), o, 11, 0.3f);
  randomize_adapters(m, 3);
  const std::int64_t batch = 2, t = 6;
  const Tensor ids = ids_tensor(kIds, batch);
  const std::vector<float> full = m.logits(ids).to_vector<float>();  // (2, 6, 37)
  const std::int64_t V = 37;

  KvCache cache(m.config(), batch, 16, DType::f32, Device::cpu());
  // Prefill 3 positions, then one token at a time.
  std::vector<float> incremental(full.size());
  const auto store = [&](const Tensor& logits, std::int64_t pos0) {
    const std::vector<float> l = logits.to_vector<float>();
    const std::int64_t n = logits.dim(1);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t v = 0; v < V; ++v)
          incremental[std::size_t((b * t + pos0 + i) * V + v)] = l[std::size_t((b * n + i) * V + v)];
  };
  auto columns = [&](std::int64_t from, std::int64_t to) {
    std::vector<std::int32_t> sub;
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = from; i < to; ++i) sub.push_back(kIds[std::size_t(b * t + i)]);
    return Tensor::from(sub, {batch, to - from});
  };
  store(m.logits(columns(0, 3), &cache), 0);
  CHECK(cache.length() == 3);
  for (std::int64_t pos = 3; pos < t; ++pos) store(m.logits(columns(pos, pos + 1), &cache), pos);
  CHECK(cache.length() == t);
  // f32: the two paths sum the same products in different orders (GEMM shapes differ), so not bit-equal.
  CHECK(test::rel_error(incremental, full) < 1e-5);

  // last_only returns the last position of each sequence.
  cache.reset();
  const std::vector<float> last = m.logits(ids, &cache, true).to_vector<float>();
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t v = 0; v < V; ++v)
      CHECK(last[std::size_t(b * V + v)] == doctest::Approx(full[std::size_t((b * t + t - 1) * V + v)]).epsilon(1e-5));
}

TEST_CASE("llama sampling: greedy, top-k 1, reproducible seeds, top-p") {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f, 0.5f};
  CHECK(Sampler({0.f}).sample(logits) == 1);
  CHECK(Sampler({1.f, 1}).sample(logits) == 1);  // top-k 1 is greedy at any temperature
  // Top-p 0.5 keeps ids 1 and 3 only (p(1) = 0.39 < 0.5 <= p(1) + p(3)).
  Sampler nucleus({1.f, 0, 0.5f, 9});
  for (int i = 0; i < 200; ++i) {
    const std::int32_t id = nucleus.sample(logits);
    CHECK((id == 1 || id == 3));
  }
  // The same seed draws the same ids; frequencies follow the softmax at temperature 1.
  Sampler a({1.f, 0, 1.f, 123}), b({1.f, 0, 1.f, 123});
  std::vector<int> counts(5);
  for (int i = 0; i < 4000; ++i) {
    const std::int32_t x = a.sample(logits);
    CHECK(x == b.sample(logits));
    ++counts[std::size_t(x)];
  }
  double z = 0;
  for (float l : logits) z += std::exp(double(l));
  for (std::size_t i = 0; i < 5; ++i) CHECK(counts[i] / 4000.0 == doctest::Approx(std::exp(double(logits[i])) / z).epsilon(0.15));
  CHECK_THROWS_AS(Sampler({-1.f}), Error);
  CHECK_THROWS_AS(Sampler({1.f, 0, 0.f}), Error);
  const std::vector<float> nan_logits = {0.f, std::nanf("")};
  CHECK_THROWS_AS(Sampler({0.f}).sample(nan_logits), Error);
}

TEST_CASE("llama generate: stops at EOS and at max_new_tokens, the prompt is prefilled once") {
  Model m = random_model(tiny_llama_config(), LoadOptions{}, 11, 0.3f);
  const std::vector<std::int32_t> prompt = {1, 5, 9};
  GenerateOptions g;
  g.max_new_tokens = 10;
  const GenerateResult r = generate(m, prompt, g);
  REQUIRE(r.tokens.size() == 10);
  CHECK_FALSE(r.stopped_at_eos);
  // Greedy decoding equals argmax of the full forward over prompt + generated tokens, step by step.
  std::vector<std::int32_t> seq = prompt;
  for (std::int32_t next : r.tokens) {
    const Tensor logits = m.logits(Tensor::from(seq, {1, std::int64_t(seq.size())}), nullptr, true);
    CHECK(argmax(logits.to_vector<float>()) == next);
    seq.push_back(next);
  }
  g.eos_ids = {r.tokens[3]};
  const GenerateResult stopped = generate(m, prompt, g);
  CHECK(stopped.stopped_at_eos);
  CHECK(stopped.tokens.size() <= 4);
  CHECK(stopped.tokens.back() == r.tokens[3]);
}

TEST_CASE("llama: bad inputs are refused with a message") {
  LoadOptions o;
  o.targets = {"q_proj", "lm_head"};
  CHECK_THROWS_WITH_AS(random_model(tiny_llama_config(), o), doctest::Contains("lm_head"), Error);
  Config c = tiny_llama_config();
  c.num_key_value_heads = 3;
  CHECK_THROWS_AS(random_model(c, LoadOptions{}), Error);
  CHECK_THROWS_WITH_AS(load_model("/nonexistent/model.bin"), doctest::Contains("/nonexistent/model.bin"), Error);
  Model m = random_model(tiny_llama_config(), LoadOptions{}, 1);
  const std::vector<std::int32_t> bad = {1, 37};
  CHECK_THROWS_AS(m.logits(Tensor::from(bad, {1, 2})), Error);
  KvCache cache(m.config(), 1, 2, DType::f32, Device::cpu());
  const std::vector<std::int32_t> three = {1, 2, 3};
  CHECK_THROWS_WITH_AS(m.logits(Tensor::from(three, {1, 3}), &cache), doctest::Contains("kv cache"), Error);
  nn::Context inference;
  inference.training = false;
  const std::vector<std::int32_t> ids = {1, 2};
  CHECK_THROWS_AS(m.forward_backward(inference, Tensor::from(ids, {1, 2}), Tensor::from(ids, {1, 2})), Error);
  // A NaN weight is named on load.
  const auto source = [&](const std::string& name) {
    Shape shape;
    for (const auto& s : io::llama_tensor_specs(tiny_llama_config()))
      if (s.name == name) shape = s.shape;
    Tensor t = ops::rand(shape, 3, Device::cpu(), 0.5f, 1.f);
    if (name == "model.layers.1.mlp.up_proj.weight") t.data<float>()[5] = std::nanf("");
    return t;
  };
  CHECK_THROWS_WITH_AS(build_model(tiny_llama_config(), source, LoadOptions{}), doctest::Contains("model.layers.1.mlp.up_proj.weight"),
                       Error);
}
