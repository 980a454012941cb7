#pragma once
// CUDA cross-entropy over a vocabulary (kernel layer; CPU twin: qlora/cpu/cross_entropy.hpp).
// logits: (rows, vocab), T in {float, qlora::bf16}; targets: (rows) int32, -100 = ignored (a target outside
// [0, vocab) is treated as ignored too, so the kernel never reads out of bounds); losses, lse: (rows) f32.
// Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// lse[r] = logsumexp_j logits[r,j];  losses[r] = lse[r] - logits[r, target[r]]  (0 for ignored rows)
template <class T>
void cross_entropy_forward(const T* logits, const std::int32_t* targets, float* losses, float* lse, std::int64_t rows,
                           std::int64_t vocab, Stream stream);

// dlogits[r,j] = grad_scale * (exp(logits[r,j] - lse[r]) - [j == target[r]]);  the whole row 0 for ignored rows.
// dlogits MAY ALIAS logits (the chunk of logits becomes its own gradient).
template <class T>
void cross_entropy_backward(const T* logits, const std::int32_t* targets, const float* lse, float grad_scale,
                            T* dlogits, std::int64_t rows, std::int64_t vocab, Stream stream);

}  // namespace qlora::cuda
