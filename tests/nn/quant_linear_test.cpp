// QuantLinear<DenseBase, Adapter> for every preset: parameter counts, the forward against an independent
// loop implementation of methods/qblora.md's operator, the structure of dW, float64 finite differences
// for A, B (or M) and x, the expanded-LoRA equivalence, and the dense merge.

#include <doctest/doctest.h>

#include <Eigen/Dense>
#include <cmath>
#include <cstdint>
#include <vector>

#include "qlora/autograd/gradcheck.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/ops/reduce.hpp"

using namespace qlora;
using nn::AdapterConfig;
using nn::AdapterKind;

namespace {

Tensor random_f64(Shape shape, std::uint64_t seed, float std = 1.f) {
  return ops::randn(shape, seed, Device::cpu(), 0.f, std).to(DType::f64);
}

// Every trainable parameter of the layer set to random values (B and M start at zero otherwise).
void randomize_params(nn::Linear& layer, std::uint64_t seed) {
  for (autograd::Param* p : layer.params()) p->value.copy_from(random_f64(p->value.shape(), seed++, 0.5f));
}

AdapterConfig preset(AdapterKind kind, int rank = 3, float alpha = 6.f) {
  AdapterConfig cfg;
  cfg.kind = kind;
  cfg.rank = rank;
  cfg.alpha = alpha;
  return cfg;
}

// y = x W^T + s E_k B A P_p x (dropout off), by plain loops in double: independent of the ops and kernels.
std::vector<double> reference_forward(const Tensor& x, const Tensor& w, nn::Linear& layer) {
  const nn::AdapterShape a = layer.adapter_shape();
  const std::int64_t n = x.dim(0), d_in = w.dim(1), d_out = w.dim(0), p = a.pool, k = a.repeat;
  const double* xp = x.data<double>();
  const double* wp = w.data<double>();
  std::vector<double> y(std::size_t(n * d_out), 0.0);
  const auto params = layer.params();
  for (std::int64_t r = 0; r < n; ++r) {
    std::vector<double> pooled(std::size_t(d_in / p), 0.0);
    for (std::int64_t i = 0; i < d_in; ++i) pooled[std::size_t(i / p)] += xp[r * d_in + i] / double(p);
    std::vector<double> h(std::size_t(d_out / k), 0.0);
    if (a.full_matrix()) {
      const double* m = params[0]->value.data<double>();
      for (std::int64_t o = 0; o < d_out / k; ++o)
        for (std::int64_t j = 0; j < d_in / p; ++j) h[std::size_t(o)] += m[o * (d_in / p) + j] * pooled[std::size_t(j)];
    } else if (a.kind != AdapterKind::none) {
      const double* A = params[0]->value.data<double>();
      const double* B = params[1]->value.data<double>();
      std::vector<double> v(std::size_t(a.rank), 0.0);
      for (std::int64_t q = 0; q < a.rank; ++q)
        for (std::int64_t j = 0; j < d_in / p; ++j) v[std::size_t(q)] += A[q * (d_in / p) + j] * pooled[std::size_t(j)];
      for (std::int64_t o = 0; o < d_out / k; ++o)
        for (std::int64_t q = 0; q < a.rank; ++q) h[std::size_t(o)] += B[o * a.rank + q] * v[std::size_t(q)];
    }
    for (std::int64_t o = 0; o < d_out; ++o) {
      double base = 0;
      for (std::int64_t i = 0; i < d_in; ++i) base += xp[r * d_in + i] * wp[o * d_in + i];
      y[std::size_t(r * d_out + o)] = base + double(a.scale) * h[std::size_t(o / k)];
    }
  }
  return y;
}

constexpr AdapterKind kPresets[] = {AdapterKind::lora, AdapterKind::qblora, AdapterKind::qalora, AdapterKind::qablora,
                                    AdapterKind::hira};

}  // namespace

TEST_CASE("quant_linear: trainable parameter counts of the presets (methods/qblora.md table)") {
  // 4096 x 4096, r = 64: LoRA 524,288 (rank 64), Q-BLoRA 524,288 (rank 128), single matrix 1024 x 512 = 524,288.
  const auto count = [](AdapterKind kind, std::int64_t group = 0) {
    const auto a = nn::resolve_adapter(preset(kind, 64, 16.f), 4096, 4096, group);
    return std::pair{nn::adapter_parameter_count(a, 4096, 4096), a.rank};
  };
  CHECK(count(AdapterKind::lora) == std::pair<std::int64_t, std::int64_t>{524288, 64});
  CHECK(count(AdapterKind::qblora) == std::pair<std::int64_t, std::int64_t>{524288, 128});
  CHECK(count(AdapterKind::hira).first == 524288);
  // QA-LoRA, g = 32: r (d_in/g + d_out) = 64 * (128 + 4096).
  CHECK(count(AdapterKind::qalora, 32) == std::pair<std::int64_t, std::int64_t>{64 * (128 + 4096), 64});
  // QA-BLoRA, g = 32, k = 2: the LoRA-matching rank 64*8192/(128+2048) = 241 is capped at d_in/g = 128.
  CHECK(count(AdapterKind::qablora, 32) == std::pair<std::int64_t, std::int64_t>{128 * (128 + 2048), 128});
  // Q-BLoRA's scale uses the nominal r: alpha / r = 16 / 64.
  CHECK(nn::resolve_adapter(preset(AdapterKind::qblora, 64, 16.f), 4096, 4096, 0).scale == 0.25f);
}

TEST_CASE("quant_linear: shapes that the pooling or repeat do not divide are refused") {
  CHECK_THROWS_WITH_AS(nn::resolve_adapter(preset(AdapterKind::qblora), 10, 9, 0, "blk.0.q"),
                       doctest::Contains("p = 2 does not divide d_in = 9"), Error);
  CHECK_THROWS_WITH_AS(nn::resolve_adapter(preset(AdapterKind::hira), 12, 8, 0), doctest::Contains("k = 8"), Error);
  CHECK_THROWS_AS(nn::parse_adapter_kind("dora"), Error);
}

TEST_CASE("quant_linear: forward equals x (W + dW)^T for every preset, and B = 0 gives the base") {
  const std::int64_t n = 5, d_out = 16, d_in = 24;
  for (AdapterKind kind : kPresets) {
    CAPTURE(nn::adapter_kind_name(kind));
    const Tensor w = random_f64(Shape{d_out, d_in}, 1);
    const Tensor x = random_f64(Shape{n, d_in}, 2);
    auto layer = nn::make_linear("layer", w, preset(kind), 7, 0, DType::f64);
    nn::Context ctx;

    // Freshly initialised: B (or M) is zero, so the output is the base's.
    const Tensor y0 = layer->forward(ctx, x);
    CHECK(autograd::relative_error(y0.to_vector<double>(), ops::matmul(x, w, false, true).to_vector<double>()) < 1e-15);

    randomize_params(*layer, 10);
    const Tensor y = layer->forward(ctx, x);
    CHECK(autograd::relative_error(y.to_vector<double>(), reference_forward(x, w, *layer)) < 1e-13);
    // The merged dense weight gives the same output.
    const Tensor merged = layer->merged_weight(DType::f64);
    CHECK(autograd::relative_error(ops::matmul(x, merged, false, true).to_vector<double>(), y.to_vector<double>()) <
          1e-13);
  }
}

TEST_CASE("quant_linear: dW is constant on k x p tiles and has rank at most r'") {
  const std::int64_t d_out = 32, d_in = 48;
  for (AdapterKind kind : kPresets) {
    CAPTURE(nn::adapter_kind_name(kind));
    auto layer = nn::make_linear("layer", random_f64(Shape{d_out, d_in}, 3), preset(kind), 8, 0, DType::f64);
    randomize_params(*layer, 20);
    const nn::AdapterShape a = layer->adapter_shape();
    const std::vector<double> merged = layer->merged_weight(DType::f64).to_vector<double>();
    const std::vector<double> w = random_f64(Shape{d_out, d_in}, 3).to_vector<double>();  // the same base
    Eigen::MatrixXd delta(d_out, d_in);
    bool tiles_constant = true;
    for (std::int64_t o = 0; o < d_out; ++o)
      for (std::int64_t i = 0; i < d_in; ++i) {
        delta(o, i) = merged[o * d_in + i] - w[o * d_in + i];
        const std::int64_t o0 = o / a.repeat * a.repeat, i0 = i / a.pool * a.pool;
        const double corner = merged[o0 * d_in + i0] - w[o0 * d_in + i0];
        tiles_constant = tiles_constant && std::abs(delta(o, i) - corner) <= 1e-12 * (1 + std::abs(corner));
      }
    CHECK(tiles_constant);
    Eigen::FullPivLU<Eigen::MatrixXd> lu(delta);
    lu.setThreshold(1e-10);
    const std::int64_t max_rank = a.full_matrix() ? std::min(d_out / a.repeat, d_in / a.pool) : a.rank;
    CHECK(lu.rank() <= max_rank);
    CHECK(lu.rank() >= 1);
  }
}

TEST_CASE("quant_linear: backward matches float64 finite differences for A, B (or M) and x, every preset") {
  const std::int64_t n = 3, d_out = 16, d_in = 16;
  for (AdapterKind kind : kPresets) {
    for (const float dropout : {0.f, 0.3f}) {
      CAPTURE(nn::adapter_kind_name(kind));
      CAPTURE(dropout);
      AdapterConfig cfg = preset(kind);
      cfg.dropout = dropout;
      auto layer = nn::make_linear("layer", random_f64(Shape{d_out, d_in}, 4), cfg, 9, 3, DType::f64);
      randomize_params(*layer, 30);
      Tensor x = random_f64(Shape{n, d_in}, 5);
      const Tensor c = random_f64(Shape{n, d_out}, 6);  // L = <c, y>
      nn::Context ctx;
      ctx.seed = 99;  // the same dropout mask in every evaluation of this step
      auto loss = [&] { return autograd::dot(layer->forward(ctx, x).to_vector<double>(), c.to_vector<double>()); };

      loss();
      const Tensor dx = layer->backward(ctx, c);
      CHECK(autograd::gradient_error(loss, x, dx) < 1e-7);
      for (autograd::Param* p : layer->params()) {
        CAPTURE(p->name);
        REQUIRE(p->grad.defined());
        CHECK(autograd::gradient_error(loss, p->value, p->grad) < 1e-7);
      }
    }
  }
}

TEST_CASE("quant_linear: gradients accumulate over micro-batches, and the base never gets one") {
  auto layer = nn::make_linear("layer", random_f64(Shape{8, 8}, 11), preset(AdapterKind::qblora), 1, 0, DType::f64);
  randomize_params(*layer, 40);
  nn::Context ctx;
  const Tensor x = random_f64(Shape{2, 8}, 12), dy = random_f64(Shape{2, 8}, 13);
  layer->forward(ctx, x);
  layer->backward(ctx, dy);
  const auto once = layer->params()[0]->grad.to_vector<double>();
  layer->forward(ctx, x);
  layer->backward(ctx, dy);
  const auto twice = layer->params()[0]->grad.to_vector<double>();
  for (std::size_t i = 0; i < once.size(); ++i) CHECK(twice[i] == doctest::Approx(2 * once[i]));
  CHECK(layer->params().size() == 2);  // A and B only
  CHECK_THROWS_WITH_AS(layer->backward(ctx, dy), doctest::Contains("without a saved forward"), Error);
}

TEST_CASE("quant_linear: Q-BLoRA equals its expanded plain LoRA, and expanded gradients fold back") {
  // methods/qblora.md "Kernel shortcut": A_full = (1/p) repeat_interleave(A, p, dim 1), B_full =
  // repeat_interleave(B, k, dim 0); dA = (1/p) sum over p-column groups of dA_full, dB = k-row group sums.
  const std::int64_t n = 4, d = 12;
  const Tensor w = random_f64(Shape{d, d}, 14);
  auto qb = nn::make_linear("qb", w, preset(AdapterKind::qblora, 2, 4.f), 1, 0, DType::f64);
  randomize_params(*qb, 50);
  const nn::PlainLora plain = *qb->plain_lora();
  CHECK(plain.A.shape() == Shape{4, d});
  CHECK(plain.B.shape() == Shape{d, 4});

  AdapterConfig lora_cfg = preset(AdapterKind::lora, 4, 4.f * 2);  // rank 2r, alpha chosen so s is unchanged
  auto lora = nn::make_linear("lora", w, lora_cfg, 1, 0, DType::f64);
  REQUIRE(lora->adapter_shape().scale == qb->adapter_shape().scale);
  lora->params()[0]->value.copy_from(plain.A);
  lora->params()[1]->value.copy_from(plain.B);

  nn::Context ctx;
  const Tensor x = random_f64(Shape{n, d}, 15), dy = random_f64(Shape{n, d}, 16);
  const Tensor y_qb = qb->forward(ctx, x), y_lora = lora->forward(ctx, x);
  CHECK(autograd::relative_error(y_qb.to_vector<double>(), y_lora.to_vector<double>()) < 1e-14);
  const Tensor dx_qb = qb->backward(ctx, dy), dx_lora = lora->backward(ctx, dy);
  CHECK(autograd::relative_error(dx_qb.to_vector<double>(), dx_lora.to_vector<double>()) < 1e-14);

  const auto da_full = lora->params()[0]->grad.to_vector<double>(), db_full = lora->params()[1]->grad.to_vector<double>();
  const auto da = qb->params()[0]->grad.to_vector<double>(), db = qb->params()[1]->grad.to_vector<double>();
  std::vector<double> da_folded(da.size(), 0.0), db_folded(db.size(), 0.0);
  for (std::int64_t r = 0; r < 4; ++r)
    for (std::int64_t i = 0; i < d; ++i) da_folded[std::size_t(r * (d / 2) + i / 2)] += da_full[std::size_t(r * d + i)] / 2;
  for (std::int64_t o = 0; o < d; ++o)
    for (std::int64_t r = 0; r < 4; ++r) db_folded[std::size_t((o / 2) * 4 + r)] += db_full[std::size_t(o * 4 + r)];
  CHECK(autograd::relative_error(da, da_folded) < 1e-14);
  CHECK(autograd::relative_error(db, db_folded) < 1e-14);
}

TEST_CASE("quant_linear: merging into a dense base keeps the output and zeroes the adapter") {
  for (AdapterKind kind : kPresets) {
    CAPTURE(nn::adapter_kind_name(kind));
    auto layer = nn::make_linear("layer", random_f64(Shape{16, 32}, 17), preset(kind), 2, 0, DType::f64);
    randomize_params(*layer, 60);
    nn::Context ctx;
    const Tensor x = random_f64(Shape{3, 32}, 18);
    const auto before = layer->forward(ctx, x).to_vector<double>();
    layer->merge();
    const auto after = layer->forward(ctx, x).to_vector<double>();
    CHECK(autograd::relative_error(after, before) < 1e-13);
    // The adapter now contributes nothing: its output-side factor (B, or M) is zero.
    CHECK(ops::sum_squares(std::vector<Tensor>{layer->params().back()->value}) == 0.0);
  }
}

TEST_CASE("quant_linear: a wrong input shape is a clear error naming the layer") {
  auto layer = nn::make_linear("blk.3.mlp.up", random_f64(Shape{8, 6}, 19), preset(AdapterKind::lora), 1, 0, DType::f64);
  nn::Context ctx;
  CHECK_THROWS_WITH_AS(layer->forward(ctx, random_f64(Shape{2, 7}, 20)),
                       doctest::Contains("blk.3.mlp.up: input has shape"), Error);
}
