// ops::attention's kernel choice on the CPU: AttentionKernel::flash runs the tiled CPU twin
// (qlora/cpu/flash_attention.hpp), automatic and plain the row-by-row reference; both give the same result
// (float64: the same sums in another order, 1e-12) through the same AttentionResult / AttentionGrads contract.

#include <doctest/doctest.h>

#include "qlora/ops/attention.hpp"
#include "qlora/ops/random.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {
double rel(const Tensor& got, const Tensor& want) {
  return test::rel_error(got.to_vector<double>(), want.to_vector<double>());
}
}  // namespace

TEST_CASE("ops::attention: the flash kernel on the CPU matches the plain one, forward and backward (f64)") {
  // Grouped-query 6/2, KV cache (tq 40 < tk 75), head dim 64: two query tiles and two key tiles of 64.
  const Tensor q = ops::randn({2, 40, 6, 64}, 1).to(DType::f64), k = ops::randn({2, 75, 2, 64}, 2).to(DType::f64),
               v = ops::randn({2, 75, 2, 64}, 3).to(DType::f64), dout = ops::randn(q.shape(), 4).to(DType::f64);
  const ops::AttentionResult plain = ops::attention(q, k, v, ops::AttentionKernel::plain);
  const ops::AttentionResult flash = ops::attention(q, k, v, ops::AttentionKernel::flash);
  CHECK(rel(flash.out, plain.out) < 1e-12);
  CHECK(rel(flash.lse, plain.lse) < 1e-12);
  const ops::AttentionGrads gp = ops::attention_backward(q, k, v, plain, dout, ops::AttentionKernel::plain);
  const ops::AttentionGrads gf = ops::attention_backward(q, k, v, plain, dout, ops::AttentionKernel::flash);
  CHECK(rel(gf.dq, gp.dq) < 1e-12);
  CHECK(rel(gf.dk, gp.dk) < 1e-12);
  CHECK(rel(gf.dv, gp.dv) < 1e-12);
  // On the CPU, automatic is the plain reference, bit for bit.
  CHECK(ops::attention(q, k, v).out.to_vector<double>() == plain.out.to_vector<double>());
}
