#include <doctest/doctest.h>

#include <cstdint>
#include <span>
#include <vector>

#include "qlora/cpu/embedding.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

TEST_CASE("embedding: forward copies table rows and skips out-of-range ids") {
  const std::int64_t vocab = 10, dim = 4;
  const auto table = random_vector<float>(vocab * dim, 1);
  const std::vector<std::int32_t> ids = {3, 0, 9, 3, -1, 10};
  const std::int64_t n = std::int64_t(ids.size());
  std::vector<float> y(n * dim, 42.0f);
  qlora::cpu::embedding_forward(table.data(), ids.data(), y.data(), n, vocab, dim);
  for (std::int64_t t = 0; t < 4; ++t) {
    for (std::int64_t j = 0; j < dim; ++j) CHECK(y[t * dim + j] == table[ids[t] * dim + j]);
  }
  for (std::int64_t j = 0; j < 2 * dim; ++j) CHECK(y[4 * dim + j] == 42.0f);  // rows of ids -1 and 10 untouched
}

TEST_CASE("embedding: backward matches float64 finite differences, repeated ids accumulate") {
  const std::int64_t vocab = 6, dim = 3;
  const std::vector<std::int32_t> ids = {2, 5, 2, 0, 2, 7};  // 2 three times; 7 is out of range
  const std::int64_t n = std::int64_t(ids.size());
  const auto table = random_vector<double>(vocab * dim, 2);
  const auto c = random_vector<double>(n * dim, 3);  // L = c . y
  auto loss = [&](std::span<const double> tab) {
    std::vector<double> y(n * dim, 0.0);
    qlora::cpu::embedding_forward(tab.data(), ids.data(), y.data(), n, vocab, dim);
    return dot(c, y);
  };
  std::vector<double> dtable(vocab * dim, 0.0);
  qlora::cpu::embedding_backward(c.data(), ids.data(), dtable.data(), n, vocab, dim);
  CHECK(relative_error(dtable, numerical_gradient(loss, table)) < 1e-6);

  // Row 2 collects c of tokens 0, 2 and 4; rows 1, 3, 4 get nothing.
  for (std::int64_t j = 0; j < dim; ++j) {
    CHECK(dtable[2 * dim + j] == doctest::Approx(c[0 * dim + j] + c[2 * dim + j] + c[4 * dim + j]));
    CHECK(dtable[1 * dim + j] == 0.0);
  }
}
