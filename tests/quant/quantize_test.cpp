// The Tensor-level API: quantize, dequantize, dequantize_rows_into, gemv, for every scheme, including
// rows that the group size does not divide (the 172-wide rows of ../shared/data's stories260K model).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "qlora/quant/quant.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

using qlora::DType;
using qlora::Error;
using qlora::test::error_of;
using qlora::Tensor;
using qlora::quant::QuantConfig;
using qlora::quant::Scheme;

namespace {

const char* const kAllFormats[] = {"nf4",       "nf4-nodq",     "int2-g{}",    "int3-g{}",    "int4-g{}",
                                   "int8-g{}",  "int4-g{}-sym", "int3-g{}-sym", "int4-g{}-fz", "int3-g{}-mse",
                                   "dint4-g{}", "dint3-g{}",    "dint4-g{}-fz", "dint4-g{}-mse"};

// The format name with group g ("nf4" takes -gG too).
std::string with_group(std::string name, int g) {
  const auto pos = name.find("-g{}");
  if (pos != std::string::npos) return name.replace(pos, 4, "-g" + std::to_string(g));
  return name.starts_with("nf4-nodq") ? "nf4-g" + std::to_string(g) + "-nodq" : name + "-g" + std::to_string(g);
}

using qlora::test::gaussian;

}  // namespace

TEST_CASE("quant quantize: 172-wide rows get a shorter last group, for every scheme") {
  const std::int64_t rows = 5, cols = 172;
  const auto w = gaussian(std::size_t(rows * cols), 31);
  const Tensor wt = Tensor::from(w, {rows, cols});
  for (int g : {64, 32}) {
    for (const char* pattern : kAllFormats) {
      const std::string name = with_group(pattern, g);
      CAPTURE(name);
      const QuantConfig cfg = QuantConfig::parse(name);
      const auto q = qlora::quant::quantize(wt, cfg);
      CHECK(q.groups_per_row() == (g == 64 ? 3 : 6));  // 64+64+44, 5*32+12
      const auto w_hat = qlora::quant::dequantize(q).to_vector<float>();
      // Groups never straddle rows: each group quantized alone as a one-row matrix gives the same values.
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t begin = 0; begin < cols; begin += g) {
          const std::int64_t n = std::min<std::int64_t>(g, cols - begin);
          std::vector<float> part(w.begin() + r * cols + begin, w.begin() + r * cols + begin + n);
          QuantConfig alone = cfg;
          alone.group = 0;
          if (cfg.scheme == Scheme::nf4 && cfg.double_quant) alone.double_quant = false;  // DQ mixes groups
          const auto qa = qlora::quant::quantize(Tensor::from(part, {1, n}), alone);
          const auto part_hat = qlora::quant::dequantize(qa).to_vector<float>();
          for (std::int64_t j = 0; j < n; ++j) {
            if (cfg.scheme == Scheme::nf4 && cfg.double_quant)
              REQUIRE(std::fabs(w_hat[std::size_t(r * cols + begin + j)] - part_hat[std::size_t(j)]) <=
                      1e-2 * std::fabs(part_hat[std::size_t(j)]) + 1e-9);
            else
              REQUIRE(w_hat[std::size_t(r * cols + begin + j)] == part_hat[std::size_t(j)]);
          }
        }
      }
      // Overall quality: relative error well below one quantization step of the range.
      const double bits = cfg.bits;
      CHECK(qlora::test::rel_error(w_hat, w) < 2.5 * std::pow(2.0, -bits + 1));
    }
  }
}

TEST_CASE("quant quantize: the last, shorter INT group has the scale of its own range") {
  const std::int64_t cols = 172;
  auto w = qlora::test::random_vector<float>(std::size_t(cols), 32, -0.5, 0.5);
  w[170] = 2.f;  // only the last group (columns 128..171) sees the large value
  const auto q = qlora::quant::quantize(Tensor::from(w, {1, cols}), QuantConfig::parse("int4-g64"));
  const auto scales = q.scales.to_vector<qlora::f16>();
  const float lo = std::min(0.f, *std::min_element(w.begin() + 128, w.end()));
  const float expected = qlora::to_float(qlora::to_f16((2.f - lo) / 15.f));  // GPTQ: (hi - lo) / qmax
  CHECK(qlora::to_float(scales[2]) == expected);
  CHECK(qlora::to_float(scales[0]) < 0.5f / 7);  // the first groups keep their small range
}

TEST_CASE("quant quantize: float zeros dequantize exactly like integer zeros") {
  const auto w = gaussian(8 * 172, 33);
  const Tensor wt = Tensor::from(w, {8, 172});
  for (const char* name : {"int4-g64", "int3-g32", "dint4-g64", "int2-g0-mse"}) {
    CAPTURE(std::string(name));
    const auto qi = qlora::quant::quantize(wt, QuantConfig::parse(name));
    const auto qf = qlora::quant::quantize(wt, QuantConfig::parse(std::string(name) + "-fz"));
    CHECK(qf.zeros.dtype() == DType::f32);
    CHECK(qi.zeros.dtype() == DType::u8);
    CHECK(qlora::quant::dequantize(qf).to_vector<float>() == qlora::quant::dequantize(qi).to_vector<float>());
    CHECK(qf.codes.to_vector<std::uint8_t>() == qi.codes.to_vector<std::uint8_t>());
  }
}

TEST_CASE("quant quantize: f64 input is quantized as its f32 rounding") {
  const auto w64 = qlora::test::random_vector<double>(6 * 100, 34, -0.1, 0.1);
  std::vector<float> w32(w64.begin(), w64.end());
  for (const char* name : {"nf4", "int4-g32", "dint3-g0", "int8-g64-sym"}) {
    CAPTURE(std::string(name));
    const auto a = qlora::quant::quantize(Tensor::from(w64, {6, 100}), QuantConfig::parse(name));
    const auto b = qlora::quant::quantize(Tensor::from(w32, {6, 100}), QuantConfig::parse(name));
    CHECK(a.codes.to_vector<std::uint8_t>() == b.codes.to_vector<std::uint8_t>());
    CHECK(qlora::quant::dequantize(a).to_vector<float>() == qlora::quant::dequantize(b).to_vector<float>());
  }
}

TEST_CASE("quant quantize: NaN, Inf and bad tensors are refused with a clear message") {
  auto w = qlora::test::random_vector<float>(5 * 64, 35);
  w[3 * 64 + 17] = NAN;
  std::string msg = error_of([&] { qlora::quant::quantize(Tensor::from(w, {5, 64}), QuantConfig{}); });
  CHECK(msg.find("row 3") != std::string::npos);
  CHECK(msg.find("NaN") != std::string::npos);
  w[3 * 64 + 17] = 0.f;
  w[4 * 64] = -INFINITY;
  msg = error_of([&] { qlora::quant::quantize(Tensor::from(w, {5, 64}), QuantConfig::parse("int4-g64")); });
  CHECK(msg.find("row 4") != std::string::npos);
  auto w64 = qlora::test::random_vector<double>(4 * 32, 36);
  w64[2 * 32 + 1] = NAN;
  msg = error_of([&] { qlora::quant::quantize(Tensor::from(w64, {4, 32}), QuantConfig::parse("dint4-g32")); });
  CHECK(msg.find("row 2") != std::string::npos);
  w64[2 * 32 + 1] = 1e300;  // finite in f64, infinite in f32
  msg = error_of([&] { qlora::quant::quantize(Tensor::from(w64, {4, 32}), QuantConfig::parse("dint4-g32")); });
  CHECK(msg.find("row 2") != std::string::npos);
  // Too large for f16 group scales (|w| >= 32752 * qmax).
  std::vector<float> huge(64, 0.1f);
  huge[5] = 1e6f;
  msg = error_of([&] { qlora::quant::quantize(Tensor::from(huge, {1, 64}), QuantConfig::parse("int4-g64")); });
  CHECK(msg.find("f16") != std::string::npos);
  CHECK_NOTHROW(qlora::quant::quantize(Tensor::from(huge, {1, 64}), QuantConfig::parse("nf4")));

  const Tensor ok = Tensor::from(qlora::test::random_vector<float>(64, 37), {64});
  CHECK(error_of([&] { qlora::quant::quantize(ok, QuantConfig{}); }).find("2-D") != std::string::npos);
  CHECK_THROWS_AS(qlora::quant::quantize(Tensor::zeros({4, 4}, DType::bf16), QuantConfig{}), Error);
  CHECK_THROWS_AS(qlora::quant::quantize(Tensor::zeros({0, 4}), QuantConfig{}), Error);
  CHECK_THROWS_AS(qlora::quant::quantize(Tensor(), QuantConfig{}), Error);
  CHECK_THROWS_AS(qlora::quant::quantize(Tensor::zeros({4, 64}), QuantConfig{Scheme::int_asym, 5, 64, false}), Error);
}

TEST_CASE("quant dequantize: row ranges and output dtypes agree with the whole f32 dequantization") {
  const std::int64_t rows = 7, cols = 172;
  const auto w = gaussian(std::size_t(rows * cols), 38);
  for (const char* name : {"nf4", "nf4-nodq", "int3-g64", "int4-g32-sym", "dint4-g64-fz", "int8-g0"}) {
    CAPTURE(std::string(name));
    const auto q = qlora::quant::quantize(Tensor::from(w, {rows, cols}), QuantConfig::parse(name));
    const auto full = qlora::quant::dequantize(q).to_vector<float>();
    Tensor part = Tensor::empty({3, cols});
    qlora::quant::dequantize_rows_into(q, 2, 5, part);
    CHECK(part.to_vector<float>() == std::vector<float>(full.begin() + 2 * cols, full.begin() + 5 * cols));
    const auto f64 = qlora::quant::dequantize(q, DType::f64).to_vector<double>();
    const auto bf16 = qlora::quant::dequantize(q, DType::bf16).to_vector<qlora::bf16>();
    for (std::size_t i = 0; i < full.size(); ++i) {
      REQUIRE(f64[i] == double(full[i]));
      REQUIRE(bf16[i].bits == qlora::to_bf16(full[i]).bits);
    }
    Tensor empty = Tensor::empty({0, cols});
    CHECK_NOTHROW(qlora::quant::dequantize_rows_into(q, 4, 4, empty));
    Tensor wrong = Tensor::empty({2, cols});
    CHECK_THROWS_AS(qlora::quant::dequantize_rows_into(q, 2, 5, wrong), Error);
    CHECK_THROWS_AS(qlora::quant::dequantize_rows_into(q, 6, 8, wrong), Error);
    Tensor ints = Tensor::empty({3, cols}, DType::i32);
    CHECK_THROWS_AS(qlora::quant::dequantize_rows_into(q, 2, 5, ints), Error);
  }
}

TEST_CASE("quant gemv: equals x * dequantize(W)^T computed in f64") {
  // Tolerance: f32 accumulation over <= 512 terms of per-group partial sums: relative error 1e-5.
  for (std::int64_t cols : {172, 512}) {
    const std::int64_t rows = 37;
    const auto w = gaussian(std::size_t(rows * cols), 39);
    for (const char* pattern : kAllFormats) {
      const std::string name = with_group(pattern, 64);
      CAPTURE(name);
      const auto q = qlora::quant::quantize(Tensor::from(w, {rows, cols}), QuantConfig::parse(name));
      const auto w_hat = qlora::quant::dequantize(q).to_vector<float>();
      for (std::int64_t batch : {1, 4, 16}) {
        const auto x = qlora::test::random_vector<float>(std::size_t(batch * cols), 40 + std::uint64_t(batch));
        std::vector<double> expected(std::size_t(batch * rows), 0.0);
        for (std::int64_t b = 0; b < batch; ++b)
          for (std::int64_t r = 0; r < rows; ++r)
            for (std::int64_t j = 0; j < cols; ++j)
              expected[std::size_t(b * rows + r)] += double(x[std::size_t(b * cols + j)]) * double(w_hat[std::size_t(r * cols + j)]);
        const Tensor y = qlora::quant::gemv(q, Tensor::from(x, {batch, cols}));
        CHECK(y.shape() == qlora::Shape{batch, rows});
        CHECK(qlora::test::rel_error(y.to_vector<float>(), expected) < 1e-5);
        // The f64 path: exact up to double rounding for INT/dINT, whose f32 dequantized values scale * (code -
        // zero) are exact products; NF4 multiplies c once per group instead of rounding each NF4[k] * c to f32.
        std::vector<double> x64(x.begin(), x.end());
        const Tensor y64 = qlora::quant::gemv(q, Tensor::from(x64, {batch, cols}));
        CHECK(qlora::test::rel_error(y64.to_vector<double>(), expected) < (q.config.scheme == Scheme::nf4 ? 1e-6 : 1e-12));
      }
      // A rank-1 x gives a rank-1 y.
      const auto x1 = qlora::test::random_vector<float>(std::size_t(cols), 41);
      const Tensor y1 = qlora::quant::gemv(q, Tensor::from(x1, {cols}));
      CHECK(y1.shape() == qlora::Shape{rows});
      CHECK(y1.to_vector<float>() == qlora::quant::gemv(q, Tensor::from(x1, {1, cols})).to_vector<float>());
    }
  }
}

TEST_CASE("quant gemv: refuses a wrong shape, a batch over 16 and a non-float x") {
  const auto q = qlora::quant::quantize(Tensor::from(gaussian(4 * 64, 42), {4, 64}), QuantConfig{});
  CHECK(error_of([&] { qlora::quant::gemv(q, Tensor::zeros({2, 63})); }).find("[batch, 64]") != std::string::npos);
  CHECK(error_of([&] { qlora::quant::gemv(q, Tensor::zeros({17, 64})); }).find("batch 17") != std::string::npos);
  CHECK_THROWS_AS(qlora::quant::gemv(q, Tensor::zeros({2, 64}, DType::bf16)), Error);
  CHECK_THROWS_AS(qlora::quant::gemv(q, Tensor::zeros({2, 2, 64})), Error);
}
