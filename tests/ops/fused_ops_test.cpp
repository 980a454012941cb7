// The fused memory-bound ops at the Tensor level (ops/rmsnorm.hpp add_rmsnorm, ops/rope.hpp rope_qk_,
// ops/cross_entropy.hpp vocabulary chunks): each equals its unfused composition, and bad arguments are named.

#include <doctest/doctest.h>

#include <cmath>

#include "qlora/autograd/gradcheck.hpp"
#include "qlora/ops/ops.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {
bool same_values(const Tensor& a, const Tensor& b) { return a.to_vector<float>() == b.to_vector<float>(); }
}  // namespace

TEST_CASE("ops: add_rmsnorm and its backward equal add + rmsnorm and rmsnorm_backward + axpy_") {
  const Tensor x = ops::randn({2, 3, 16}, 1), residual = ops::randn({2, 3, 16}, 2);
  const Tensor w = ops::rand({16}, 3, Device::cpu(), 0.5f, 1.5f);
  const Tensor h = ops::add(x, residual);
  const ops::RmsNormResult n = ops::rmsnorm(h, w, 1e-5f);
  const ops::AddRmsNormResult f = ops::add_rmsnorm(x, residual, w, 1e-5f);
  CHECK(same_values(f.sum, h));
  CHECK(same_values(f.y, n.y));
  CHECK(same_values(f.rstd, n.rstd));

  const Tensor dy = ops::randn(x.shape(), 4), dsum = ops::randn(x.shape(), 5);
  Tensor dw = Tensor::zeros({16}), dw_fused = Tensor::zeros({16});
  Tensor dx = ops::rmsnorm_backward(h, w, n.rstd, dy, dw);
  ops::axpy_(dx, 1.f, dsum);
  CHECK(same_values(ops::add_rmsnorm_backward(f.sum, w, f.rstd, dy, dsum, dw_fused), dx));
  CHECK(same_values(dw_fused, dw));

  CHECK_THROWS_WITH_AS(ops::add_rmsnorm(x, ops::randn({2, 3, 15}, 6), w, 1e-5f),
                       "add_rmsnorm: residual has shape (2, 3, 15), expected (2, 3, 16)", Error);
  CHECK_THROWS_WITH_AS(ops::add_rmsnorm_backward(f.sum, w, f.rstd, dy, ops::randn({6, 16}, 7)),
                       "add_rmsnorm_backward: dsum has shape (6, 16), expected (2, 3, 16)", Error);
}

TEST_CASE("ops: rope_qk_ equals rope_ on q and on k, forward and backward") {
  const Tensor inv_freq = ops::rope_inv_freq(8, 10000.0);
  const Tensor q0 = ops::randn({2, 5, 4, 8}, 1), k0 = ops::randn({2, 5, 2, 8}, 2);
  for (const bool backward : {false, true}) {
    CAPTURE(backward);
    Tensor q = q0.clone(), k = k0.clone(), qf = q0.clone(), kf = k0.clone();
    if (backward) {
      ops::rope_backward_(q, inv_freq, 3);
      ops::rope_backward_(k, inv_freq, 3);
      ops::rope_qk_backward_(qf, kf, inv_freq, 3);
    } else {
      ops::rope_(q, inv_freq, 3);
      ops::rope_(k, inv_freq, 3);
      ops::rope_qk_(qf, kf, inv_freq, 3);
    }
    CHECK(same_values(qf, q));
    CHECK(same_values(kf, k));
    CHECK(!same_values(qf, q0));
  }
  Tensor q = q0.clone(), k_short = ops::randn({2, 4, 2, 8}, 3);
  CHECK_THROWS_WITH_AS(ops::rope_qk_(q, k_short, inv_freq),
                       "rope_qk_: q and k must be (batch, seq, heads, head_dim) with the same batch, seq and head_dim, "
                       "got (2, 5, 4, 8) and (2, 4, 2, 8)",
                       Error);
}

TEST_CASE("ops: cross-entropy over vocabulary chunks equals the whole rows; errors name the chunk") {
  const Tensor logits = ops::randn({6, 23}, 1, Device::cpu(), 0.f, 4.f);
  const Tensor targets = Tensor::from(std::vector<std::int32_t>{3, -100, 22, 0, 9, 14}, {6});
  const ops::CrossEntropyResult whole = ops::cross_entropy(logits, targets);
  const Tensor columns = logits.reshape({6, 23});
  ops::CrossEntropyChunks c = ops::cross_entropy_chunk_start(targets, 23, logits);
  for (std::int64_t c0 = 0; c0 < 23; c0 += 5) {
    const std::int64_t c1 = std::min<std::int64_t>(23, c0 + 5);
    Tensor chunk = Tensor::empty({6, c1 - c0});
    for (std::int64_t r = 0; r < 6; ++r)
      for (std::int64_t j = c0; j < c1; ++j) chunk.data<float>()[r * (c1 - c0) + j - c0] = columns.data<float>()[r * 23 + j];
    ops::cross_entropy_chunk(c, chunk, targets, c0);
  }
  const ops::CrossEntropyResult chunked = ops::cross_entropy_chunk_finish(c, targets);
  CHECK(test::rel_error(chunked.lse.to_vector<float>(), whole.lse.to_vector<float>()) < 1e-6);
  CHECK(test::rel_error(chunked.losses.to_vector<float>(), whole.losses.to_vector<float>()) < 1e-6);

  CHECK_THROWS_WITH_AS(ops::cross_entropy_chunk(c, ops::randn({6, 5}, 2), targets, 20),
                       "cross_entropy_chunk: chunk columns [20, 25) lie outside the vocabulary [0, 23)", Error);
  const Tensor bad = Tensor::from(std::vector<std::int32_t>{3, -100, 23, 0, 9, 14}, {6});
  CHECK_THROWS_WITH_AS(ops::cross_entropy_chunk(c, ops::randn({6, 5}, 2), bad, 0),
                       "cross_entropy_chunk: target 23 at row 2 is outside the vocabulary [0, 23) and is not the "
                       "ignore index -100",
                       Error);
}

TEST_CASE("ops: LM-head cross-entropy chunked over the vocabulary equals the whole-row path, gradients included") {
  const std::int64_t rows = 7, dim = 5, vocab = 11;
  const Tensor hidden = ops::randn({rows, dim}, 1).to(DType::f64);
  const Tensor weight = ops::randn({vocab, dim}, 2).to(DType::f64);
  const Tensor targets = Tensor::from(std::vector<std::int32_t>{3, -100, 0, 10, 7, -100, 2}, {rows});
  Tensor dh_whole, dw_whole = Tensor::zeros({vocab, dim}, DType::f64);
  const auto whole = ops::linear_cross_entropy(hidden, weight, targets, 3, &dh_whole, &dw_whole);
  for (const std::int64_t vocab_chunk : {1, 4, 10}) {
    CAPTURE(vocab_chunk);
    Tensor dh, dw = Tensor::zeros({vocab, dim}, DType::f64);
    const auto r = ops::linear_cross_entropy(hidden, weight, targets, 3, &dh, &dw, vocab_chunk);
    CHECK(r.valid_tokens == 5);
    CHECK(r.loss == doctest::Approx(whole.loss).epsilon(1e-13));
    CHECK(test::rel_error(dh.to_vector<double>(), dh_whole.to_vector<double>()) < 1e-13);
    CHECK(test::rel_error(dw.to_vector<double>(), dw_whole.to_vector<double>()) < 1e-13);
  }
  // And against float64 finite differences directly.
  Tensor dh, dw = Tensor::zeros({vocab, dim}, DType::f64);
  (void)ops::linear_cross_entropy(hidden, weight, targets, 2, &dh, &dw, 3);
  auto loss = [&] { return ops::linear_cross_entropy(hidden, weight, targets, 2, nullptr, nullptr, 3).loss; };
  Tensor h = hidden, w = weight;
  CHECK(autograd::gradient_error(loss, h, dh) < 1e-7);
  CHECK(autograd::gradient_error(loss, w, dw) < 1e-7);
}
