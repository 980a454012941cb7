// QuantLinear over quantized bases (NF4, INT, dINT): the layer equals the same adapter over the dense
// dequantized weight; gradients through the dequantized base match finite differences; the inference GEMV
// path agrees with the training path; exact merging into zero points (QA-LoRA / QA-BLoRA) keeps the output
// with codes and scales unchanged; and every inexact merge request is refused with its reason.

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "qlora/autograd/gradcheck.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/quant.hpp"

using namespace qlora;
using nn::AdapterConfig;
using nn::AdapterKind;

namespace {

Tensor random_weight(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  return ops::randn(Shape{rows, cols}, seed, Device::cpu(), 0.f, 0.05f);
}

AdapterConfig preset(AdapterKind kind, int rank = 4) {
  AdapterConfig cfg;
  cfg.kind = kind;
  cfg.rank = rank;
  cfg.alpha = 8.f;
  return cfg;
}

void randomize_params(nn::Linear& layer, std::uint64_t seed, DType dtype) {
  for (autograd::Param* p : layer.params())
    p->value.copy_from(ops::randn(p->value.shape(), seed++, Device::cpu(), 0.f, 0.1f).to(dtype));
}

void copy_params(nn::Linear& from, nn::Linear& to) {
  auto a = from.params(), b = to.params();
  REQUIRE(a.size() == b.size());
  for (std::size_t i = 0; i < a.size(); ++i) b[i]->value.copy_from(a[i]->value);
}

std::vector<std::uint8_t> bytes_of(const Tensor& t) {
  std::vector<std::uint8_t> bytes(t.nbytes());
  std::memcpy(bytes.data(), t.data(), bytes.size());
  return bytes;
}

const char* const kFormats[] = {"nf4", "nf4-nodq", "int4-g16", "int3-g32", "int2-g16-sym", "dint4-g16"};

}  // namespace

TEST_CASE("quantized base: the layer equals the same adapter on the dequantized dense weight") {
  const std::int64_t n = 6, d_out = 32, d_in = 64;
  for (const char* format : kFormats) {
    for (AdapterKind kind : {AdapterKind::lora, AdapterKind::qblora, AdapterKind::qalora, AdapterKind::hira}) {
      CAPTURE(std::string(format));
      CAPTURE(nn::adapter_kind_name(kind));
      const quant::QuantizedTensor q = quant::quantize(random_weight(d_out, d_in, 1), quant::QuantConfig::parse(format));
      const Tensor w_hat = quant::dequantize(q, DType::f32);
      auto quantized = nn::make_linear("q", q, preset(kind), 5, 0);
      // A dense layer with the pooling the quantized one resolved (qalora's p = the quantization group).
      AdapterConfig dense_cfg = preset(kind);
      dense_cfg.pool = int(quantized->adapter_shape().pool);
      auto dense = nn::make_linear("d", w_hat, dense_cfg, 5, 0);
      randomize_params(*quantized, 10, DType::f32);
      copy_params(*quantized, *dense);
      nn::Context ctx;
      const Tensor x = ops::randn(Shape{n, d_in}, 2);
      const auto y_q = quantized->forward(ctx, x).to_vector<float>(), y_d = dense->forward(ctx, x).to_vector<float>();
      CHECK(autograd::relative_error(std::vector<double>(y_q.begin(), y_q.end()),
                                     std::vector<double>(y_d.begin(), y_d.end())) == 0.0);
      const Tensor dy = ops::randn(Shape{n, d_out}, 3);
      const auto dx_q = quantized->backward(ctx, dy).to_vector<float>(), dx_d = dense->backward(ctx, dy).to_vector<float>();
      CHECK(dx_q == dx_d);
      CHECK(quantized->params()[0]->grad.to_vector<float>() == dense->params()[0]->grad.to_vector<float>());
      CHECK(quantized->base_bytes() < dense->base_bytes() / 4);
    }
  }
}

TEST_CASE("quantized base: float64 finite differences for x and the adapter through a dequantized base") {
  const std::int64_t n = 2, d_out = 16, d_in = 64;
  for (const char* format : {"nf4", "int4-g16", "dint4-g16"}) {
    CAPTURE(std::string(format));
    auto layer = nn::make_linear("q", quant::quantize(random_weight(d_out, d_in, 4), quant::QuantConfig::parse(format)),
                                 preset(AdapterKind::qablora), 6, 1, DType::f64);
    randomize_params(*layer, 20, DType::f64);
    Tensor x = ops::randn(Shape{n, d_in}, 7).to(DType::f64);
    const Tensor c = ops::randn(Shape{n, d_out}, 8).to(DType::f64);
    nn::Context ctx;
    auto loss = [&] { return autograd::dot(layer->forward(ctx, x).to_vector<double>(), c.to_vector<double>()); };
    loss();
    const Tensor dx = layer->backward(ctx, c);
    CHECK(autograd::gradient_error(loss, x, dx) < 1e-7);
    for (autograd::Param* p : layer->params()) CHECK(autograd::gradient_error(loss, p->value, p->grad) < 1e-7);
  }
}

TEST_CASE("quantized base: the inference GEMV path agrees with dequantize-then-GEMM") {
  auto layer = nn::make_linear("q", quant::quantize(random_weight(48, 64, 9), quant::QuantConfig::parse("int4-g16")),
                               preset(AdapterKind::qalora), 3, 0);
  randomize_params(*layer, 30, DType::f32);
  const Tensor x = ops::randn(Shape{4, 64}, 10);
  nn::Context train, infer;
  infer.training = false;
  const auto y_train = layer->forward(train, x).to_vector<float>(), y_infer = layer->forward(infer, x).to_vector<float>();
  CHECK(autograd::relative_error(std::vector<double>(y_infer.begin(), y_infer.end()),
                                 std::vector<double>(y_train.begin(), y_train.end())) < 1e-6);
  // Inference saves nothing, so there is no backward after it.
  CHECK_THROWS_WITH_AS(layer->backward(infer, ops::randn(Shape{4, 48}, 11)), doctest::Contains("without a saved forward"),
                       Error);
}

TEST_CASE("quantized base: QA adapters merge exactly into the zero points, codes and scales unchanged") {
  // methods/qblora.md: merged == unmerged for p = g and p = 2g (f32 tolerance), codes untouched.
  const std::int64_t d_out = 32, d_in = 128, g = 16;
  for (const int pool : {16, 32}) {
    for (AdapterKind kind : {AdapterKind::qalora, AdapterKind::qablora, AdapterKind::hira}) {
      for (const char* format : {"int4-g16", "int2-g16", "int4-g16-fz"}) {
        CAPTURE(pool);
        CAPTURE(nn::adapter_kind_name(kind));
        CAPTURE(std::string(format));
        AdapterConfig cfg = preset(kind);
        cfg.pool = pool;
        auto layer = nn::make_linear("q", quant::quantize(random_weight(d_out, d_in, 12), quant::QuantConfig::parse(format)),
                                     cfg, 4, 0);
        REQUIRE(layer->adapter_shape().pool % g == 0);
        randomize_params(*layer, 40, DType::f32);
        auto& base = dynamic_cast<nn::QuantLinear<nn::IntGroupBase, nn::LowRank>*>(layer.get())
                         ? dynamic_cast<nn::QuantLinear<nn::IntGroupBase, nn::LowRank>*>(layer.get())->base().quantized()
                         : dynamic_cast<nn::QuantLinear<nn::IntGroupBase, nn::FullPooled>&>(*layer).base().quantized();
        const auto codes_before = bytes_of(base.codes), scales_before = bytes_of(base.scales);
        nn::Context ctx;
        const Tensor x = ops::randn(Shape{5, d_in}, 13);
        const auto before = layer->forward(ctx, x).to_vector<float>();
        layer->merge();
        const auto after = layer->forward(ctx, x).to_vector<float>();
        CHECK(autograd::relative_error(std::vector<double>(after.begin(), after.end()),
                                       std::vector<double>(before.begin(), before.end())) < 1e-6);
        CHECK(bytes_of(base.codes) == codes_before);
        CHECK(bytes_of(base.scales) == scales_before);
        CHECK(base.config.float_zeros);
        CHECK(base.zeros.dtype() == DType::f32);
      }
    }
  }
}

TEST_CASE("quantized base: inexact merge requests are refused with the reason") {
  const Tensor w = random_weight(32, 64, 14);
  auto merge_error = [&](const char* format, AdapterKind kind) -> std::string {
    auto layer = nn::make_linear("q", quant::quantize(w, quant::QuantConfig::parse(format)), preset(kind), 1, 0);
    try {
      layer->merge();
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  CHECK(merge_error("nf4", AdapterKind::qalora).find("NF4 base") != std::string::npos);
  CHECK(merge_error("int4-g16", AdapterKind::qblora).find("p = 2") != std::string::npos);
  CHECK(merge_error("int4-g16", AdapterKind::lora).find("not a multiple of the group") != std::string::npos);
  CHECK(merge_error("dint4-g16", AdapterKind::qalora).find("half-step") != std::string::npos);
  CHECK(merge_error("int4-g16-sym", AdapterKind::qalora).find("symmetric") != std::string::npos);
  // The exact case succeeds, and any adapter still merges into a dense copy.
  CHECK(merge_error("int4-g16", AdapterKind::qalora).empty());
  auto layer = nn::make_linear("q", quant::quantize(w, quant::QuantConfig::parse("nf4")), preset(AdapterKind::qblora), 1, 0);
  CHECK(layer->merged_weight().shape() == Shape{32, 64});
}
