#pragma once
// The input and output sides shared by every pooled adapter (low-rank and full-matrix), methods/qblora.md:
//   forward:  u = drop(P_p x)  ...  y += s E_k h
//   backward: G_h = s E_k^T dy  ...  dx += P_p^T drop_bwd(du)
// Pooling happens before dropout, as in the released Q-BLoRA code (cheaper: the mask covers d_in/p features;
// for p = 1 the order does not matter). Pooling and repetition are the group_sum / repeat_add kernels: no
// expanded factor matrix is ever built.

#include "qlora/autograd/param.hpp"
#include "qlora/nn/adapter_config.hpp"
#include "qlora/nn/context.hpp"
#include "qlora/ops/dropout.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/ops/pool_repeat.hpp"

namespace qlora::nn::detail {

// u = drop(P_p x) for x (N, d_in). dropout_seed is the seed of this call's mask (kept for the backward).
inline Tensor pooled_input(const Context& ctx, const Tensor& x, const AdapterShape& a, std::uint64_t dropout_seed) {
  Tensor u = a.pool > 1 ? ops::group_sum(x, a.pool, 1.0 / double(a.pool)) : x;
  if (ctx.training && a.dropout > 0.f) u = ops::dropout(u, a.dropout, dropout_seed);
  return u;
}

// y += s E_k h for h (N, d_out/k).
inline void add_repeated_output(Tensor& y, const Tensor& h, const AdapterShape& a) {
  if (a.repeat > 1) ops::repeat_add_(y, h, a.repeat, a.scale);
  else ops::axpy_(y, a.scale, h);
}

// G_h = s E_k^T dy for dy (N, d_out).
inline Tensor pooled_output_grad(const Tensor& dy, const AdapterShape& a) {
  return a.repeat > 1 ? ops::group_sum(dy, a.repeat, a.scale) : ops::scale(dy, a.scale);
}

// dx += P_p^T drop_bwd(du) for du (N, d_in/p).
inline void add_input_grad(const Context& ctx, Tensor& dx, Tensor du, const AdapterShape& a,
                           std::uint64_t dropout_seed) {
  if (ctx.training && a.dropout > 0.f) du = ops::dropout(du, a.dropout, dropout_seed);
  if (a.pool > 1) ops::repeat_add_(dx, du, a.pool, 1.0 / double(a.pool));
  else ops::axpy_(dx, 1.f, du);
}

// A parameter's value in the compute dtype of x: the f32 master itself, or a bf16 copy on CUDA.
inline Tensor compute_copy(const autograd::Param& p, const Tensor& x) {
  return p.value.dtype() == x.dtype() ? p.value : p.value.to(x.dtype());
}

// p.grad += op(a) op(b), in the parameter's own dtype (f32 masters on CUDA take bf16 products directly).
inline void accumulate_matmul(autograd::Param& p, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  if (!p.requires_grad) return;
  if (!p.grad.defined()) p.grad = Tensor::zeros(p.value.shape(), p.value.dtype(), p.value.device());
  ops::matmul_into(p.grad, a, b, trans_a, trans_b, 1.f, 1.f);
}

}  // namespace qlora::nn::detail
