#pragma once
// CPU twin of cuda/cross_entropy.cu: per-row softmax cross-entropy over a vocabulary, whole or in chunks of
// the vocabulary.
// logits: (rows, vocab); targets: (rows) int32, where ignore_index (-100, PyTorch's default) marks
// rows that carry no loss (prompt tokens, padding).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

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

// Chunked over the vocabulary (the logits of columns [col_begin, col_begin + chunk_cols), one chunk at a
// time, so the full rows x vocab logits never exist): the logsumexp is carried as
// running per-row statistics and merged chunk by chunk,
//   M' = max(M, m_c),   S' = S exp(M - M') + s_c exp(m_c - M'),   m_c, s_c: the chunk's max and sum exp(l - m_c)
// (the online softmax of Milakov & Gimelshein 2018), and lse = M + log S once every chunk has been seen.
// Before the first chunk: running_max = -inf, running_sum = 0 (cross_entropy_chunk_start).
template <class T>
void cross_entropy_chunk_start(T* running_max, T* running_sum, T* target_logit, std::int64_t rows) {
  for (std::int64_t r = 0; r < rows; ++r) {
    running_max[r] = -std::numeric_limits<T>::infinity();
    running_sum[r] = T(0);
    target_logit[r] = T(0);
  }
}

// Merges the chunk logits (rows, chunk_cols) into the running statistics; a row whose target falls in this
// chunk records the target's logit.
template <class T>
void cross_entropy_chunk_forward(const T* logits, const std::int32_t* targets, T* running_max, T* running_sum,
                                 T* target_logit, std::int64_t rows, std::int64_t chunk_cols, std::int64_t col_begin) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * chunk_cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* lr = logits + r * chunk_cols;
    T chunk_max = lr[0];
    for (std::int64_t j = 1; j < chunk_cols; ++j) chunk_max = std::max(chunk_max, lr[j]);
    double chunk_sum = 0;
    for (std::int64_t j = 0; j < chunk_cols; ++j) chunk_sum += std::exp(double(lr[j] - chunk_max));
    const T merged_max = std::max(running_max[r], chunk_max);
    running_sum[r] = T(double(running_sum[r]) * std::exp(double(running_max[r] - merged_max)) +
                       chunk_sum * std::exp(double(chunk_max - merged_max)));
    running_max[r] = merged_max;
    const std::int64_t t = std::int64_t(targets[r]) - col_begin;
    if (targets[r] != ignore_index && t >= 0 && t < chunk_cols) target_logit[r] = lr[t];
  }
}

// lse = M + log S; loss = lse - target logit, or 0 for an ignored row.
template <class T>
void cross_entropy_chunk_finish(const T* running_max, const T* running_sum, const T* target_logit,
                                const std::int32_t* targets, T* losses, T* lse, std::int64_t rows) {
  for (std::int64_t r = 0; r < rows; ++r) {
    lse[r] = running_max[r] + T(std::log(double(running_sum[r])));
    losses[r] = targets[r] == ignore_index ? T(0) : lse[r] - target_logit[r];
  }
}

// The backward of one vocabulary chunk: d loss_r / d logits[r,j] = softmax_j - [j == target], with the
// row's full lse (from the forward over every chunk); the caller's upstream gradient is the single
// scalar grad_scale (1/num_valid for a mean). Each element is read once and then written, so dlogits
// may alias logits: a chunk of logits becomes its own gradient without a second buffer.
template <class T>
void cross_entropy_chunk_backward(const T* logits, const std::int32_t* targets, const T* lse, float grad_scale,
                                  T* dlogits, std::int64_t rows, std::int64_t chunk_cols, std::int64_t col_begin) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(rows * chunk_cols))
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* lr = logits + r * chunk_cols;
    T* dr = dlogits + r * chunk_cols;
    const std::int32_t target = targets[r];
    if (target == ignore_index) {
      for (std::int64_t j = 0; j < chunk_cols; ++j) dr[j] = T(0);
      continue;
    }
    for (std::int64_t j = 0; j < chunk_cols; ++j) {
      const T p = std::exp(lr[j] - lse[r]);
      dr[j] = T(grad_scale) * (j + col_begin == target ? p - T(1) : p);
    }
  }
}

// The whole vocabulary as one chunk.
template <class T>
void cross_entropy_backward(const T* logits, const std::int32_t* targets, const T* lse, float grad_scale,
                            T* dlogits, std::int64_t rows, std::int64_t vocab) {
  cross_entropy_chunk_backward(logits, targets, lse, grad_scale, dlogits, rows, vocab, 0);
}

}  // namespace qlora::cpu
