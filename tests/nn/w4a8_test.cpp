// QuantLinear in W4A8 mode (docs/nn.md, "W4A8"): the base path multiplies the per-token fake-quantized
// input, the adapter the raw input; the backward is the straight-through estimator (dx as without
// quantization, adapter gradients exact: float64 finite differences).

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "qlora/autograd/gradcheck.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/activation_quant.hpp"
#include "qlora/quant/quantize.hpp"
#include "support/files.hpp"

using namespace qlora;

namespace {

Tensor random_f64(Shape shape, std::uint64_t seed, float std = 1.f) {
  return ops::randn(shape, seed, Device::cpu(), 0.f, std).to(DType::f64);
}

nn::AdapterConfig lora(int rank = 3, float alpha = 6.f) {
  nn::AdapterConfig cfg;
  cfg.kind = nn::AdapterKind::lora;
  cfg.rank = rank;
  cfg.alpha = alpha;
  return cfg;
}

void randomize_params(nn::Linear& layer, std::uint64_t seed) {
  for (autograd::Param* p : layer.params()) p->value.copy_from(random_f64(p->value.shape(), seed++, 0.5f));
}

// y = Qa(x) W^T + s B (A x), by loops in double (A: r x d_in, B: d_out x r).
std::vector<double> w4a8_reference(const Tensor& x, const Tensor& w, nn::Linear& layer, int bits) {
  const std::int64_t n = x.dim(0), d_in = w.dim(1), d_out = w.dim(0);
  const std::vector<double> xq = quant::fake_quantize_per_token(x, bits).to_vector<double>();
  const std::vector<double> xr = x.to_vector<double>(), wv = w.to_vector<double>();
  const auto params = layer.params();
  const std::vector<double> a = params[0]->value.to_vector<double>(), b = params[1]->value.to_vector<double>();
  const std::int64_t r = params[0]->value.dim(0);
  const double s = layer.adapter_shape().scale;
  std::vector<double> y(std::size_t(n * d_out), 0.0);
  for (std::int64_t t = 0; t < n; ++t) {
    std::vector<double> v(std::size_t(r), 0.0);
    for (std::int64_t q = 0; q < r; ++q)
      for (std::int64_t i = 0; i < d_in; ++i) v[std::size_t(q)] += a[std::size_t(q * d_in + i)] * xr[std::size_t(t * d_in + i)];
    for (std::int64_t o = 0; o < d_out; ++o) {
      double acc = 0;
      for (std::int64_t i = 0; i < d_in; ++i) acc += xq[std::size_t(t * d_in + i)] * wv[std::size_t(o * d_in + i)];
      for (std::int64_t q = 0; q < r; ++q) acc += s * b[std::size_t(o * r + q)] * v[std::size_t(q)];
      y[std::size_t(t * d_out + o)] = acc;
    }
  }
  return y;
}

}  // namespace

TEST_CASE("w4a8: the base sees Qa(x), the adapter sees x; describe() shows the activation bits") {
  const std::int64_t n = 6, d_out = 12, d_in = 20;
  const Tensor w = random_f64(Shape{d_out, d_in}, 1);
  Tensor x = random_f64(Shape{n, d_in}, 2);
  x.data<double>()[5] = 9.0;  // an outlier: coarse per-token scale for row 0
  auto layer = nn::make_linear("blk.q", w, lora(), 7, 0, DType::f64);
  randomize_params(*layer, 10);
  CHECK(layer->activation_bits() == 0);
  nn::Context ctx;
  ctx.training = false;
  const std::vector<double> plain = layer->forward(ctx, x).to_vector<double>();
  for (int bits : {8, 4}) {
    CAPTURE(bits);
    layer->set_activation_bits(bits);
    CHECK(layer->activation_bits() == bits);
    const std::vector<double> y = layer->forward(ctx, x).to_vector<double>();
    CHECK(autograd::relative_error(y, w4a8_reference(x, w, *layer, bits)) < 1e-13);
    CHECK(autograd::relative_error(y, plain) > 1e-4);  // the quantization is really applied
  }
  CHECK(layer->describe().find("dense f64 a4 + lora(") == 0);
  layer->set_activation_bits(0);
  CHECK(autograd::relative_error(layer->forward(ctx, x).to_vector<double>(), plain) == 0.0);
  CHECK(layer->describe().find("dense f64 + lora(") == 0);
}

TEST_CASE("w4a8: a quantized base (dint4) multiplies the fake-quantized input") {
  const std::int64_t n = 5, d_out = 16, d_in = 64;
  const Tensor w = ops::randn(Shape{d_out, d_in}, 3, Device::cpu(), 0.f, 0.05f);
  const quant::QuantizedTensor q = quant::quantize(w, quant::QuantConfig::parse("dint4-g32"));
  const Tensor deq = quant::dequantize(q, DType::f32);
  auto layer = nn::make_linear("blk.down", q, nn::AdapterConfig{nn::AdapterKind::none}, 0, 0);
  layer->set_activation_bits(8);
  CHECK(layer->describe() == "dint4-g32 a8");
  const Tensor x = ops::randn(Shape{n, d_in}, 4, Device::cpu(), 0.f, 1.f);
  nn::Context ctx;
  for (const bool training : {true, false}) {  // dequantize-then-GEMM and the fused GEMV path
    ctx.training = training;
    const Tensor y = layer->forward(ctx, x);
    const Tensor ref = ops::matmul(quant::fake_quantize_per_token(x, 8), deq, false, true);
    CHECK(autograd::relative_error(y.to(DType::f64).to_vector<double>(), ref.to(DType::f64).to_vector<double>()) < 1e-5);
  }
}

TEST_CASE("w4a8: backward is the straight-through estimator; adapter gradients match finite differences") {
  const std::int64_t n = 4, d_out = 10, d_in = 12;
  const Tensor w = random_f64(Shape{d_out, d_in}, 5);
  auto quantized = nn::make_linear("blk.v", w, lora(), 9, 3, DType::f64);
  auto plain = nn::make_linear("blk.v", w, lora(), 9, 3, DType::f64);
  randomize_params(*quantized, 30);
  randomize_params(*plain, 30);
  quantized->set_activation_bits(8);
  Tensor x = random_f64(Shape{n, d_in}, 6);
  const Tensor c = random_f64(Shape{n, d_out}, 7);  // L = <c, y>
  nn::Context ctx;

  quantized->forward(ctx, x);
  plain->forward(ctx, x);
  const Tensor dx = quantized->backward(ctx, c), dx_plain = plain->backward(ctx, c);
  // STE: d Qa(x) / dx = I, so dx = dy W + adapter part, exactly as without quantization.
  CHECK(dx.to_vector<double>() == dx_plain.to_vector<double>());
  // The adapter sees the raw x: its gradients are exact, equal to the unquantized layer's, and the
  // loss is smooth in them.
  auto loss = [&] { return autograd::dot(quantized->forward(ctx, x).to_vector<double>(), c.to_vector<double>()); };
  for (std::size_t i = 0; i < quantized->params().size(); ++i) {
    autograd::Param* p = quantized->params()[i];
    CAPTURE(p->name);
    CHECK(p->grad.to_vector<double>() == plain->params()[i]->grad.to_vector<double>());
    CHECK(autograd::gradient_error(loss, p->value, p->grad) < 1e-7);
  }
}

TEST_CASE("w4a8: activation bits outside 4..8 are refused, naming the layer") {
  auto layer = nn::make_linear("model.layers.0.mlp.up_proj", random_f64(Shape{4, 4}, 8), lora(2, 2.f), 1, 0, DType::f64);
  CHECK(test::error_of([&] { layer->set_activation_bits(3); }) ==
        "model.layers.0.mlp.up_proj: activation bits must be 4..8, got 3");
  CHECK(test::error_of([&] { layer->set_activation_bits(16); }).find("got 16") != std::string::npos);
  CHECK(layer->activation_bits() == 0);
}
