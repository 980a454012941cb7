#pragma once
// CUDA cross-entropy over a vocabulary, whole or chunk by chunk (kernel layer; CPU twin:
// qlora/cpu/cross_entropy.hpp). logits: (rows, vocab), or a chunk (rows, chunk_cols) holding columns
// [col_begin, col_begin + chunk_cols), T in {float, qlora::bf16}; targets: (rows) int32, -100 = ignored (a
// target outside [0, vocab) is treated as ignored too, so the kernel never reads out of bounds); losses, lse
// and the running statistics: (rows) f32. Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// lse[r] = logsumexp_j logits[r,j];  losses[r] = lse[r] - logits[r, target[r]]  (0 for ignored rows).
// One pass over the logits (online max and sum).
template <class T>
void cross_entropy_forward(const T* logits, const std::int32_t* targets, float* losses, float* lse, std::int64_t rows,
                           std::int64_t vocab, Stream stream);

// dlogits[r,j] = grad_scale * (exp(logits[r,j] - lse[r]) - [j == target[r]]);  the whole row 0 for ignored rows.
// dlogits MAY ALIAS logits (the chunk of logits becomes its own gradient).
template <class T>
void cross_entropy_backward(const T* logits, const std::int32_t* targets, const float* lse, float grad_scale,
                            T* dlogits, std::int64_t rows, std::int64_t vocab, Stream stream);

// ---- chunked over the vocabulary: start, forward per chunk, finish; then backward per chunk -------------
// running_max = -inf, running_sum = 0, target_logit = 0.
void cross_entropy_chunk_start(float* running_max, float* running_sum, float* target_logit, std::int64_t rows,
                               Stream stream);
// Merges the chunk's (max, sum exp) into the running statistics; records the target's logit when it is here.
template <class T>
void cross_entropy_chunk_forward(const T* logits, const std::int32_t* targets, float* running_max, float* running_sum,
                                 float* target_logit, std::int64_t rows, std::int64_t chunk_cols,
                                 std::int64_t col_begin, std::int64_t vocab, Stream stream);
// lse = running_max + log(running_sum);  losses = lse - target_logit (0 for ignored rows).
void cross_entropy_chunk_finish(const float* running_max, const float* running_sum, const float* target_logit,
                                const std::int32_t* targets, float* losses, float* lse, std::int64_t rows,
                                std::int64_t vocab, Stream stream);
// cross_entropy_backward restricted to the chunk's columns, with the rows' full lse. dlogits MAY ALIAS logits.
template <class T>
void cross_entropy_chunk_backward(const T* logits, const std::int32_t* targets, const float* lse, float grad_scale,
                                  T* dlogits, std::int64_t rows, std::int64_t chunk_cols, std::int64_t col_begin,
                                  std::int64_t vocab, Stream stream);

}  // namespace qlora::cuda
