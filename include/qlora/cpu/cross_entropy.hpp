#pragma once
// CPU twin of cuda/cross_entropy.cu: per-row softmax cross-entropy over a vocabulary.
// logits: (rows, vocab); targets: (rows) int32, where ignore_index (-100, PyTorch's default) marks
// rows that carry no loss (prompt tokens, padding).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

inline constexpr std::int32_t ignore_index = -100;

// lse_r = logsumexp_j logits[r,j] = max + log sum_j exp(logits[r,j] - max)  (stable: exponents <= 0);
// loss_r = -log softmax(logits_r)[target] = lse_r - logits[r, target], or 0 for an ignored row.
template <class T>
void cross_entropy_forward(const T* logits, const std::int32_t* targets, T* losses, T* lse, std::int64_t rows,
                           std::int64_t vocab) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * vocab))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* lr = logits + r * vocab;
    T max = lr[0];
    for (std::int64_t j = 1; j < vocab; ++j) max = std::max(max, lr[j]);
    double sum = 0;
    for (std::int64_t j = 0; j < vocab; ++j) sum += std::exp(double(lr[j] - max));
    lse[r] = max + T(std::log(sum));
    losses[r] = targets[r] == ignore_index ? T(0) : lse[r] - lr[targets[r]];
  }
}

// d loss_r / d logits[r,j] = softmax_j - [j == target]; the caller's upstream gradient is the single
// scalar grad_scale (1/num_valid for a mean). Each element is read once and then written, so dlogits
// may alias logits: a chunk of logits becomes its own gradient without a second buffer.
template <class T>
void cross_entropy_backward(const T* logits, const std::int32_t* targets, const T* lse, float grad_scale,
                            T* dlogits, std::int64_t rows, std::int64_t vocab) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * vocab))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* lr = logits + r * vocab;
    T* dr = dlogits + r * vocab;
    const std::int32_t target = targets[r];
    if (target == ignore_index) {
      for (std::int64_t j = 0; j < vocab; ++j) dr[j] = T(0);
      continue;
    }
    for (std::int64_t j = 0; j < vocab; ++j) {
      const T p = std::exp(lr[j] - lse[r]);
      dr[j] = T(grad_scale) * (j == target ? p - T(1) : p);
    }
  }
}

}  // namespace qlora::cpu
