// RoPE on q and k in one pass (cpu/rope.hpp): rope on q then on k, bit for bit, with grouped-query heads;
// the backward is the transpose (finite differences in float64).

#include <doctest/doctest.h>

#include <cmath>
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
std::vector<float> inv_freq_of(std::int64_t head_dim) {
  std::vector<float> f(head_dim / 2);
  for (std::int64_t i = 0; i < head_dim / 2; ++i) f[i] = float(std::pow(10000.0, -2.0 * double(i) / double(head_dim)));
  return f;
}
}  // namespace

TEST_CASE("rope_qk: q and k together are rope on q then rope on k, forward and backward") {
  const std::int64_t batch = 2, seq = 6, q_heads = 4, k_heads = 2, head_dim = 16, pos_offset = 3;
  const auto inv_freq = inv_freq_of(head_dim);
  const auto q0 = random_vector<float>(batch * seq * q_heads * head_dim, 41);
  const auto k0 = random_vector<float>(batch * seq * k_heads * head_dim, 42);

  std::vector<float> q = q0, k = k0;
  qlora::cpu::rope_forward(q.data(), inv_freq.data(), batch, seq, q_heads, head_dim, pos_offset);
  qlora::cpu::rope_forward(k.data(), inv_freq.data(), batch, seq, k_heads, head_dim, pos_offset);
  std::vector<float> qf = q0, kf = k0;
  qlora::cpu::rope_qk_forward(qf.data(), kf.data(), inv_freq.data(), batch, seq, q_heads, k_heads, head_dim, pos_offset);
  CHECK(qf == q);
  CHECK(kf == k);
  CHECK(qf != q0);  // it did rotate

  qlora::cpu::rope_backward(q.data(), inv_freq.data(), batch, seq, q_heads, head_dim, pos_offset);
  qlora::cpu::rope_backward(k.data(), inv_freq.data(), batch, seq, k_heads, head_dim, pos_offset);
  qlora::cpu::rope_qk_backward(qf.data(), kf.data(), inv_freq.data(), batch, seq, q_heads, k_heads, head_dim,
                               pos_offset);
  CHECK(qf == q);
  CHECK(kf == k);
  CHECK(qlora::test::rel_error(qf, q0) < 1e-6);  // backward undoes forward
}

TEST_CASE("rope_qk: backward matches float64 finite differences") {
  const std::int64_t batch = 1, seq = 3, q_heads = 2, k_heads = 1, head_dim = 4, pos_offset = 5;
  const std::int64_t nq = batch * seq * q_heads * head_dim, nk = batch * seq * k_heads * head_dim;
  const auto inv_freq = inv_freq_of(head_dim);
  const auto inputs = random_vector<double>(nq + nk, 43);  // [q; k]
  const auto c = random_vector<double>(nq + nk, 44);       // L = c . [rope(q); rope(k)]
  auto loss = [&](std::span<const double> in) {
    std::vector<double> x(in.begin(), in.end());
    qlora::cpu::rope_qk_forward(x.data(), x.data() + nq, inv_freq.data(), batch, seq, q_heads, k_heads, head_dim,
                                pos_offset);
    return dot(c, x);
  };
  std::vector<double> grad = c;
  qlora::cpu::rope_qk_backward(grad.data(), grad.data() + nq, inv_freq.data(), batch, seq, q_heads, k_heads, head_dim,
                               pos_offset);
  CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-8);
}
