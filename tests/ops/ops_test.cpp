// The Tensor-level ops on the CPU: shapes and dtypes of results, the errors users see, and the composite
// ops (chunked LM-head cross-entropy, gradient clipping) against independent computations.

#include <doctest/doctest.h>

#include <cmath>

#include "qlora/autograd/gradcheck.hpp"
#include "qlora/ops/ops.hpp"
#include "support/random.hpp"

using namespace qlora;

TEST_CASE("ops: results keep shapes, per-row statistics drop the last axis") {
  const Tensor x = ops::randn({2, 3, 8}, 1);
  const Tensor w = ops::randn({8}, 2);
  const ops::RmsNormResult r = ops::rmsnorm(x, w, 1e-5f);
  CHECK(r.y.shape() == x.shape());
  CHECK(r.rstd.shape() == Shape{2, 3});
  CHECK(ops::softmax(x).shape() == x.shape());
  CHECK(ops::sum_last(x).shape() == Shape{2, 3});
  CHECK(ops::max_last(ops::randn({5}, 3)).shape() == Shape{});
  // mean_last equals sum_last / cols
  const std::vector<float> s = ops::sum_last(x).to_vector<float>(), m = ops::mean_last(x).to_vector<float>();
  for (std::size_t i = 0; i < s.size(); ++i) CHECK(m[i] == doctest::Approx(s[i] / 8).epsilon(1e-6));
}

TEST_CASE("ops: bad arguments name the op, the operand and the value") {
  const Tensor x = ops::randn({2, 8}, 1);
  CHECK_THROWS_WITH_AS(ops::rmsnorm(x, ops::randn({7}, 2), 1e-5f), "rmsnorm: weight has shape (7), expected (8)", Error);
  CHECK_THROWS_WITH_AS(ops::add(x, ops::randn({8, 2}, 3)), "add: b has shape (8, 2), expected (2, 8)", Error);
  CHECK_THROWS_WITH_AS(ops::add(x, Tensor()), "add: b is an undefined tensor", Error);
  const Tensor table = ops::randn({10, 4}, 4);
  const Tensor ids = Tensor::from(std::vector<std::int32_t>{1, 10}, {2});
  CHECK_THROWS_WITH_AS(ops::embedding(table, ids),
                       "embedding: token id 10 at position 1 is outside the vocabulary [0, 10)", Error);
  const Tensor targets = Tensor::from(std::vector<std::int32_t>{-5, 0}, {2});
  CHECK_THROWS_WITH_AS(ops::cross_entropy(x, targets),
                       "cross_entropy: target -5 at row 0 is outside the vocabulary [0, 8) and is not the ignore index -100",
                       Error);
  Tensor q = ops::randn({1, 4, 3, 8}, 5);
  CHECK_THROWS_WITH_AS(ops::attention(q, ops::randn({1, 4, 2, 8}, 6), ops::randn({1, 4, 2, 8}, 7)),
                       "attention: 3 query heads cannot share 2 key/value heads evenly", Error);
  CHECK_THROWS_WITH_AS(ops::rope_(q, ops::rope_inv_freq(6, 10000.0)), "rope_: inv_freq has shape (3), expected (4)", Error);
  Tensor p = ops::randn({4}, 8), g = ops::randn({4}, 9), m = Tensor::zeros({4}), v = Tensor::zeros({4});
  CHECK_THROWS_WITH_AS(ops::adamw_step(p, g, m, v, {}, 0), "adamw_step: step counts from 1, got 0", Error);
}

TEST_CASE("ops: random tensors are reproducible and follow (seed, offset)") {
  const Tensor a = ops::randn({100}, 5), b = ops::randn({100}, 5);
  CHECK(a.to_vector<float>() == b.to_vector<float>());
  Tensor tail = Tensor::empty({50});
  ops::fill_normal_(tail, 5, 50);
  const std::vector<float> av = a.to_vector<float>(), tv = tail.to_vector<float>();
  for (int i = 0; i < 50; ++i) CHECK(tv[i] == av[50 + i]);
  const std::vector<float> u = ops::rand({1000}, 9, Device::cpu(), 2.f, 3.f).to_vector<float>();
  for (float x : u) CHECK((x >= 2.f && x < 3.f));
}

TEST_CASE("ops: chunked LM-head cross-entropy equals the unchunked loss, and its gradients finite differences") {
  const std::int64_t rows = 7, dim = 5, vocab = 11;
  Tensor hidden = ops::randn({rows, dim}, 1).to(DType::f64);
  Tensor weight = ops::randn({vocab, dim}, 2).to(DType::f64);
  const Tensor targets = Tensor::from(std::vector<std::int32_t>{3, -100, 0, 10, 7, -100, 2}, {rows});

  // Independent reference: full logits, log-softmax by definition, mean over the 5 valid rows.
  auto reference_loss = [&] {
    const Tensor logits = ops::matmul(hidden, weight, false, true);
    const double* l = logits.data<double>();
    double sum = 0;
    int valid = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int32_t t = targets.data<std::int32_t>()[r];
      if (t == -100) continue;
      double z = 0;
      for (std::int64_t j = 0; j < vocab; ++j) z += std::exp(l[r * vocab + j]);
      sum += std::log(z) - l[r * vocab + t];
      ++valid;
    }
    return sum / valid;
  };

  for (std::int64_t chunk : {1, 3, 7, 100}) {
    Tensor dhidden;
    Tensor dweight = Tensor::zeros({vocab, dim}, DType::f64);
    const ops::LinearCrossEntropyResult r = ops::linear_cross_entropy(hidden, weight, targets, chunk, &dhidden, &dweight);
    CHECK(r.valid_tokens == 5);
    CHECK(r.loss == doctest::Approx(reference_loss()).epsilon(1e-12));
    if (chunk == 3) {
      auto loss = [&] { return ops::linear_cross_entropy(hidden, weight, targets, 3).loss; };
      CHECK(autograd::gradient_error(loss, hidden, dhidden) < 1e-7);
      CHECK(autograd::gradient_error(loss, weight, dweight) < 1e-7);
    }
  }
}

TEST_CASE("ops: clip_grad_norm_ scales to max_norm and returns the norm before clipping") {
  std::vector<Tensor> grads{Tensor::from(std::vector<float>{3.f, 0.f}, {2}), Tensor::from(std::vector<float>{4.f}, {1})};
  CHECK(ops::global_grad_norm(grads) == doctest::Approx(5.0));
  CHECK(ops::clip_grad_norm_(grads, 1.0) == doctest::Approx(5.0));
  CHECK(ops::global_grad_norm(grads) == doctest::Approx(1.0).epsilon(1e-5));
  CHECK(grads[0].to_vector<float>()[0] == doctest::Approx(0.6f).epsilon(1e-5));
  // Below the limit nothing changes.
  CHECK(ops::clip_grad_norm_(grads, 10.0) == doctest::Approx(1.0).epsilon(1e-5));
  CHECK(grads[1].to_vector<float>()[0] == doctest::Approx(0.8f).epsilon(1e-5));
  // A non-finite gradient is reported, not spread.
  grads[1].data<float>()[0] = NAN;
  CHECK(std::isnan(ops::clip_grad_norm_(grads, 1.0)));
  CHECK(grads[0].to_vector<float>()[0] == doctest::Approx(0.6f).epsilon(1e-5));
}

TEST_CASE("ops: AdamW over several steps matches torch.optim.AdamW's update written out") {
  const ops::AdamWConfig cfg{.lr = 0.1f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f};
  Tensor p = Tensor::from(std::vector<double>{1.0, -2.0}, {2});
  Tensor m = Tensor::zeros({2}, DType::f64), v = Tensor::zeros({2}, DType::f64);
  double ref[2] = {1.0, -2.0}, rm[2] = {0, 0}, rv[2] = {0, 0};
  for (int step = 1; step <= 3; ++step) {
    const std::vector<double> g{0.5 * step, -0.25};
    ops::adamw_step(p, Tensor::from(g, {2}), m, v, cfg, step);
    for (int i = 0; i < 2; ++i) {  // torch/optim/adamw.py, single-tensor path
      ref[i] *= 1 - double(cfg.lr) * double(cfg.weight_decay);
      rm[i] = 0.9 * rm[i] + 0.1 * g[i];
      rv[i] = 0.99 * rv[i] + 0.01 * g[i] * g[i];
      const double bc1 = 1 - std::pow(0.9, step), bc2 = 1 - std::pow(0.99, step);
      ref[i] -= double(cfg.lr) / bc1 * rm[i] / (std::sqrt(rv[i]) / std::sqrt(bc2) + 1e-8);
    }
  }
  const std::vector<double> got = p.to_vector<double>();
  CHECK(got[0] == doctest::Approx(ref[0]).epsilon(1e-6));
  CHECK(got[1] == doctest::Approx(ref[1]).epsilon(1e-6));
}

TEST_CASE("ops: rope then its backward is the identity, and position offsets compose") {
  Tensor x = ops::randn({2, 5, 3, 8}, 1).to(DType::f64);
  const std::vector<double> x0 = x.to_vector<double>();
  const Tensor inv = ops::rope_inv_freq(8, 10000.0);
  ops::rope_(x, inv, 4);
  CHECK(test::rel_error(x.to_vector<double>(), x0) > 1e-3);
  ops::rope_backward_(x, inv, 4);
  CHECK(test::rel_error(x.to_vector<double>(), x0) < 1e-6);
  // Token t of a sequence equals token 0 of a sequence offset by t.
  Tensor full = ops::randn({1, 5, 1, 8}, 2);
  Tensor last = full.select(0).slice(4, 5).clone().reshape({1, 1, 1, 8});
  ops::rope_(full, inv, 0);
  ops::rope_(last, inv, 4);
  CHECK(test::rel_error(last.to_vector<float>(), full.select(0).slice(4, 5).to_vector<float>()) < 1e-6);
}
