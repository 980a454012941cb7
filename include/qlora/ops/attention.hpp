#pragma once
// Causal grouped-query attention. q (batch, tq, hq, d); k, v (batch, tk, hkv, d) with tk >= tq: query t is at
// absolute position tk - tq + t (a KV cache of tk - tq earlier tokens) and sees keys up to it.
// Two kernels behind one contract (docs/ops.md): the plain one (one row of scores at a time, any dtype and
// head dim) and the fused FlashAttention-2 one (CUDA: bf16, head dims 64 and 128, 16-byte aligned rows).

#include <cstdlib>
#include <string>

#include "qlora/cpu/attention.hpp"
#include "qlora/cpu/flash_attention.hpp"
#include "qlora/cuda/attention.hpp"
#include "qlora/cuda/flash_attention.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

// Which kernel computes attention. automatic: flash on CUDA where it applies, else plain; the environment
// variable QLORA_ATTENTION=plain (read once per process) turns automatic into plain, to compare the two.
// plain: always the row-by-row kernels. flash: the tiled kernels, an error where they do not apply on CUDA;
// on the CPU, the tiled CPU twin (64 x 64 tiles).
enum class AttentionKernel { automatic, plain, flash };

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

// QLORA_ATTENTION: unset, "auto" or "flash" (flash where it applies), or "plain".
inline AttentionKernel attention_kernel_from_environment() {
  static const AttentionKernel kernel = [] {
    const char* value = std::getenv("QLORA_ATTENTION");
    const std::string name = value ? value : "auto";
    if (name == "plain") return AttentionKernel::plain;
    if (name == "auto" || name == "flash" || name.empty()) return AttentionKernel::automatic;
    throw Error("QLORA_ATTENTION=" + name + ": expected plain, flash or auto");
  }();
  return kernel;
}

// Whether to run the tiled kernels for these tensors (an error when flash is asked for and cannot run).
inline bool use_flash_attention(std::string_view op, AttentionKernel kernel, const AttentionDims& a,
                                std::initializer_list<const Tensor*> tensors) {
  if (kernel == AttentionKernel::automatic) kernel = attention_kernel_from_environment();
  if (kernel == AttentionKernel::plain) return false;
  const Tensor& q = **tensors.begin();
  if (q.device().is_cpu()) return kernel == AttentionKernel::flash;  // the plain kernel is the CPU reference
  bool aligned = true;
  for (const Tensor* t : tensors) aligned = aligned && cuda::flash_attention_supports(a.d, {t->data()});
  const bool applies = q.dtype() == DType::bf16 && aligned;
  if (kernel == AttentionKernel::flash && !applies)
    fail(op, "the flash kernel needs bf16 tensors, head dim 64 or 128 and 16-byte aligned rows; got " +
                 std::string(dtype_name(q.dtype())) + ", head dim " + std::to_string(a.d));
  return applies;
}
}  // namespace detail

inline AttentionResult attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                 AttentionKernel kernel = AttentionKernel::automatic) {
  constexpr std::string_view op = "attention";
  const detail::AttentionDims a = detail::attention_dims(op, q, k, v);
  AttentionResult r{Tensor::empty(q.shape(), q.dtype(), q.device()),
                    Tensor::empty({a.batch, a.hq, a.tq}, detail::accum_dtype(q), q.device())};
  const bool flash = detail::use_flash_attention(op, kernel, a, {&q, &k, &v, &r.out});
  detail::dispatch(op, q, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>) {
      if (flash) {
        cpu::flash_attention_forward(q.data<T>(), k.data<T>(), v.data<T>(), r.out.data<T>(), r.lse.data<A>(), a.batch,
                                     a.tq, a.tk, a.hq, a.hkv, a.d);
        return;
      }
      cpu::attention_forward(q.data<T>(), k.data<T>(), v.data<T>(), r.out.data<T>(), r.lse.data<A>(), a.batch, a.tq, a.tk,
                             a.hq, a.hkv, a.d);
    } else {
      if constexpr (std::is_same_v<T, bf16>) {
        if (flash) {
          cuda::flash_attention_forward(q.data<T>(), k.data<T>(), v.data<T>(), r.out.data<T>(), r.lse.data<A>(),
                                        a.batch, a.tq, a.tk, a.hq, a.hkv, a.d, cuda::current_stream());
          return;
        }
      }
      cuda::attention_forward(q.data<T>(), k.data<T>(), v.data<T>(), r.out.data<T>(), r.lse.data<A>(), a.batch, a.tq,
                              a.tk, a.hq, a.hkv, a.d, cuda::current_stream());
    }
  });
  return r;
}

inline AttentionGrads attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const AttentionResult& fwd,
                                         const Tensor& dout, AttentionKernel kernel = AttentionKernel::automatic) {
  constexpr std::string_view op = "attention_backward";
  const detail::AttentionDims a = detail::attention_dims(op, q, k, v);
  detail::check_same(op, {{&q, "q"}, {&fwd.out, "out"}, {&dout, "dout"}});
  detail::check_shape(op, fwd.out, q.shape(), "out");
  detail::check_shape(op, dout, q.shape(), "dout");
  detail::check_shape(op, fwd.lse, Shape{a.batch, a.hq, a.tq}, "lse");
  detail::check_dtype(op, fwd.lse, detail::accum_dtype(q), "lse");
  // dk and dv accumulate over the query heads of a group (into f32 on CUDA): zeroed accumulators first.
  AttentionGrads g{Tensor::empty(q.shape(), q.dtype(), q.device()),
                   Tensor::zeros(k.shape(), detail::accum_dtype(k), k.device()),
                   Tensor::zeros(v.shape(), detail::accum_dtype(v), v.device())};
  const bool flash = detail::use_flash_attention(op, kernel, a, {&q, &k, &v, &fwd.out, &dout, &g.dq});
  detail::dispatch(op, q, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>) {
      if (flash) {
        cpu::flash_attention_backward(q.data<T>(), k.data<T>(), v.data<T>(), fwd.out.data<T>(), fwd.lse.data<A>(),
                                      dout.data<T>(), g.dq.data<T>(), g.dk.data<A>(), g.dv.data<A>(), a.batch, a.tq,
                                      a.tk, a.hq, a.hkv, a.d);
        return;
      }
      cpu::attention_backward(q.data<T>(), k.data<T>(), v.data<T>(), fwd.out.data<T>(), fwd.lse.data<A>(),
                              dout.data<T>(), g.dq.data<T>(), g.dk.data<A>(), g.dv.data<A>(), a.batch, a.tq, a.tk, a.hq,
                              a.hkv, a.d);
    } else {
      if constexpr (std::is_same_v<T, bf16>) {
        if (flash) {
          Tensor workspace = Tensor::empty({cuda::flash_attention_backward_workspace(a.batch, a.tq, a.hq, a.d)},
                                           DType::f32, q.device());
          cuda::flash_attention_backward(q.data<T>(), k.data<T>(), v.data<T>(), fwd.out.data<T>(), fwd.lse.data<A>(),
                                         dout.data<T>(), g.dq.data<T>(), g.dk.data<A>(), g.dv.data<A>(),
                                         workspace.data<float>(), a.batch, a.tq, a.tk, a.hq, a.hkv, a.d,
                                         cuda::current_stream());
          return;
        }
      }
      cuda::attention_backward(q.data<T>(), k.data<T>(), v.data<T>(), fwd.out.data<T>(), fwd.lse.data<A>(),
                               dout.data<T>(), g.dq.data<T>(), g.dk.data<A>(), g.dv.data<A>(), a.batch, a.tq, a.tk,
                               a.hq, a.hkv, a.d, cuda::current_stream());
    }
  });
  g.dk = g.dk.to(k.dtype());
  g.dv = g.dv.to(v.dtype());
  return g;
}

}  // namespace qlora::ops
