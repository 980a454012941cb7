#pragma once
// Causal grouped-query attention, the plain correct version (one row of scores at a time; the fused
// fast kernel is a later layer of work). q (batch, tq, hq, d); k, v (batch, tk, hkv, d) with tk >= tq:
// query t is at absolute position tk - tq + t (a KV cache of tk - tq earlier tokens) and sees keys up to it.

#include "qlora/cpu/attention.hpp"
#include "qlora/cuda/attention.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

struct AttentionResult {
  Tensor out;  // (batch, tq, hq, d)
  Tensor lse;  // (batch, hq, tq): logsumexp of each row of scaled scores, for the backward
};

struct AttentionGrads {
  Tensor dq, dk, dv;  // shaped and typed as q, k, v
};

namespace detail {
struct AttentionDims {
  std::int64_t batch, tq, tk, hq, hkv, d;
};
inline AttentionDims attention_dims(std::string_view op, const Tensor& q, const Tensor& k, const Tensor& v) {
  check_same(op, {{&q, "q"}, {&k, "k"}, {&v, "v"}});
  if (q.rank() != 4 || k.rank() != 4)
    fail(op, "q and k must be (batch, seq, heads, head_dim), got " + q.shape().str() + " and " + k.shape().str());
  check_shape(op, v, k.shape(), "v");
  const AttentionDims a{q.dim(0), q.dim(1), k.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  if (k.dim(0) != a.batch || k.dim(3) != a.d)
    fail(op, "k " + k.shape().str() + " does not match q " + q.shape().str() + " in batch or head_dim");
  if (a.tk < a.tq) fail(op, "fewer keys (" + std::to_string(a.tk) + ") than queries (" + std::to_string(a.tq) + ")");
  if (a.hkv == 0 || a.hq % a.hkv != 0)
    fail(op, std::to_string(a.hq) + " query heads cannot share " + std::to_string(a.hkv) + " key/value heads evenly");
  return a;
}
}  // namespace detail

inline AttentionResult attention(const Tensor& q, const Tensor& k, const Tensor& v) {
  constexpr std::string_view op = "attention";
  const detail::AttentionDims a = detail::attention_dims(op, q, k, v);
  AttentionResult r{Tensor::empty(q.shape(), q.dtype(), q.device()),
                    Tensor::empty({a.batch, a.hq, a.tq}, detail::accum_dtype(q), q.device())};
  detail::dispatch(op, q, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::attention_forward(q.data<T>(), k.data<T>(), v.data<T>(), r.out.data<T>(), r.lse.data<A>(), a.batch, a.tq, a.tk,
                             a.hq, a.hkv, a.d);
    else
      cuda::attention_forward(q.data<T>(), k.data<T>(), v.data<T>(), r.out.data<T>(), r.lse.data<A>(), a.batch, a.tq,
                              a.tk, a.hq, a.hkv, a.d, cuda::current_stream());
  });
  return r;
}

inline AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionResult& fwd,
                                         const Tensor& dout) {
  constexpr std::string_view op = "attention_backward";
  const detail::AttentionDims a = detail::attention_dims(op, q, k, v);
  detail::check_same(op, {{&q, "q"}, {&fwd.out, "out"}, {&dout, "dout"}});
  detail::check_shape(op, fwd.out, q.shape(), "out");
  detail::check_shape(op, dout, q.shape(), "dout");
  detail::check_shape(op, fwd.lse, Shape{a.batch, a.hq, a.tq}, "lse");
  detail::check_dtype(op, fwd.lse, detail::accum_dtype(q), "lse");
  // dk and dv accumulate over the query heads of a group (atomics on CUDA): zeroed accumulators first.
  AttentionGrads g{Tensor::empty(q.shape(), q.dtype(), q.device()),
                   Tensor::zeros(k.shape(), detail::accum_dtype(k), k.device()),
                   Tensor::zeros(v.shape(), detail::accum_dtype(v), v.device())};
  detail::dispatch(op, q, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::attention_backward(q.data<T>(), k.data<T>(), v.data<T>(), fwd.out.data<T>(), fwd.lse.data<A>(),
                              dout.data<T>(), g.dq.data<T>(), g.dk.data<A>(), g.dv.data<A>(), a.batch, a.tq, a.tk, a.hq,
                              a.hkv, a.d);
    else
      cuda::attention_backward(q.data<T>(), k.data<T>(), v.data<T>(), fwd.out.data<T>(), fwd.lse.data<A>(),
                               dout.data<T>(), g.dq.data<T>(), g.dk.data<A>(), g.dv.data<A>(), a.batch, a.tq, a.tk,
                               a.hq, a.hkv, a.d, cuda::current_stream());
  });
  g.dk = g.dk.to(k.dtype());
  g.dv = g.dv.to(v.dtype());
  return g;
}

}  // namespace qlora::ops
