#pragma once
// Cross-entropy over the vocabulary with ignore index -100 (prompt tokens, padding), whole or one vocabulary
// chunk at a time (running logsumexp statistics merged per chunk), and the chunked LM-head loss that never
// holds the full (tokens x vocab) logits: for each chunk of rows (and, optionally, of the vocabulary) it
// computes the logits, the loss, the logits' gradient in place, and that chunk's contributions to dhidden
// and dweight.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "qlora/cpu/cross_entropy.hpp"
#include "qlora/cuda/cross_entropy.hpp"
#include "qlora/ops/dispatch.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/ops/reduce.hpp"

namespace qlora::ops {

inline constexpr std::int32_t kIgnoreIndex = cpu::ignore_index;  // -100, as PyTorch

struct CrossEntropyResult {
  Tensor losses;  // (rows): -log p(target), 0 for ignored rows
  Tensor lse;     // (rows): logsumexp of the logits, kept for the backward
};

namespace detail {
// targets: (rows) i32 on `device`, each in [0, vocab) or -100 (checked when they are on the host).
inline void check_targets(std::string_view op, const Tensor& targets, std::int64_t rows, std::int64_t vocab,
                          Device device) {
  check_defined(op, targets, "targets");
  check_shape(op, targets, Shape{rows}, "targets");
  check_dtype(op, targets, DType::i32, "targets");
  check_device(op, targets, device, "targets");
  if (!targets.device().is_cpu()) return;  // device targets are not read back (see embedding.hpp)
  const std::int32_t* t = targets.data<std::int32_t>();
  for (std::int64_t r = 0; r < targets.numel(); ++r)
    if (t[r] != kIgnoreIndex && (t[r] < 0 || t[r] >= vocab))
      fail(op, "target " + std::to_string(t[r]) + " at row " + std::to_string(r) + " is outside the vocabulary [0, " +
                   std::to_string(vocab) + ") and is not the ignore index -100");
}

inline void check_logits_targets(std::string_view op, const Tensor& logits, const Tensor& targets) {
  check_defined(op, logits, "logits");
  if (logits.rank() != 2) fail(op, "logits must be (rows, vocab), got " + logits.shape().str());
  check_targets(op, targets, logits.dim(0), logits.dim(1), logits.device());
}
}  // namespace detail

inline CrossEntropyResult cross_entropy(const Tensor& logits, const Tensor& targets) {
  constexpr std::string_view op = "cross_entropy";
  detail::check_logits_targets(op, logits, targets);
  const std::int64_t rows = logits.dim(0), vocab = logits.dim(1);
  CrossEntropyResult r{Tensor::empty({rows}, detail::accum_dtype(logits), logits.device()),
                       Tensor::empty({rows}, detail::accum_dtype(logits), logits.device())};
  detail::dispatch(op, logits, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::cross_entropy_forward(logits.data<T>(), targets.data<std::int32_t>(), r.losses.data<A>(), r.lse.data<A>(),
                                 rows, vocab);
    else
      cuda::cross_entropy_forward(logits.data<T>(), targets.data<std::int32_t>(), r.losses.data<A>(), r.lse.data<A>(),
                                  rows, vocab, cuda::current_stream());
  });
  return r;
}

// dlogits = grad_scale * (softmax(logits) - onehot(target)), zero rows for ignored targets.
// dlogits may be logits itself (the gradient overwrites the logits, saving a buffer).
inline void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, float grad_scale,
                                   Tensor& dlogits) {
  constexpr std::string_view op = "cross_entropy_backward";
  detail::check_logits_targets(op, logits, targets);
  detail::check_same(op, {{&logits, "logits"}, {&dlogits, "dlogits"}});
  detail::check_shape(op, dlogits, logits.shape(), "dlogits");
  detail::check_shape(op, lse, Shape{logits.dim(0)}, "lse");
  detail::check_dtype(op, lse, detail::accum_dtype(logits), "lse");
  const std::int64_t rows = logits.dim(0), vocab = logits.dim(1);
  detail::dispatch(op, logits, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::cross_entropy_backward(logits.data<T>(), targets.data<std::int32_t>(), lse.data<A>(), grad_scale,
                                  dlogits.data<T>(), rows, vocab);
    else
      cuda::cross_entropy_backward(logits.data<T>(), targets.data<std::int32_t>(), lse.data<A>(), grad_scale,
                                   dlogits.data<T>(), rows, vocab, cuda::current_stream());
  });
}

// ---- one vocabulary chunk at a time ------------------------------------------------------------------
// start, then chunk() for every chunk of columns (any order, each column once), then finish(): the same
// losses and lse as cross_entropy over the whole rows, without the whole rows ever existing.
struct CrossEntropyChunks {
  Tensor running_max, running_sum, target_logit;  // (rows), accum dtype
  std::int64_t vocab = 0;
};

inline CrossEntropyChunks cross_entropy_chunk_start(const Tensor& targets, std::int64_t vocab, const Tensor& like) {
  constexpr std::string_view op = "cross_entropy_chunk_start";
  detail::check_defined(op, targets, "targets");
  detail::check_dtype(op, targets, DType::i32, "targets");
  if (targets.rank() != 1) detail::fail(op, "targets must be (rows), got " + targets.shape().str());
  if (vocab <= 0) detail::fail(op, "vocab must be positive, got " + std::to_string(vocab));
  const std::int64_t rows = targets.dim(0);
  const DType a = detail::accum_dtype(like);
  CrossEntropyChunks c{Tensor::empty({rows}, a, like.device()), Tensor::empty({rows}, a, like.device()),
                       Tensor::empty({rows}, a, like.device()), vocab};
  detail::dispatch(op, like, [&](auto t, auto backend) {
    using A = detail::accum_t<decltype(t), decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::cross_entropy_chunk_start(c.running_max.data<A>(), c.running_sum.data<A>(), c.target_logit.data<A>(), rows);
    else
      cuda::cross_entropy_chunk_start(c.running_max.data<A>(), c.running_sum.data<A>(), c.target_logit.data<A>(), rows,
                                      cuda::current_stream());
  });
  return c;
}

namespace detail {
inline void check_chunk(std::string_view op, const Tensor& logits, const Tensor& targets, std::int64_t col_begin,
                        std::int64_t vocab) {
  check_defined(op, logits, "logits");
  if (logits.rank() != 2 || logits.dim(1) <= 0)
    fail(op, "a logits chunk must be (rows, chunk_cols) with chunk_cols > 0, got " + logits.shape().str());
  if (col_begin < 0 || col_begin + logits.dim(1) > vocab)
    fail(op, "chunk columns [" + std::to_string(col_begin) + ", " + std::to_string(col_begin + logits.dim(1)) +
                 ") lie outside the vocabulary [0, " + std::to_string(vocab) + ")");
  check_targets(op, targets, logits.dim(0), vocab, logits.device());
}
}  // namespace detail

// Merges the logits of columns [col_begin, col_begin + logits.dim(1)) into the running statistics.
inline void cross_entropy_chunk(CrossEntropyChunks& c, const Tensor& logits, const Tensor& targets,
                                std::int64_t col_begin) {
  constexpr std::string_view op = "cross_entropy_chunk";
  detail::check_chunk(op, logits, targets, col_begin, c.vocab);
  detail::check_shape(op, c.running_max, Shape{logits.dim(0)}, "running statistics");
  detail::check_dtype(op, c.running_max, detail::accum_dtype(logits), "running statistics");
  const std::int64_t rows = logits.dim(0), cols = logits.dim(1);
  detail::dispatch(op, logits, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::cross_entropy_chunk_forward(logits.data<T>(), targets.data<std::int32_t>(), c.running_max.data<A>(),
                                       c.running_sum.data<A>(), c.target_logit.data<A>(), rows, cols, col_begin);
    else
      cuda::cross_entropy_chunk_forward(logits.data<T>(), targets.data<std::int32_t>(), c.running_max.data<A>(),
                                        c.running_sum.data<A>(), c.target_logit.data<A>(), rows, cols, col_begin,
                                        c.vocab, cuda::current_stream());
  });
}

inline CrossEntropyResult cross_entropy_chunk_finish(const CrossEntropyChunks& c, const Tensor& targets) {
  constexpr std::string_view op = "cross_entropy_chunk_finish";
  detail::check_shape(op, targets, c.running_max.shape(), "targets");
  const std::int64_t rows = targets.dim(0);
  CrossEntropyResult r{Tensor::empty({rows}, c.running_max.dtype(), c.running_max.device()),
                       Tensor::empty({rows}, c.running_max.dtype(), c.running_max.device())};
  // The statistics' own dtype picks the kernel (f32 on CUDA whatever the logits were).
  detail::dispatch(op, c.running_max, [&](auto t, auto backend) {
    using A = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::cross_entropy_chunk_finish(c.running_max.data<A>(), c.running_sum.data<A>(), c.target_logit.data<A>(),
                                      targets.data<std::int32_t>(), r.losses.data<A>(), r.lse.data<A>(), rows);
    else if constexpr (std::is_same_v<A, float>)
      cuda::cross_entropy_chunk_finish(c.running_max.data<A>(), c.running_sum.data<A>(), c.target_logit.data<A>(),
                                       targets.data<std::int32_t>(), r.losses.data<A>(), r.lse.data<A>(), rows, c.vocab,
                                       cuda::current_stream());
  });
  return r;
}

// cross_entropy_backward for the chunk of columns [col_begin, col_begin + logits.dim(1)), with the rows' full
// lse (from cross_entropy_chunk_finish). dlogits may be logits itself.
inline void cross_entropy_chunk_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                         float grad_scale, Tensor& dlogits, std::int64_t col_begin, std::int64_t vocab) {
  constexpr std::string_view op = "cross_entropy_chunk_backward";
  detail::check_chunk(op, logits, targets, col_begin, vocab);
  detail::check_same(op, {{&logits, "logits"}, {&dlogits, "dlogits"}});
  detail::check_shape(op, dlogits, logits.shape(), "dlogits");
  detail::check_shape(op, lse, Shape{logits.dim(0)}, "lse");
  detail::check_dtype(op, lse, detail::accum_dtype(logits), "lse");
  const std::int64_t rows = logits.dim(0), cols = logits.dim(1);
  detail::dispatch(op, logits, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::cross_entropy_chunk_backward(logits.data<T>(), targets.data<std::int32_t>(), lse.data<A>(), grad_scale,
                                        dlogits.data<T>(), rows, cols, col_begin);
    else
      cuda::cross_entropy_chunk_backward(logits.data<T>(), targets.data<std::int32_t>(), lse.data<A>(), grad_scale,
                                         dlogits.data<T>(), rows, cols, col_begin, vocab, cuda::current_stream());
  });
}

// Number of targets that are not the ignore index (reads device targets back once).
inline std::int64_t count_valid_targets(const Tensor& targets) {
  const std::vector<std::int32_t> t = targets.to_vector<std::int32_t>();
  return std::int64_t(std::count_if(t.begin(), t.end(), [](std::int32_t x) { return x != kIgnoreIndex; }));
}

struct LinearCrossEntropyResult {
  double loss = 0;              // mean over valid targets (0 when there are none)
  double loss_sum = 0;          // sum over valid targets
  std::int64_t valid_tokens = 0;
};

// Mean cross-entropy of logits = hidden weight^T (hidden (N, d), weight (V, d)), computed chunk_rows rows
// at a time so that only a (chunk_rows, V) slice of logits exists. When dhidden is non-null it receives
// d(loss)/d(hidden) (a new (N, d) tensor); when dweight is non-null the weight gradient is added into it
// ((V, d), f32 or hidden's dtype on CUDA).
// vocab_chunk > 0 (and < V) also cuts the vocabulary: only (chunk_rows, vocab_chunk) logits exist at once,
// through the running logsumexp of cross_entropy_chunk; with gradients each chunk's logits are computed
// twice (once for the lse, once for the gradient), one more LM-head GEMM than the whole-row path.
inline LinearCrossEntropyResult linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                                     std::int64_t chunk_rows, Tensor* dhidden = nullptr,
                                                     Tensor* dweight = nullptr, std::int64_t vocab_chunk = 0) {
  constexpr std::string_view op = "linear_cross_entropy";
  detail::check_same(op, {{&hidden, "hidden"}, {&weight, "weight"}});
  if (hidden.rank() != 2 || weight.rank() != 2 || hidden.dim(1) != weight.dim(1))
    detail::fail(op, "expected hidden (N, d) and weight (V, d), got " + hidden.shape().str() + " and " + weight.shape().str());
  if (chunk_rows <= 0) detail::fail(op, "chunk_rows must be positive, got " + std::to_string(chunk_rows));
  if (vocab_chunk < 0) detail::fail(op, "vocab_chunk must be >= 0 (0: the whole vocabulary), got " + std::to_string(vocab_chunk));
  const std::int64_t rows = hidden.dim(0), vocab = weight.dim(0);
  const bool whole_rows = vocab_chunk == 0 || vocab_chunk >= vocab;
  detail::check_shape(op, targets, Shape{rows}, "targets");

  LinearCrossEntropyResult result;
  result.valid_tokens = count_valid_targets(targets);
  const float grad_scale = result.valid_tokens ? 1.f / float(result.valid_tokens) : 0.f;
  if (dhidden) *dhidden = Tensor::empty(hidden.shape(), hidden.dtype(), hidden.device());
  Tensor losses = Tensor::empty({1, rows}, detail::accum_dtype(hidden), hidden.device());

  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const std::int64_t r1 = std::min(rows, r0 + chunk_rows);
    const Tensor h = hidden.slice(r0, r1);
    const Tensor tgt = targets.slice(r0, r1);
    if (whole_rows) {
      Tensor logits = matmul(h, weight, false, true);  // (chunk, V)
      CrossEntropyResult ce = cross_entropy(logits, tgt);
      losses.reshape({rows}).slice(r0, r1).copy_from(ce.losses);
      if (!dhidden && !dweight) continue;
      cross_entropy_backward(logits, tgt, ce.lse, grad_scale, logits);  // logits now hold dlogits
      if (dhidden) {
        Tensor dh = dhidden->slice(r0, r1);
        matmul_into(dh, logits, weight);                                  // dlogits (c, V) @ W (V, d)
      }
      if (dweight) matmul_into(*dweight, logits, h, true, false, 1.f, 1.f);  // += dlogits^T (V, c) @ h (c, d)
      continue;
    }
    CrossEntropyChunks stats = cross_entropy_chunk_start(tgt, vocab, hidden);
    for (std::int64_t v0 = 0; v0 < vocab; v0 += vocab_chunk) {
      const std::int64_t v1 = std::min(vocab, v0 + vocab_chunk);
      cross_entropy_chunk(stats, matmul(h, weight.slice(v0, v1), false, true), tgt, v0);
    }
    const CrossEntropyResult ce = cross_entropy_chunk_finish(stats, tgt);
    losses.reshape({rows}).slice(r0, r1).copy_from(ce.losses);
    if (!dhidden && !dweight) continue;
    for (std::int64_t v0 = 0; v0 < vocab; v0 += vocab_chunk) {
      const std::int64_t v1 = std::min(vocab, v0 + vocab_chunk);
      const Tensor w = weight.slice(v0, v1);
      Tensor logits = matmul(h, w, false, true);  // (chunk, v1 - v0), again
      cross_entropy_chunk_backward(logits, tgt, ce.lse, grad_scale, logits, v0, vocab);
      if (dhidden) {
        Tensor dh = dhidden->slice(r0, r1);
        matmul_into(dh, logits, w, false, false, 1.f, v0 == 0 ? 0.f : 1.f);
      }
      if (dweight) {
        Tensor dw = dweight->slice(v0, v1);
        matmul_into(dw, logits, h, true, false, 1.f, 1.f);
      }
    }
  }
  result.loss_sum = detail::scalar_as_double(sum_last(losses));
  result.loss = result.valid_tokens ? result.loss_sum / double(result.valid_tokens) : 0.0;
  return result;
}

}  // namespace qlora::ops
