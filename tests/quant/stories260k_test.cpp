// Quantization of a real checkpoint: the 172-wide FFN down projections (w2) of Karpathy's stories260K
// (../shared/data/models/stories260K/stories260K.bin, llama2.c legacy format; MANIFEST.md describes it).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "qlora/quant/quant.hpp"
#include "support/random.hpp"
#include "support/shared_data.hpp"

using qlora::Tensor;
using qlora::quant::QuantConfig;

namespace {

// The five layers' w2 [dim=64, hidden=172] stacked as [320, 172], read straight from the file: a 7 x int32
// header (64, 172, 5, 8, 4, 512, 512), then token embeddings [512, 64], rms_att [5, 64], wq [5, 64, 64],
// wk and wv [5, 32, 64], wo [5, 64, 64], rms_ffn [5, 64], w1 [5, 172, 64], w2 [5, 64, 172], ... (f32).
std::vector<float> read_w2() {
  std::ifstream in(qlora::test::kStories260K, std::ios::binary);
  REQUIRE(in.good());
  std::int32_t header[7];
  in.read(reinterpret_cast<char*>(header), sizeof header);
  REQUIRE(in.good());
  REQUIRE(header[0] == 64);
  REQUIRE(header[1] == 172);
  REQUIRE(header[2] == 5);
  const std::int64_t offset = 512 * 64 + 5 * 64 + 5 * 64 * 64 + 2 * 5 * 32 * 64 + 5 * 64 * 64 + 5 * 64 + 5 * 172 * 64;
  in.seekg(std::streamoff(sizeof header + offset * sizeof(float)));
  std::vector<float> w2(5 * 64 * 172);
  in.read(reinterpret_cast<char*>(w2.data()), std::streamsize(w2.size() * sizeof(float)));
  REQUIRE(in.good());
  return w2;
}

}  // namespace

TEST_CASE("quant stories260K: every format quantizes the real 172-wide w2 with the expected accuracy order") {
  if (!qlora::test::shared_file_present(qlora::test::kStories260K)) return;
  const std::vector<float> w2 = read_w2();
  const Tensor w = Tensor::from(w2, {320, 172});
  auto error_of = [&](const char* name) {
    const auto q = qlora::quant::quantize(w, QuantConfig::parse(name));
    const auto w_hat = qlora::quant::dequantize(q).to_vector<float>();
    for (float v : w_hat) REQUIRE(std::isfinite(v));
    return qlora::test::rel_error(w_hat, w2);
  };
  const double int8 = error_of("int8-g64"), int4 = error_of("int4-g64"), int3 = error_of("int3-g64"),
               int2 = error_of("int2-g64"), nf4 = error_of("nf4"), nf4_nodq = error_of("nf4-nodq"),
               int4_g32 = error_of("int4-g32"), int4_row = error_of("int4-g0"), dint4 = error_of("dint4-g64"),
               int3_mse = error_of("int3-g64-mse");
  MESSAGE("relative errors: int8 ", int8, ", int4 ", int4, ", int3 ", int3, ", int2 ", int2, ", nf4 ", nf4,
          ", nf4-nodq ", nf4_nodq, ", int4-g32 ", int4_g32, ", int4-g0 ", int4_row, ", dint4 ", dint4, ", int3-mse ",
          int3_mse);
  // Bounds have ~25% margin over the values printed above (int4 0.092, nf4 0.092, dint4 0.093, int2 0.46).
  // Each bit roughly halves the error (more at 8 bits); finer groups help; NF4 is a 4-bit format.
  CHECK(int8 < 0.01);
  CHECK(int8 < int4 / 8);
  CHECK(int4 < int3);
  CHECK(int3 < int2);
  CHECK(int4 < 0.12);
  CHECK(int2 < 0.6);
  CHECK(int4_g32 < int4);
  CHECK(int4 < int4_row);
  CHECK(nf4 < 0.12);
  CHECK(std::fabs(nf4 - nf4_nodq) < 0.1 * nf4_nodq);  // double quantization costs little
  CHECK(dint4 < 0.12);
  CHECK(int3_mse < int3);  // clipping the range helps at 3 bits (0.179 vs 0.197 when written)
}
