// CUDA embedding lookup and gradient against the CPU twin: repeated ids accumulate, out-of-range ids are skipped.

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/embedding.hpp"
#include "qlora/cuda/embedding.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

constexpr std::int64_t kVocab = 101, kDim = 300, kTokens = 257;

// Random ids with many repeats (kTokens > kVocab); with_invalid adds ids outside [0, vocab).
std::vector<std::int32_t> random_ids(std::uint64_t seed, bool with_invalid) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<std::int32_t> id(0, kVocab - 1);
  std::vector<std::int32_t> ids(kTokens);
  for (auto& i : ids) i = id(gen);
  if (with_invalid) {
    ids[3] = -1;
    ids[100] = kVocab;
    ids[kTokens - 1] = -100;
  }
  return ids;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda embedding: forward copies the rows the CPU twin copies", T, float, qlora::bf16) {
  const auto table = to_storage<T>(random_exact<T>(kVocab * kDim, 80));
  DeviceBuffer<T> table_dev(table);

  SUBCASE("valid ids: every output row is written") {
    const auto ids = random_ids(81, false);
    DeviceBuffer<std::int32_t> ids_dev(ids);
    std::vector<T> expected(kTokens * kDim);
    qlora::cpu::embedding_forward(table.data(), ids.data(), expected.data(), kTokens, kVocab, kDim);
    DeviceBuffer<T> y_dev(kTokens * kDim);
    y_dev.poison();
    qlora::cuda::embedding_forward(table_dev.data(), ids_dev.data(), y_dev.data(), kTokens, kVocab, kDim, nullptr);
    const auto y = y_dev.download();
    CHECK(std::memcmp(y.data(), expected.data(), y.size() * sizeof(T)) == 0);  // a copy is exact
  }

  SUBCASE("invalid ids: their rows are left untouched") {
    const auto ids = random_ids(82, true);
    DeviceBuffer<std::int32_t> ids_dev(ids);
    const auto start = to_storage<T>(random_exact<T>(kTokens * kDim, 83));
    std::vector<T> expected = start;
    qlora::cpu::embedding_forward(table.data(), ids.data(), expected.data(), kTokens, kVocab, kDim);
    DeviceBuffer<T> y_dev(start);
    qlora::cuda::embedding_forward(table_dev.data(), ids_dev.data(), y_dev.data(), kTokens, kVocab, kDim, nullptr);
    const auto y = y_dev.download();
    CHECK(std::memcmp(y.data(), expected.data(), y.size() * sizeof(T)) == 0);
  }
}

TEST_CASE_TEMPLATE("cuda embedding: backward accumulates like the CPU twin", T, float, qlora::bf16) {
  for (const bool with_invalid : {false, true}) {
    CAPTURE(with_invalid);
    const auto ids = random_ids(84, with_invalid);
    const auto dy = random_exact<T>(kTokens * kDim, 85);
    const auto dtable_start = qlora::test::random_vector<float>(kVocab * kDim, 86);  // accumulated onto
    DeviceBuffer<std::int32_t> ids_dev(ids);
    DeviceBuffer<T> dy_dev(to_storage<T>(dy));
    DeviceBuffer<float> dtable_dev(dtable_start);
    std::vector<float> expected = dtable_start;
    qlora::cpu::embedding_backward(dy.data(), ids.data(), expected.data(), kTokens, kVocab, kDim);
    qlora::cuda::embedding_backward(dy_dev.data(), ids_dev.data(), dtable_dev.data(), kTokens, kVocab, kDim,
                                    nullptr);
    CHECK(rel_error(dtable_dev.download(), expected) < 1e-5);  // f32 accumulator, atomics in any order
  }
}
