#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "qlora/cpu/matmul.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

namespace {

// C[i] = alpha op(A[i]) op(B[i]) + beta C[i], by the definition: C_rc = sum_p op(A)_rp op(B)_pc.
void naive_matmul(const std::vector<double>& a, const std::vector<double>& b, std::vector<double>& c, std::int64_t m,
                  std::int64_t n, std::int64_t k, bool trans_a, bool trans_b, double alpha, double beta,
                  std::int64_t batch, std::int64_t stride_a, std::int64_t stride_b, std::int64_t stride_c) {
  for (std::int64_t i = 0; i < batch; ++i) {
    for (std::int64_t r = 0; r < m; ++r) {
      for (std::int64_t col = 0; col < n; ++col) {
        double sum = 0;
        for (std::int64_t p = 0; p < k; ++p) {
          const double op_a = trans_a ? a[i * stride_a + p * m + r] : a[i * stride_a + r * k + p];
          const double op_b = trans_b ? b[i * stride_b + col * k + p] : b[i * stride_b + p * n + col];
          sum += op_a * op_b;
        }
        double& out = c[i * stride_c + r * n + col];
        out = alpha * sum + beta * out;
      }
    }
  }
}

}  // namespace

TEST_CASE("matmul: every transpose combination, batched and broadcast, matches a triple loop") {
  const std::int64_t m = 5, n = 7, k = 3, batch = 3;
  for (bool trans_a : {false, true}) {
    for (bool trans_b : {false, true}) {
      // Broadcast A (stride 0, one shared matrix), then broadcast B, then neither.
      for (int broadcast = 0; broadcast < 3; ++broadcast) {
        CAPTURE(trans_a);
        CAPTURE(trans_b);
        CAPTURE(broadcast);
        const std::int64_t stride_a = broadcast == 0 ? 0 : m * k, stride_b = broadcast == 1 ? 0 : k * n;
        const auto a = random_vector<double>(batch * m * k, 1);
        const auto b = random_vector<double>(batch * k * n, 2);
        const auto c0 = random_vector<double>(batch * m * n, 3);
        std::vector<double> expected = c0;
        naive_matmul(a, b, expected, m, n, k, trans_a, trans_b, 0.5, -1.5, batch, stride_a, stride_b, m * n);

        std::vector<double> c = c0;
        qlora::cpu::matmul(a.data(), b.data(), c.data(), m, n, k, trans_a, trans_b, 0.5f, -1.5f, batch, stride_a,
                           stride_b, m * n);
        CHECK(relative_error(c, expected) < 1e-14);

        std::vector<float> af(a.begin(), a.end()), bf(b.begin(), b.end()), cf(c0.begin(), c0.end());
        qlora::cpu::matmul(af.data(), bf.data(), cf.data(), m, n, k, trans_a, trans_b, 0.5f, -1.5f, batch, stride_a,
                           stride_b, m * n);
        CHECK(qlora::test::rel_error(cf, expected) < 1e-6);
      }
    }
  }
}

TEST_CASE("matmul: beta = 0 ignores what C held (even NaN) and beta = 1 accumulates") {
  const std::int64_t m = 4, n = 3, k = 6;
  const auto a = random_vector<double>(m * k, 4), b = random_vector<double>(k * n, 5);
  std::vector<double> expected(m * n, 0.0);
  naive_matmul(a, b, expected, m, n, k, false, false, 1.0, 0.0, 1, 0, 0, 0);

  std::vector<double> c(m * n, std::numeric_limits<double>::quiet_NaN());
  qlora::cpu::matmul(a.data(), b.data(), c.data(), m, n, k, false, false, 1.0f, 0.0f, 1, 0, 0, 0);
  CHECK(relative_error(c, expected) < 1e-14);

  qlora::cpu::matmul(a.data(), b.data(), c.data(), m, n, k, false, false, 1.0f, 1.0f, 1, 0, 0, 0);
  for (std::int64_t i = 0; i < m * n; ++i) CHECK(c[i] == doctest::Approx(2 * expected[i]));
}

TEST_CASE("matmul: a larger single GEMM (Eigen's blocked path) matches a triple loop") {
  const std::int64_t m = 67, n = 45, k = 130;
  const auto a = random_vector<double>(m * k, 6), b = random_vector<double>(n * k, 7);
  std::vector<double> expected(m * n, 0.0);
  naive_matmul(a, b, expected, m, n, k, false, true, 1.0, 0.0, 1, 0, 0, 0);
  std::vector<float> af(a.begin(), a.end()), bf(b.begin(), b.end()), cf(m * n);
  qlora::cpu::matmul(af.data(), bf.data(), cf.data(), m, n, k, false, true, 1.0f, 0.0f, 1, 0, 0, 0);
  CHECK(qlora::test::rel_error(cf, expected) < 1e-6);
}

// The gradient identities the linear layers use, each computed with matmul itself, against float64
// finite differences of L = G . C:
//   C = A B      ->  dA = G B^T,  dB = A^T G
//   C = X W^T    ->  dX = G W,    dW = G^T X      (a linear layer, W stored (out, in))
TEST_CASE("matmul: gradient identities match float64 finite differences") {
  const std::int64_t m = 4, n = 3, k = 5;
  const auto g = random_vector<double>(m * n, 8);

  SUBCASE("C = A B") {
    const auto inputs = random_vector<double>(m * k + k * n, 9);  // [A; B]
    auto loss = [&](std::span<const double> in) {
      std::vector<double> c(m * n);
      qlora::cpu::matmul(in.data(), in.data() + m * k, c.data(), m, n, k, false, false, 1.0f, 0.0f, 1, 0, 0, 0);
      return dot(g, c);
    };
    const double *a = inputs.data(), *b = a + m * k;
    std::vector<double> grad(m * k + k * n);  // [dA; dB]
    qlora::cpu::matmul(g.data(), b, grad.data(), m, k, n, false, true, 1.0f, 0.0f, 1, 0, 0, 0);
    qlora::cpu::matmul(a, g.data(), grad.data() + m * k, k, n, m, true, false, 1.0f, 0.0f, 1, 0, 0, 0);
    CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-6);
  }

  SUBCASE("C = X W^T") {
    const auto inputs = random_vector<double>(m * k + n * k, 10);  // [X; W], W is (n, k)
    auto loss = [&](std::span<const double> in) {
      std::vector<double> c(m * n);
      qlora::cpu::matmul(in.data(), in.data() + m * k, c.data(), m, n, k, false, true, 1.0f, 0.0f, 1, 0, 0, 0);
      return dot(g, c);
    };
    const double *x = inputs.data(), *w = x + m * k;
    std::vector<double> grad(m * k + n * k);  // [dX; dW]
    qlora::cpu::matmul(g.data(), w, grad.data(), m, k, n, false, false, 1.0f, 0.0f, 1, 0, 0, 0);
    qlora::cpu::matmul(g.data(), x, grad.data() + m * k, n, k, m, true, false, 1.0f, 0.0f, 1, 0, 0, 0);
    CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-6);
  }
}
