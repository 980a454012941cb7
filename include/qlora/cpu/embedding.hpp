#pragma once
// CPU twin of cuda/embedding.cu: token embedding lookup. table: (vocab, dim); ids: (n) int32; y: (n, dim).
// Ids outside [0, vocab) are skipped (their row of y, or their gradient, is left untouched): the ops
// layer validates ids and reports bad ones, the kernels only stay in bounds.

#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

template <class T>
void embedding_forward(const T* table, const std::int32_t* ids, T* y, std::int64_t n, std::int64_t vocab,
                       std::int64_t dim) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n * dim))
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t id = ids[t];
    if (id < 0 || id >= vocab) continue;
    for (std::int64_t j = 0; j < dim; ++j) y[t * dim + j] = table[id * dim + j];
  }
}

// dtable[ids[t], :] += dy[t, :] (accumulates). Sequential over tokens: a repeated id adds into the
// same row, which the GPU does with atomics and a parallel loop here would race on.
template <class T>
void embedding_backward(const T* dy, const std::int32_t* ids, T* dtable, std::int64_t n, std::int64_t vocab,
                        std::int64_t dim) {
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t id = ids[t];
    if (id < 0 || id >= vocab) continue;
    for (std::int64_t j = 0; j < dim; ++j) dtable[id * dim + j] += dy[t * dim + j];
  }
}

}  // namespace qlora::cpu
