// CUDA dequantization and fused GEMV of the quantized formats (cuda/quant/*.cu) against their CPU twins,
// through the Tensor-level API (quant::dequantize, quant::dequantize_rows_into, quant::gemv): quantize on
// the CPU, move the QuantizedTensor to the device, compare. Dequantization is bit-exact in f32 and equal to
// the CPU's f32 value rounded once in bf16; the GEMV sums in another order than the twin and is compared by
// relative error (1e-5: f32 accumulation on both sides, inputs identical).

#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "qlora/core/half.hpp"
#include "qlora/quant/quant.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {

const Device gpu = Device::cuda(0);
constexpr double kGemvTolerance = 1e-5;

// Weight-like values (normal, sigma 0.02) with a few outliers, so groups have distinct ranges; never zero.
Tensor random_weight(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, 0.02);
  std::vector<float> w(std::size_t(rows * cols));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = float(dist(gen)) * (i % 97 == 5 ? 8.f : 1.f);
  return Tensor::from(w, Shape{rows, cols});
}

// Every scheme, bit width and zero type, with groups 32, 64 and 0 (one group per row).
std::vector<std::string> all_formats() {
  std::vector<std::string> names = {"nf4", "nf4-nodq", "nf4-g32", "nf4-g0-nodq", "nf4-g0"};
  for (const char* g : {"-g32", "-g64", "-g0"}) {
    for (int bits : {2, 3, 4, 8}) {
      const std::string base = "int" + std::to_string(bits) + g;
      names.push_back(base);
      names.push_back(base + "-sym");
      names.push_back(base + "-fz");
    }
    for (int bits : {3, 4}) {
      names.push_back("dint" + std::to_string(bits) + g);
      names.push_back("dint" + std::to_string(bits) + g + "-fz");
    }
  }
  return names;
}

}  // namespace

TEST_CASE("cuda quant: dequantization is bit-exact with the CPU twin in f32 and rounds once to bf16") {
  // 172 columns: a shorter last group for g32 (12) and g64 (44), f32 rows 16-byte aligned, bf16 rows not
  // (element stores); 256: every store vectorised; 7: a row shorter than one group and one code unit.
  const std::int64_t shapes[][2] = {{37, 172}, {24, 256}, {5, 7}};
  for (const std::string& name : all_formats()) {
    const quant::QuantConfig cfg = quant::QuantConfig::parse(name);
    for (const auto& shape : shapes) {
      const std::int64_t rows = shape[0], cols = shape[1];
      CAPTURE(name);
      CAPTURE(cols);
      const quant::QuantizedTensor q = quant::quantize(random_weight(rows, cols, 7 + std::uint64_t(cols)), cfg);
      const quant::QuantizedTensor qg = q.to(gpu);
      const std::vector<float> want = quant::dequantize(q).to_vector<float>();
      REQUIRE(test::rel_error(want, std::vector<float>(want.size(), 0.f)) > 0);  // not an all-zero weight

      CHECK(quant::dequantize(qg, DType::f32).to(Device::cpu()).to_vector<float>() == want);

      std::vector<float> want_bf16(want.size());
      for (std::size_t i = 0; i < want.size(); ++i) want_bf16[i] = to_float(to_bf16(want[i]));
      CHECK(quant::dequantize(qg, DType::bf16).to(Device::cpu()).to(DType::f32).to_vector<float>() == want_bf16);

      // A row range into a workspace (the operator layer's tile-by-tile path).
      const std::int64_t begin = rows / 3, end = rows - 1;
      Tensor tile = Tensor::empty(Shape{end - begin, cols}, DType::f32, gpu);
      quant::dequantize_rows_into(qg, begin, end, tile);
      const std::vector<float> want_tile(want.begin() + begin * cols, want.begin() + end * cols);
      CHECK(tile.to(Device::cpu()).to_vector<float>() == want_tile);
    }
  }
}

TEST_CASE("cuda quant: fused GEMV at batch 1, 4 and 16 matches the CPU twin (relative error 1e-5)") {
  // 3000 columns: several x tiles at batch 16 with a partial last one; 40 rows: a partial block of 16 rows.
  const std::int64_t shapes[][2] = {{40, 3000}, {37, 172}};
  for (const std::string& name : all_formats()) {
    const quant::QuantConfig cfg = quant::QuantConfig::parse(name);
    for (const auto& shape : shapes) {
      const std::int64_t rows = shape[0], cols = shape[1];
      const quant::QuantizedTensor q = quant::quantize(random_weight(rows, cols, 11 + std::uint64_t(cols)), cfg);
      const quant::QuantizedTensor qg = q.to(gpu);
      for (const std::int64_t batch : {1, 4, 16}) {
        CAPTURE(name);
        CAPTURE(cols);
        CAPTURE(batch);
        // x exactly representable in bf16, so the f32 and bf16 inputs carry the same values.
        std::vector<float> xv = test::random_vector<float>(std::size_t(batch * cols), 100 + std::uint64_t(batch));
        for (float& v : xv) v = to_float(to_bf16(v));
        const Tensor x = Tensor::from(xv, Shape{batch, cols});
        const std::vector<float> want = quant::gemv(q, x).to_vector<float>();

        const Tensor y32 = quant::gemv(qg, x.to(gpu));
        CHECK(y32.dtype() == DType::f32);
        CHECK(y32.shape() == Shape({batch, rows}));
        CHECK(test::rel_error(y32.to(Device::cpu()).to_vector<float>(), want) < kGemvTolerance);

        const Tensor y16 = quant::gemv(qg, x.to(gpu).to(DType::bf16));
        CHECK(test::rel_error(y16.to(Device::cpu()).to_vector<float>(), want) < kGemvTolerance);
      }
    }
  }
}

TEST_CASE("cuda quant: a one-dimensional x gives a one-dimensional y") {
  const quant::QuantizedTensor q = quant::quantize(random_weight(20, 128, 3), quant::QuantConfig::parse("int4-g64"));
  const Tensor x = Tensor::from(test::random_vector<float>(128, 4), Shape{128});
  const Tensor y = quant::gemv(q.to(gpu), x.to(gpu));
  CHECK(y.shape() == Shape({20}));
  CHECK(test::rel_error(y.to(Device::cpu()).to_vector<float>(), quant::gemv(q, x).to_vector<float>()) < kGemvTolerance);
}
