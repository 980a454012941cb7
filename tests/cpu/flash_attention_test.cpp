// The tiled FlashAttention-2 CPU twin (qlora/cpu/flash_attention.hpp) against the plain row-by-row attention
// (qlora/cpu/attention.hpp, itself checked against the naive masked softmax in attention_test.cpp), and its
// backward against float64 central finite differences. Tile sizes that do not divide the sequence (7 x 5,
// 16 x 32 over 37 or 50 tokens) exercise the partial last tiles and the diagonal tiles.
//
// Tolerances: in float64 both compute the same sums in another order, so they agree to 1e-12. In float32 the
// twin accumulates in f32 (as the GPU does) while the plain version accumulates in double and rounds once:
// the difference is f32 summation error over up to tk * d terms, ~1e-6 relative; 1e-5 is asserted.

#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "support/attention_shape.hpp"
#include "qlora/cpu/attention.hpp"
#include "qlora/cpu/flash_attention.hpp"
#include "support/random.hpp"

using qlora::autograd::dot;
using qlora::autograd::numerical_gradient;
using qlora::autograd::relative_error;
using qlora::test::random_vector;
using qlora::test::rel_error;

namespace {

using qlora::test::AttentionShape;

const AttentionShape kShapes[] = {
    {"multi-head, d 64", 2, 37, 37, 4, 4, 64},
    {"grouped-query 8/2, d 128", 1, 50, 50, 8, 2, 128},
    {"KV cache tq < tk, grouped-query, d 64", 2, 5, 77, 6, 3, 64},
    {"KV cache, several query tiles, d 128", 1, 29, 61, 4, 2, 128},
    {"single-token decode, one kv head", 1, 1, 40, 4, 1, 64},
    {"odd head dim 24", 1, 13, 13, 2, 1, 24},
};

template <class T>
constexpr double kTolerance = std::is_same_v<T, double> ? 1e-12 : 1e-5;

// Forward and backward of the tiled twin against the plain twin on one shape. dq starts as NaN (overwritten),
// dk and dv start non-zero (they accumulate).
template <std::int64_t Br, std::int64_t Bc, class T>
void check_against_plain(const AttentionShape& s, std::uint64_t seed) {
  CAPTURE(std::string(s.name));
  CAPTURE(Br);
  CAPTURE(Bc);
  const auto q = random_vector<T>(s.q_size(), seed, -2.0, 2.0);
  const auto k = random_vector<T>(s.kv_size(), seed + 1, -2.0, 2.0);
  const auto v = random_vector<T>(s.kv_size(), seed + 2);
  const auto dout = random_vector<T>(s.q_size(), seed + 3);
  const auto dk_start = random_vector<T>(s.kv_size(), seed + 4), dv_start = random_vector<T>(s.kv_size(), seed + 5);

  std::vector<T> out(s.q_size()), lse(s.lse_size()), flash_out(s.q_size()), flash_lse(s.lse_size());
  qlora::cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq,
                                s.hkv, s.d);
  qlora::cpu::flash_attention_forward<Br, Bc>(q.data(), k.data(), v.data(), flash_out.data(), flash_lse.data(),
                                              s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);
  CHECK(rel_error(flash_out, out) < kTolerance<T>);
  CHECK(rel_error(flash_lse, lse) < kTolerance<T>);

  const T nan = std::numeric_limits<T>::quiet_NaN();
  std::vector<T> dq(s.q_size(), nan), dk = dk_start, dv = dv_start;
  std::vector<T> flash_dq(s.q_size(), nan), flash_dk = dk_start, flash_dv = dv_start;
  qlora::cpu::attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), dout.data(), dq.data(),
                                 dk.data(), dv.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);
  qlora::cpu::flash_attention_backward<Br, Bc>(q.data(), k.data(), v.data(), out.data(), lse.data(), dout.data(),
                                               flash_dq.data(), flash_dk.data(), flash_dv.data(), s.batch, s.tq, s.tk,
                                               s.hq, s.hkv, s.d);
  CHECK(rel_error(flash_dq, dq) < kTolerance<T>);
  // Compare the increments, not the totals: the random starting values would hide an error in a small sum.
  for (std::size_t i = 0; i < dk.size(); ++i) {
    dk[i] -= dk_start[i];
    dv[i] -= dv_start[i];
    flash_dk[i] -= dk_start[i];
    flash_dv[i] -= dv_start[i];
  }
  CHECK(rel_error(flash_dk, dk) < kTolerance<T>);
  CHECK(rel_error(flash_dv, dv) < kTolerance<T>);
}

template <std::int64_t Br, std::int64_t Bc, class T>
void check_all_shapes() {
  std::uint64_t seed = 1000;
  for (const AttentionShape& shape : kShapes) {
    check_against_plain<Br, Bc, T>(shape, seed);
    seed += 10;
  }
}

// L = c . attention(q, k, v) through the tiled forward; the tiled backward's [dq; dk; dv] against finite
// differences over [q; k; v].
template <std::int64_t Br, std::int64_t Bc>
void check_backward_finite_differences(const AttentionShape& s, std::uint64_t seed) {
  CAPTURE(std::string(s.name));
  const std::int64_t nq = s.q_size(), nkv = s.kv_size();
  const auto inputs = random_vector<double>(nq + 2 * nkv, seed, -2.0, 2.0);  // [q; k; v]
  const auto c = random_vector<double>(nq, seed + 1);
  auto loss = [&](std::span<const double> in) {
    std::vector<double> out(nq), lse(s.lse_size());
    qlora::cpu::flash_attention_forward<Br, Bc>(in.data(), in.data() + nq, in.data() + nq + nkv, out.data(),
                                                lse.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);
    return dot(c, out);
  };
  const double *q = inputs.data(), *k = q + nq, *v = k + nkv;
  std::vector<double> out(nq), lse(s.lse_size());
  qlora::cpu::flash_attention_forward<Br, Bc>(q, k, v, out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);
  std::vector<double> grad(nq + 2 * nkv, 0.0);  // [dq; dk; dv]
  qlora::cpu::flash_attention_backward<Br, Bc>(q, k, v, out.data(), lse.data(), c.data(), grad.data(),
                                               grad.data() + nq, grad.data() + nq + nkv, s.batch, s.tq, s.tk, s.hq,
                                               s.hkv, s.d);
  CHECK(relative_error(grad, numerical_gradient(loss, inputs)) < 1e-6);
}

}  // namespace

TEST_CASE_TEMPLATE("flash attention (CPU twin): tiles 7 x 5 match the plain attention, forward and backward", T,
                   float, double) {
  check_all_shapes<7, 5, T>();
}

TEST_CASE_TEMPLATE("flash attention (CPU twin): tiles 16 x 32 match the plain attention, forward and backward", T,
                   float, double) {
  check_all_shapes<16, 32, T>();
}

TEST_CASE("flash attention (CPU twin): the GPU's tiles 64 x 64 match the plain attention, forward and backward") {
  check_all_shapes<64, 64, float>();
}

TEST_CASE("flash attention (CPU twin): one-element tiles match the plain attention") {
  check_all_shapes<1, 1, double>();
}

TEST_CASE("flash attention (CPU twin): backward matches float64 finite differences") {
  SUBCASE("grouped-query 4/2, tiles 3 x 2 over 7 tokens") {
    check_backward_finite_differences<3, 2>({"grouped-query", 1, 7, 7, 4, 2, 4}, 60);
  }
  SUBCASE("KV cache tq < tk, tiles 2 x 3") {
    check_backward_finite_differences<2, 3>({"KV cache", 2, 3, 8, 2, 1, 5}, 70);
  }
}
