#pragma once
// CUDA embedding lookup and its gradient (kernel layer; CPU twin: qlora/cpu/embedding.hpp).
// table: (vocab, dim), T in {float, qlora::bf16}; ids: (n) int32; y, dy: (n, dim). Ids outside [0, vocab) are
// skipped (their output row is left untouched; the ops layer validates and reports them). Device pointers.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// y[t,:] = table[ids[t],:]
template <class T>
void embedding_forward(const T* table, const std::int32_t* ids, T* y, std::int64_t n, std::int64_t vocab,
                       std::int64_t dim, Stream stream);

// dtable[ids[t],:] += dy[t,:]   (ACCUMULATES with f32 atomics)
template <class T>
void embedding_backward(const T* dy, const std::int32_t* ids, float* dtable, std::int64_t n, std::int64_t vocab,
                        std::int64_t dim, Stream stream);

}  // namespace qlora::cuda
