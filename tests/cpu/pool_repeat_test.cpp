// Adapter pooling / repetition kernels: definitions, and that each is the adjoint of the other
// (<repeat(h), y> == <h, group_sum(y)>), which is what makes them each other's backward.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "qlora/cpu/pool_repeat.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::test::random_vector;

TEST_CASE("pool_repeat: group_sum averages runs of adjacent features, repeat_add interleaves") {
  // Hand example from methods/qblora.md: pooling pairs (0,1),(2,3); repetition (h0,h0,h1,h1).
  const std::vector<double> x = {1, 3, 5, 9, -2, 4, 0, 8};  // 2 rows x 4 cols
  std::vector<double> pooled(4);
  qlora::cpu::group_sum(x.data(), pooled.data(), 2, 4, 2, 0.5f);
  CHECK(pooled == std::vector<double>{2, 7, 1, 4});
  std::vector<double> y(8, 1.0);
  qlora::cpu::repeat_add(pooled.data(), y.data(), 2, 4, 2, 2.0f);
  CHECK(y == std::vector<double>{5, 5, 15, 15, 3, 3, 9, 9});
}

TEST_CASE("pool_repeat: repeat_add is the adjoint of group_sum, for every group size") {
  const std::int64_t rows = 5;
  for (const std::int64_t group : {1, 2, 4, 32, 96}) {
    CAPTURE(group);
    const std::int64_t cols = group * 3;
    const auto big = random_vector<double>(rows * cols, 10 + group);
    const auto small = random_vector<double>(rows * cols / group, 20 + group);
    std::vector<double> summed(rows * cols / group), repeated(rows * cols, 0.0);
    qlora::cpu::group_sum(big.data(), summed.data(), rows, cols, group, 0.75f);
    qlora::cpu::repeat_add(small.data(), repeated.data(), rows, cols, group, 0.75f);
    CHECK(dot(repeated, big) == doctest::Approx(dot(small, summed)).epsilon(1e-12));
  }
}
