#pragma once
// Matrix products: C = alpha op(A) op(B) + beta C with op = identity or transpose, batched over leading
// dimensions. CPU: Eigen; CUDA: cuBLASLt with f32 accumulation (bf16 or f32 inputs, f32 or bf16 output).
//
// Shapes: A is (..., m, k) — or (..., k, m) with trans_a — and B (..., k, n) — or (..., n, k) with trans_b.
// The leading (batch) dimensions of A and B are equal, or one of them has none and is broadcast. When B
// has no batch dimensions and A is not transposed, A's batch folds into m: one large GEMM, not many small.

#include <optional>

#include "qlora/cpu/matmul.hpp"
#include "qlora/cuda/matmul.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

namespace detail {

struct GemmShape {
  std::int64_t batch = 1, m = 0, n = 0, k = 0;
  std::int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  Shape out;
};

inline std::int64_t leading_product(const Tensor& t) {
  std::int64_t p = 1;
  for (int i = 0; i + 2 < t.rank(); ++i) p *= t.dim(i);
  return p;
}

inline GemmShape gemm_shape(std::string_view op, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b) {
  if (a.rank() < 2 || b.rank() < 2)
    fail(op, "operands must have rank >= 2, got a " + a.shape().str() + " and b " + b.shape().str());
  GemmShape g;
  const std::int64_t a_rows = a.dim(-2), a_cols = a.dim(-1), b_rows = b.dim(-2), b_cols = b.dim(-1);
  g.m = trans_a ? a_cols : a_rows;
  g.k = trans_a ? a_rows : a_cols;
  g.n = trans_b ? b_rows : b_cols;
  const std::int64_t k_b = trans_b ? b_cols : b_rows;
  if (g.k != k_b)
    fail(op, "inner dimensions differ: a " + a.shape().str() + (trans_a ? "^T" : "") + " times b " + b.shape().str() +
                 (trans_b ? "^T" : "") + " (" + std::to_string(g.k) + " vs " + std::to_string(k_b) + ")");
  const bool a_batched = a.rank() > 2, b_batched = b.rank() > 2;
  if (a_batched && b_batched) {
    if (a.rank() != b.rank()) fail(op, "batch dimensions differ: a " + a.shape().str() + ", b " + b.shape().str());
    for (int i = 0; i + 2 < a.rank(); ++i)
      if (a.dim(i) != b.dim(i)) fail(op, "batch dimensions differ: a " + a.shape().str() + ", b " + b.shape().str());
  }
  const Tensor& lead = a_batched ? a : b;
  g.out = lead.shape().with_dim(-2, g.m).with_dim(-1, g.n);
  if (a_batched && !b_batched && !trans_a) {  // fold A's batch into its rows
    g.m *= leading_product(a);
    return g;
  }
  g.batch = leading_product(lead);
  g.stride_a = a_batched ? g.m * g.k : 0;
  g.stride_b = b_batched ? g.k * g.n : 0;
  g.stride_c = g.m * g.n;
  return g;
}

}  // namespace detail

// C = alpha op(A) op(B) + beta C into an existing C (beta = 1 accumulates, as gradient steps do).
inline void matmul_into(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false,
                        float alpha = 1.f, float beta = 0.f) {
  constexpr std::string_view op = "matmul";
  detail::check_same(op, {{&a, "a"}, {&b, "b"}});
  detail::check_defined(op, c, "c");
  detail::check_device(op, c, a.device(), "c");
  const detail::GemmShape g = detail::gemm_shape(op, a, b, trans_a, trans_b);
  detail::check_shape(op, c, g.out, "c");
  if (a.device().is_cpu()) detail::check_dtype(op, c, a.dtype(), "c");
  else if (c.dtype() != DType::f32 && c.dtype() != DType::bf16)
    detail::fail(op, "the CUDA output must be f32 or bf16, got " + std::string(dtype_name(c.dtype())));
  if (c.numel() == 0) return;
  detail::dispatch(op, a, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>) {
      cpu::matmul(a.data<T>(), b.data<T>(), c.data<T>(), g.m, g.n, g.k, trans_a, trans_b, alpha, beta, g.batch,
                  g.stride_a, g.stride_b, g.stride_c);
    } else {
      auto run = [&](auto* out) {
        cuda::matmul(a.data<T>(), b.data<T>(), out, g.m, g.n, g.k, trans_a, trans_b, alpha, beta, g.batch, g.stride_a,
                     g.stride_b, g.stride_c, cuda::current_stream());
      };
      if (c.dtype() == DType::f32) run(c.data<float>());
      else run(c.data<bf16>());
    }
  });
}

// alpha op(A) op(B) as a new tensor of dtype out_dtype (default: A's).
inline Tensor matmul(const Tensor& a, const Tensor& b, bool trans_a = false, bool trans_b = false, float alpha = 1.f,
                     std::optional<DType> out_dtype = std::nullopt) {
  detail::check_defined("matmul", a, "a");
  detail::check_defined("matmul", b, "b");
  const detail::GemmShape g = detail::gemm_shape("matmul", a, b, trans_a, trans_b);
  Tensor c = Tensor::empty(g.out, out_dtype.value_or(a.dtype()), a.device());
  matmul_into(c, a, b, trans_a, trans_b, alpha, 0.f);
  return c;
}

}  // namespace qlora::ops
