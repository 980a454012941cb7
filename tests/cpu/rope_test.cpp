#include <doctest/doctest.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <span>
#include <vector>

#include "qlora/cpu/rope.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

namespace {

// Llama's inverse frequencies: theta^(-2i / head_dim), i < head_dim / 2.
std::vector<float> rope_inv_freq(std::int64_t head_dim, double theta = 10000.0) {
  std::vector<float> f(head_dim / 2);
  for (std::int64_t i = 0; i < head_dim / 2; ++i) f[i] = float(std::pow(theta, -2.0 * double(i) / double(head_dim)));
  return f;
}

}  // namespace

TEST_CASE("rope: forward rotates each (x_i, x_{i+half}) as the complex number x_i + i x_{i+half}") {
  const std::int64_t batch = 2, seq = 5, heads = 3, head_dim = 8, half = head_dim / 2, pos_offset = 7;
  const auto inv_freq = rope_inv_freq(head_dim);
  const auto x0 = random_vector<double>(batch * seq * heads * head_dim, 1);
  std::vector<double> expected(x0.size());
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t t = 0; t < seq; ++t) {
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t base = ((b * seq + t) * heads + h) * head_dim;
        for (std::int64_t i = 0; i < half; ++i) {
          // (a + ib) e^{i angle}; the angle is a float product, as Hugging Face computes it.
          const double angle = double(float(pos_offset + t) * inv_freq[i]);
          const std::complex<double> z = std::complex<double>(x0[base + i], x0[base + i + half]) *
                                         std::polar(1.0, angle);
          expected[base + i] = z.real();
          expected[base + i + half] = z.imag();
        }
      }
    }
  }
  std::vector<double> x = x0;
  qlora::cpu::rope_forward(x.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
  CHECK(relative_error(x, expected) < 1e-14);

  // The float instantiation agrees with the same rotation to float precision.
  std::vector<float> xf(x0.begin(), x0.end());
  qlora::cpu::rope_forward(xf.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
  CHECK(qlora::test::rel_error(xf, expected) < 1e-6);

  // Position 0 (t = 0 of a sequence with no offset) is the identity.
  std::vector<double> first(x0.begin(), x0.begin() + heads * head_dim);
  qlora::cpu::rope_forward(first.data(), inv_freq.data(), 1, 1, heads, head_dim, 0);
  CHECK(first == std::vector<double>(x0.begin(), x0.begin() + heads * head_dim));
}

TEST_CASE("rope: backward undoes forward") {
  const std::int64_t batch = 2, seq = 6, heads = 2, head_dim = 16, pos_offset = 100;
  const auto inv_freq = rope_inv_freq(head_dim);
  const auto x0 = random_vector<double>(batch * seq * heads * head_dim, 2);
  std::vector<double> x = x0;
  qlora::cpu::rope_forward(x.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
  qlora::cpu::rope_backward(x.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
  CHECK(relative_error(x, x0) < 1e-14);

  std::vector<float> xf(x0.begin(), x0.end());
  qlora::cpu::rope_forward(xf.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
  qlora::cpu::rope_backward(xf.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
  CHECK(qlora::test::rel_error(xf, x0) < 1e-6);
}

TEST_CASE("rope: backward matches float64 finite differences") {
  const std::int64_t batch = 2, seq = 3, heads = 2, head_dim = 6, pos_offset = 3;
  const std::int64_t n = batch * seq * heads * head_dim;
  const auto inv_freq = rope_inv_freq(head_dim);
  const auto x = random_vector<double>(n, 3);
  const auto c = random_vector<double>(n, 4);  // L = c . rope(x)
  auto loss = [&](std::span<const double> xs) {
    std::vector<double> y(xs.begin(), xs.end());
    qlora::cpu::rope_forward(y.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
    return dot(c, y);
  };
  std::vector<double> dx = c;
  qlora::cpu::rope_backward(dx.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
  CHECK(relative_error(dx, numerical_gradient(loss, x)) < 1e-6);
}
