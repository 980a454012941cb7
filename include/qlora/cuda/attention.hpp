#pragma once
// CUDA causal grouped-query attention, plain version (kernel layer; CPU twin: qlora/cpu/attention.hpp).
// q: (batch, tq, hq, d); k, v: (batch, tk, hkv, d) with tk >= tq; query t sits at absolute position tk - tq + t
// (KV cache) and attends keys 0 .. tk - tq + t; query head h reads kv head h / (hq / hkv); scale = 1/sqrt(d).
// out: (batch, tq, hq, d); lse: (batch, hq, tq) f32 logsumexp of the scaled scores. T in {float, qlora::bf16}.
// Limits of this plain path: d <= 256; tk bounded by shared memory (about 40k keys on A100, 55k on H100).
// Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

template <class T>
void attention_forward(const T* q, const T* k, const T* v, T* out, float* lse, std::int64_t batch, std::int64_t tq,
                       std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d, Stream stream);

// P = exp(S - lse), dP = dO V^T, D_i = sum_c dO_ic O_ic, dS = P * (dP - D):
// dq = scale dS K (OVERWRITTEN);  dk += scale dS^T Q,  dv += P^T dO  (ACCUMULATE, f32 atomics).
template <class T>
void attention_backward(const T* q, const T* k, const T* v, const T* out, const float* lse, const T* dout, T* dq,
                        float* dk, float* dv, std::int64_t batch, std::int64_t tq, std::int64_t tk, std::int64_t hq,
                        std::int64_t hkv, std::int64_t d, Stream stream);

}  // namespace qlora::cuda
