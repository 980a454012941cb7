#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "qlora/cpu/attention.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;

namespace {

struct AttentionShape {
  std::int64_t batch, tq, tk, hq, hkv, d;
  std::int64_t q_size() const { return batch * tq * hq * d; }
  std::int64_t kv_size() const { return batch * tk * hkv * d; }
  std::int64_t lse_size() const { return batch * hq * tq; }
};

// The textbook computation: the whole score matrix S = Q K^T / sqrt(d) per (batch, head), a causal mask
// of -inf above the shifted diagonal, a row softmax, then O = P V.
void naive_attention(const AttentionShape& s, const std::vector<double>& q, const std::vector<double>& k,
                     const std::vector<double>& v, std::vector<double>& out, std::vector<double>& lse) {
  const double inf = std::numeric_limits<double>::infinity();
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t h = 0; h < s.hq; ++h) {
      const std::int64_t hk = h / (s.hq / s.hkv);
      std::vector<double> S(s.tq * s.tk);
      for (std::int64_t t = 0; t < s.tq; ++t) {
        for (std::int64_t j = 0; j < s.tk; ++j) {
          double score = 0;
          for (std::int64_t c = 0; c < s.d; ++c) {
            score += q[((b * s.tq + t) * s.hq + h) * s.d + c] * k[((b * s.tk + j) * s.hkv + hk) * s.d + c];
          }
          const bool visible = j <= s.tk - s.tq + t;
          S[t * s.tk + j] = visible ? score / std::sqrt(double(s.d)) : -inf;
        }
      }
      for (std::int64_t t = 0; t < s.tq; ++t) {
        double max = -inf, sum = 0;
        for (std::int64_t j = 0; j < s.tk; ++j) max = std::max(max, S[t * s.tk + j]);
        for (std::int64_t j = 0; j < s.tk; ++j) sum += std::exp(S[t * s.tk + j] - max);
        lse[(b * s.hq + h) * s.tq + t] = max + std::log(sum);
        for (std::int64_t c = 0; c < s.d; ++c) {
          double o = 0;
          for (std::int64_t j = 0; j < s.tk; ++j) {
            o += std::exp(S[t * s.tk + j] - max) / sum * v[((b * s.tk + j) * s.hkv + hk) * s.d + c];
          }
          out[((b * s.tq + t) * s.hq + h) * s.d + c] = o;
        }
      }
    }
  }
}

void check_forward(const AttentionShape& s, std::uint64_t seed) {
  const auto q = random_vector<double>(s.q_size(), seed, -2.0, 2.0);
  const auto k = random_vector<double>(s.kv_size(), seed + 1, -2.0, 2.0);
  const auto v = random_vector<double>(s.kv_size(), seed + 2);
  std::vector<double> expected_out(s.q_size()), expected_lse(s.lse_size());
  naive_attention(s, q, k, v, expected_out, expected_lse);

  std::vector<double> out(s.q_size()), lse(s.lse_size());
  qlora::cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq,
                                s.hkv, s.d);
  CHECK(relative_error(out, expected_out) < 1e-13);
  CHECK(relative_error(lse, expected_lse) < 1e-13);

  std::vector<float> qf(q.begin(), q.end()), kf(k.begin(), k.end()), vf(v.begin(), v.end());
  std::vector<float> outf(s.q_size()), lsef(s.lse_size());
  qlora::cpu::attention_forward(qf.data(), kf.data(), vf.data(), outf.data(), lsef.data(), s.batch, s.tq, s.tk,
                                s.hq, s.hkv, s.d);
  CHECK(qlora::test::rel_error(outf, expected_out) < 1e-5);
  CHECK(qlora::test::rel_error(lsef, expected_lse) < 1e-6);
}

// L = c . attention(q, k, v); checks dq, dk, dv against finite differences over [q; k; v].
// dq starts as garbage (it is overwritten), dk and dv start at 0.5 (they accumulate).
void check_backward(const AttentionShape& s, std::uint64_t seed) {
  const std::int64_t nq = s.q_size(), nkv = s.kv_size();
  const auto inputs = random_vector<double>(nq + 2 * nkv, seed, -2.0, 2.0);  // [q; k; v]
  const auto c = random_vector<double>(nq, seed + 1);
  auto loss = [&](std::span<const double> in) {
    std::vector<double> out(nq), lse(s.lse_size());
    qlora::cpu::attention_forward(in.data(), in.data() + nq, in.data() + nq + nkv, out.data(), lse.data(), s.batch,
                                  s.tq, s.tk, s.hq, s.hkv, s.d);
    return dot(c, out);
  };
  const double *q = inputs.data(), *k = q + nq, *v = k + nkv;
  std::vector<double> out(nq), lse(s.lse_size());
  qlora::cpu::attention_forward(q, k, v, out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);

  std::vector<double> grad(nq + 2 * nkv, 0.5);  // [dq; dk; dv]
  std::fill(grad.begin(), grad.begin() + nq, std::numeric_limits<double>::quiet_NaN());
  qlora::cpu::attention_backward(q, k, v, out.data(), lse.data(), c.data(), grad.data(), grad.data() + nq,
                                 grad.data() + nq + nkv, s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);
  for (std::int64_t i = nq; i < nq + 2 * nkv; ++i) grad[i] -= 0.5;
  CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-6);
}

}  // namespace

TEST_CASE("attention: forward matches naive masked softmax(Q K^T / sqrt(d)) V") {
  SUBCASE("multi-head, tq == tk") { check_forward({2, 5, 5, 2, 2, 8}, 10); }
  SUBCASE("grouped-query hq=4 hkv=2") { check_forward({2, 6, 6, 4, 2, 8}, 20); }
  SUBCASE("KV cache tk > tq, grouped-query") { check_forward({1, 3, 9, 4, 2, 16}, 30); }
  SUBCASE("single-token decode against a cache, one kv head") { check_forward({2, 1, 7, 4, 1, 8}, 40); }
}

TEST_CASE("attention: the first query of a full causal sequence returns v_0 exactly") {
  const AttentionShape s{1, 4, 4, 2, 1, 4};
  const auto q = random_vector<double>(s.q_size(), 50), k = random_vector<double>(s.kv_size(), 51),
             v = random_vector<double>(s.kv_size(), 52);
  std::vector<double> out(s.q_size()), lse(s.lse_size());
  qlora::cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq,
                                s.hkv, s.d);
  for (std::int64_t h = 0; h < s.hq; ++h) {
    for (std::int64_t c = 0; c < s.d; ++c) CHECK(out[h * s.d + c] == v[c]);  // one visible key: P = [1]
  }
}

TEST_CASE("attention: backward matches float64 finite differences, grouped-query hq=4 hkv=2") {
  check_backward({2, 4, 4, 4, 2, 4}, 60);
}

TEST_CASE("attention: backward matches float64 finite differences, KV cache tk > tq") {
  check_backward({1, 3, 6, 4, 2, 4}, 70);
}

TEST_CASE("attention: backward matches float64 finite differences, multi-head hq = hkv") {
  check_backward({1, 5, 5, 2, 2, 3}, 80);
}
