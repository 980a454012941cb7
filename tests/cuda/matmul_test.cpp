// CUDA matmul (cuBLASLt) against the CPU twin (Eigen): every transpose combination, odd and aligned shapes,
// strided batches with a broadcast operand, beta = 0 (C never read: poisoned with NaN) and beta != 0,
// k = 0, a misaligned view, and the four type combinations (f32 or bf16 inputs, f32 or bf16 output).

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/matmul.hpp"
#include "qlora/cuda/matmul.hpp"

using qlora::bf16;
using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

struct MatmulCase {
  std::int64_t m, n, k, batch;
  bool broadcast_a, broadcast_b;  // stride 0: one matrix for the whole batch
};

const MatmulCase kCases[] = {
    {33, 17, 9, 1, false, false},     // odd sizes: no vector-aligned rows
    {64, 128, 256, 1, false, false},  // aligned
    {31, 40, 24, 3, false, false},    // strided batch
    {16, 24, 40, 4, true, false},     // A broadcast (a shared activation)
    {24, 16, 40, 4, false, true},     // B broadcast (a weight shared by the batch)
};

// Tolerance by output type and input type: f32 inputs use full f32 (no TF32), so f32 ~1e-5; bf16 inputs are
// multiplied exactly and summed in f32, but tensor-core summation order differs from Eigen's: 1e-4 for an f32
// output; a bf16 output adds its rounding, 1e-2.
template <class TA, class TC>
constexpr double matmul_tolerance = std::is_same_v<TC, bf16> ? 1e-2 : std::is_same_v<TA, bf16> ? 1e-4 : 1e-5;

template <class TA, class TC>
void check_matmul(const MatmulCase& mc, bool trans_a, bool trans_b, float beta, std::uint64_t seed,
                  std::int64_t view_offset = 0) {
  CAPTURE(qlora::test::type_name<TA>());
  CAPTURE(qlora::test::type_name<TC>());
  CAPTURE(mc.m);
  CAPTURE(mc.n);
  CAPTURE(mc.k);
  CAPTURE(mc.batch);
  CAPTURE(trans_a);
  CAPTURE(trans_b);
  CAPTURE(beta);
  CAPTURE(view_offset);
  const std::int64_t stride_a = mc.broadcast_a ? 0 : mc.m * mc.k;
  const std::int64_t stride_b = mc.broadcast_b ? 0 : mc.k * mc.n;
  const std::int64_t stride_c = mc.m * mc.n;
  const std::int64_t size_a = view_offset + (mc.broadcast_a ? 1 : mc.batch) * mc.m * mc.k;
  const std::int64_t size_b = (mc.broadcast_b ? 1 : mc.batch) * mc.k * mc.n;
  const std::int64_t size_c = mc.batch * mc.m * mc.n;
  const float alpha = 0.75f;

  const auto a = random_exact<TA>(size_a, seed);
  const auto b = random_exact<TA>(size_b, seed + 1);
  const auto c_start = random_exact<TC>(size_c, seed + 2);
  std::vector<float> expected = c_start;
  qlora::cpu::matmul(a.data() + view_offset, b.data(), expected.data(), mc.m, mc.n, mc.k, trans_a, trans_b, alpha,
                     beta, mc.batch, stride_a, stride_b, stride_c);

  DeviceBuffer<TA> a_dev(to_storage<TA>(a)), b_dev(to_storage<TA>(b));
  DeviceBuffer<TC> c_dev(to_storage<TC>(c_start));
  if (beta == 0.0f) c_dev.poison();  // BLAS semantics: C is not read
  qlora::cuda::matmul(a_dev.data() + view_offset, b_dev.data(), c_dev.data(), mc.m, mc.n, mc.k, trans_a, trans_b,
                      alpha, beta, mc.batch, stride_a, stride_b, stride_c, nullptr);
  CHECK(rel_error(to_floats(c_dev.download()), expected) < matmul_tolerance<TA, TC>);
}

template <class TA, class TC>
void check_all_cases() {
  std::uint64_t seed = 200;
  for (const auto& mc : kCases) {
    for (const bool trans_a : {false, true}) {
      for (const bool trans_b : {false, true}) {
        for (const float beta : {0.0f, 0.5f}) check_matmul<TA, TC>(mc, trans_a, trans_b, beta, seed += 3);
      }
    }
  }
}

}  // namespace

TEST_CASE("cuda matmul: f32 x f32 -> f32 matches the CPU twin") { check_all_cases<float, float>(); }

TEST_CASE("cuda matmul: f32 x f32 -> bf16 matches the CPU twin") { check_all_cases<float, bf16>(); }

TEST_CASE("cuda matmul: bf16 x bf16 -> bf16 matches the CPU twin") { check_all_cases<bf16, bf16>(); }

TEST_CASE("cuda matmul: bf16 x bf16 -> f32 matches the CPU twin") { check_all_cases<bf16, float>(); }

TEST_CASE("cuda matmul: a view one element past an aligned address") {
  const MatmulCase mc{40, 24, 32, 1, false, false};
  check_matmul<float, float>(mc, false, true, 0.0f, 300, 1);
  check_matmul<bf16, bf16>(mc, false, true, 0.0f, 301, 1);
}

TEST_CASE("cuda matmul: k = 0 leaves beta C") {
  for (const float beta : {0.0f, 0.5f}) check_matmul<float, float>({5, 7, 0, 2, false, false}, false, false, beta, 310);
  check_matmul<bf16, bf16>({5, 7, 0, 2, false, false}, true, true, 0.5f, 311);
}
