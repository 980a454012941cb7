// ops::matmul shape handling (batching, broadcasting, folding, transposes) against a direct triple loop,
// and the errors a caller sees for mismatched operands.

#include <doctest/doctest.h>

#include "qlora/ops/matmul.hpp"
#include "qlora/ops/random.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {
// C[b] = op(A[b]) op(B[b]) by definition, in double; a_batched/b_batched pick broadcasting.
std::vector<double> reference(const Tensor& a, const Tensor& b, bool ta, bool tb, std::int64_t batch, std::int64_t m,
                              std::int64_t n, std::int64_t k) {
  const float* A = a.data<float>();
  const float* B = b.data<float>();
  const bool ab = a.rank() > 2, bb = b.rank() > 2;
  std::vector<double> c(std::size_t(batch * m * n));
  for (std::int64_t z = 0; z < batch; ++z)
    for (std::int64_t i = 0; i < m; ++i)
      for (std::int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (std::int64_t p = 0; p < k; ++p) {
          const double av = A[(ab ? z * m * k : 0) + (ta ? p * m + i : i * k + p)];
          const double bv = B[(bb ? z * k * n : 0) + (tb ? j * k + p : p * n + j)];
          s += av * bv;
        }
        c[std::size_t((z * m + i) * n + j)] = s;
      }
  return c;
}
}  // namespace

TEST_CASE("matmul: batched, broadcast and transposed operands equal the triple loop") {
  const std::int64_t batch = 3, m = 5, n = 4, k = 6;
  int seed = 1;
  for (bool ta : {false, true})
    for (bool tb : {false, true})
      for (bool a_batched : {false, true})
        for (bool b_batched : {false, true}) {
          if (!a_batched && !b_batched) continue;
          Shape sa = ta ? Shape{k, m} : Shape{m, k};
          Shape sb = tb ? Shape{n, k} : Shape{k, n};
          if (a_batched) sa = ta ? Shape{batch, k, m} : Shape{batch, m, k};
          if (b_batched) sb = tb ? Shape{batch, n, k} : Shape{batch, k, n};
          const Tensor a = ops::randn(sa, seed++), b = ops::randn(sb, seed++);
          const Tensor c = ops::matmul(a, b, ta, tb);
          CHECK(c.shape() == Shape{batch, m, n});
          CHECK(test::rel_error(c.to_vector<float>(), reference(a, b, ta, tb, batch, m, n, k)) < 1e-6);
        }
}

TEST_CASE("matmul: matmul_into accumulates with alpha and beta") {
  const Tensor a = ops::randn({4, 3}, 10), b = ops::randn({3, 2}, 11);
  Tensor c = ops::randn({4, 2}, 12);
  const std::vector<float> c0 = c.to_vector<float>();
  ops::matmul_into(c, a, b, false, false, 2.f, 1.f);
  const std::vector<double> ab = reference(a, b, false, false, 1, 4, 2, 3);
  std::vector<double> expected(8);
  for (int i = 0; i < 8; ++i) expected[i] = 2 * ab[i] + c0[i];
  CHECK(test::rel_error(c.to_vector<float>(), expected) < 1e-6);
}

TEST_CASE("matmul: mismatched operands are clear errors") {
  const Tensor a = ops::randn({4, 3}, 1), b = ops::randn({5, 2}, 2);
  CHECK_THROWS_WITH_AS(ops::matmul(a, b), "matmul: inner dimensions differ: a (4, 3) times b (5, 2) (3 vs 5)", Error);
  CHECK_THROWS_WITH_AS(ops::matmul(a, a.to(DType::f64), false, true), "matmul: b is f64 but a is f32", Error);
  CHECK_THROWS_AS(ops::matmul(ops::randn({2, 4, 3}, 3), ops::randn({3, 3, 2}, 4)), Error);
  CHECK_THROWS_WITH_AS(ops::matmul(a.to(DType::bf16), a, false, true), "matmul: b is f32 but a is bf16", Error);
  CHECK_THROWS_WITH_AS(ops::matmul(a.to(DType::bf16), a.to(DType::bf16), false, true),
                       "matmul: the CPU backend computes in f32 or f64, got bf16 (convert with .to(DType::f32))", Error);
}
