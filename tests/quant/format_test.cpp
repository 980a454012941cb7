#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "qlora/quant/quant.hpp"
#include "support/random.hpp"

using qlora::Error;
using qlora::Tensor;
using qlora::quant::bits_per_weight;
using qlora::quant::QuantConfig;
using qlora::quant::Scheme;

TEST_CASE("quant format: parse and name are inverse") {
  for (const char* name : {"nf4", "nf4-nodq", "nf4-g128", "nf4-g0-nodq", "int4-g64", "int3-g128", "int2-g0",
                           "int8-g32", "int4-g64-sym", "int4-g128-fz", "int3-g64-mse", "int4-g64-sym-mse",
                           "int2-g32-fz-mse", "dint4-g128", "dint3-g64", "dint4-g0-fz-mse", "int4-g4096"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    CHECK(cfg.name() == name);
    CHECK(QuantConfig::parse(cfg.name()) == cfg);
  }
  // Suffixes in another order parse to the same config; name() writes the canonical order.
  CHECK(QuantConfig::parse("int4-sym-g64") == QuantConfig::parse("int4-g64-sym"));
  CHECK(QuantConfig::parse("int4-mse-g64-fz").name() == "int4-g64-fz-mse");
}

TEST_CASE("quant format: parse gives the documented fields") {
  const QuantConfig nf4 = QuantConfig::parse("nf4");
  CHECK(nf4.scheme == Scheme::nf4);
  CHECK(nf4.bits == 4);
  CHECK(nf4.group == 64);
  CHECK(nf4.double_quant);
  CHECK(nf4 == QuantConfig{});  // the default config is QLoRA's NF4 + DQ, block 64
  CHECK_FALSE(QuantConfig::parse("nf4-nodq").double_quant);
  const QuantConfig i3 = QuantConfig::parse("int3-g128");
  CHECK(i3.scheme == Scheme::int_asym);
  CHECK(i3.bits == 3);
  CHECK(i3.group == 128);
  CHECK_FALSE(i3.double_quant);
  CHECK_FALSE(i3.float_zeros);
  CHECK_FALSE(i3.mse_search);
  CHECK(QuantConfig::parse("int2-g0").group == 0);
  CHECK(QuantConfig::parse("int4-g64-sym").scheme == Scheme::int_sym);
  const QuantConfig d = QuantConfig::parse("dint4-g128-fz-mse");
  CHECK(d.scheme == Scheme::dint);
  CHECK(d.float_zeros);
  CHECK(d.mse_search);
}

TEST_CASE("quant format: parse refuses anything else") {
  for (const char* name : {"", "nf3", "nf4-sym", "nf4-fz", "nf4-mse", "nf4-nodq-nodq", "int4", "int5-g64", "int1-g64",
                           "int16-g64", "int4-g48", "int4-g8", "int4-g8192", "int4-g-64", "int4-gx", "int4-g64-g64",
                           "int4-g64-sym-sym", "int4-g64-nodq", "int4-g64-sym-fz", "dint2-g64", "dint8-g64",
                           "dint4-g64-sym", "dint4", "int4-g64-", "int4-g64 ", "INT4-g64", "fp4", "int-g64",
                           "int4-g0064x"}) {
    CAPTURE(name);
    CHECK_THROWS_AS(QuantConfig::parse(name), Error);
  }
  try {
    QuantConfig::parse("int5-g64");
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("int5-g64") != std::string::npos);
  }
}

TEST_CASE("quant format: validate refuses unsupported bits and groups") {
  CHECK_NOTHROW(QuantConfig{}.validate());
  CHECK_THROWS_AS((QuantConfig{Scheme::nf4, 3, 64, true}.validate()), Error);
  CHECK_THROWS_AS((QuantConfig{Scheme::int_asym, 5, 64, false}.validate()), Error);
  CHECK_THROWS_AS((QuantConfig{Scheme::int_asym, 4, 100, false}.validate()), Error);
  CHECK_THROWS_AS((QuantConfig{Scheme::int_asym, 4, -64, false}.validate()), Error);
  CHECK_THROWS_AS((QuantConfig{Scheme::int_asym, 4, 64, true}.validate()), Error);  // DQ is NF4-only
  CHECK_THROWS_AS((QuantConfig{Scheme::dint, 2, 64, false}.validate()), Error);
  CHECK_THROWS_AS((QuantConfig{Scheme::int_sym, 4, 64, false, true}.validate()), Error);
  try {
    QuantConfig{Scheme::int_asym, 4, 100, false}.validate();
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("group size 100") != std::string::npos);
  }
}

TEST_CASE("quant format: bits per weight of a 4096 x 4096 matrix equal the formulas") {
  const std::int64_t n = 4096;
  // QLoRA's accounting (baselines.md section 2): 4 + 8/64 + 32/(64*256) ~= 4.127, plus our one f32 mean.
  const double nf4_dq = 4.0 + 8.0 / 64 + 32.0 / (64 * 256) + 32.0 / double(n * n);
  CHECK(bits_per_weight(QuantConfig::parse("nf4"), n, n) == doctest::Approx(nf4_dq).epsilon(1e-12));
  CHECK(bits_per_weight(QuantConfig::parse("nf4"), n, n) == doctest::Approx(4.127).epsilon(1e-3));
  CHECK(bits_per_weight(QuantConfig::parse("nf4-nodq"), n, n) == doctest::Approx(4.5).epsilon(1e-12));
  // INT with f16 scale and u8 zero: b + 16/g + 8/g; f32 zeros: b + 48/g; symmetric: b + 16/g.
  for (int bits : {2, 3, 4, 8}) {
    for (int g : {32, 64, 128, 0}) {
      CAPTURE(bits);
      CAPTURE(g);
      const double groups = g == 0 ? 1.0 / n : 1.0 / g;
      QuantConfig cfg{Scheme::int_asym, bits, g, false};
      CHECK(bits_per_weight(cfg, n, n) == doctest::Approx(bits + 24 * groups).epsilon(1e-12));
      cfg.float_zeros = true;
      CHECK(bits_per_weight(cfg, n, n) == doctest::Approx(bits + 48 * groups).epsilon(1e-12));
      cfg = QuantConfig{Scheme::int_sym, bits, g, false};
      CHECK(bits_per_weight(cfg, n, n) == doctest::Approx(bits + 16 * groups).epsilon(1e-12));
    }
  }
  CHECK(bits_per_weight(QuantConfig::parse("int4-g128"), n, n) == doctest::Approx(4.1875).epsilon(1e-12));
  CHECK(bits_per_weight(QuantConfig::parse("dint4-g128"), n, n) == doctest::Approx(4.1875).epsilon(1e-12));
  // Row padding counts: a 172-wide int4-g64 row holds 96 code bytes (86 used) and 3 groups of 3 bytes.
  CHECK(bits_per_weight(QuantConfig::parse("int4-g64"), 1, 172) == doctest::Approx((96 + 9) * 8.0 / 172).epsilon(1e-12));
  CHECK_THROWS_AS(bits_per_weight(QuantConfig::parse("int4-g64"), 0, 172), Error);
}

TEST_CASE("quant format: bits_per_weight equals the storage of a quantized tensor") {
  const std::int64_t rows = 9, cols = 172;
  const auto values = qlora::test::random_vector<float>(std::size_t(rows * cols), 11, -0.1, 0.1);
  const Tensor w = Tensor::from(values, {rows, cols});
  for (const char* name : {"nf4", "nf4-nodq", "nf4-g32", "int4-g64", "int3-g32", "int2-g0", "int8-g128",
                           "int4-g64-sym", "int4-g32-fz", "dint4-g64", "dint3-g32-fz"}) {
    CAPTURE(name);
    const QuantConfig cfg = QuantConfig::parse(name);
    const auto q = qlora::quant::quantize(w, cfg);
    CHECK(q.storage_bytes() * 8.0 / double(rows * cols) == doctest::Approx(bits_per_weight(cfg, rows, cols)).epsilon(1e-12));
  }
  // More than 256 block constants: several double-quantization blocks.
  const auto big = qlora::test::random_vector<float>(std::size_t(40 * 512), 12, -0.1, 0.1);
  const auto q = qlora::quant::quantize(Tensor::from(big, {40, 512}), QuantConfig{});
  CHECK(q.absmax_scales.numel() == 2);  // 40 * 8 = 320 constants
  CHECK(q.storage_bytes() * 8.0 / (40 * 512) == doctest::Approx(bits_per_weight(QuantConfig{}, 40, 512)).epsilon(1e-12));
}

TEST_CASE("quant format: check() names a member that does not match the config") {
  const auto values = qlora::test::random_vector<float>(4 * 64, 13);
  auto q = qlora::quant::quantize(Tensor::from(values, {4, 64}), QuantConfig::parse("int4-g32"));
  CHECK_NOTHROW(q.check());
  auto broken = q;
  broken.zeros = Tensor::zeros({4, 2}, qlora::DType::f32);  // f32 zeros but the config says u8
  try {
    broken.check();
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("'zeros'") != std::string::npos);
  }
  broken = q;
  broken.scales = Tensor::zeros({4, 3}, qlora::DType::f16);
  CHECK_THROWS_AS(qlora::quant::dequantize(broken), Error);
  broken = q;
  broken.codes = Tensor();
  CHECK_THROWS_AS(qlora::quant::gemv(broken, Tensor::zeros({1, 64})), Error);
}

TEST_CASE("quant format: to(cpu) keeps every member and the storage") {
  const auto values = qlora::test::random_vector<float>(3 * 80, 14);
  const auto q = qlora::quant::quantize(Tensor::from(values, {3, 80}), QuantConfig{});
  const auto moved = q.to(qlora::Device::cpu());
  CHECK(moved.device() == qlora::Device::cpu());
  CHECK(moved.storage_bytes() == q.storage_bytes());
  CHECK(moved.absmax_mean == q.absmax_mean);
  CHECK(qlora::quant::dequantize(moved).to_vector<float>() == qlora::quant::dequantize(q).to_vector<float>());
}
