#pragma once
// CUDA fused causal grouped-query attention, FlashAttention-2 (kernel layer; kernels in
// cuda/ops/flash_attention.cu, CPU twin qlora/cpu/flash_attention.hpp). The same contract as the plain kernels
// of qlora/cuda/attention.hpp: q (batch, tq, hq, d); k, v (batch, tk, hkv, d) with tk >= tq; query t sits at
// absolute position tk - tq + t (KV cache) and sees keys 0 .. tk - tq + t; query head h reads kv head
// h / (hq / hkv); scale = 1/sqrt(d); out (batch, tq, hq, d); lse (batch, hq, tq) f32.
// bf16 storage, f32 accumulation, head dims 64 and 128; every pointer 16-byte aligned (rows are moved as
// 16-byte pieces). Anything else is the plain kernels' (ops::attention chooses, docs/ops.md). Device pointers.

#include <cstdint>
#include <initializer_list>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// Whether the flash kernels take this head dim and these pointers (the checks the launchers enforce).
inline bool flash_attention_supports(std::int64_t d, std::initializer_list<const void*> pointers) {
  if (d != 64 && d != 128) return false;
  for (const void* p : pointers)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  return true;
}

void flash_attention_forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, std::int64_t batch,
                             std::int64_t tq, std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
                             Stream stream);

// f32 elements of the backward's scratch: dq's f32 accumulator (batch tq hq d) and D = rowsum(dO * O)
// (batch hq tq).
inline std::int64_t flash_attention_backward_workspace(std::int64_t batch, std::int64_t tq, std::int64_t hq,
                                                       std::int64_t d) {
  return batch * tq * hq * d + batch * hq * tq;
}

// P = exp(S - lse), D = rowsum(dO * O), dS = P * (dO V^T - D):
// dq = scale dS K (OVERWRITTEN);  dk += scale dS^T Q,  dv += P^T dO  (ACCUMULATE into f32, no atomics).
// `workspace` holds flash_attention_backward_workspace(...) floats; its contents on entry do not matter.
void flash_attention_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* out, const float* lse,
                              const bf16* dout, bf16* dq, float* dk, float* dv, float* workspace, std::int64_t batch,
                              std::int64_t tq, std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
                              Stream stream);

}  // namespace qlora::cuda
