#pragma once
// Cross-entropy over the vocabulary with ignore index -100 (prompt tokens, padding), and the chunked
// LM-head loss that never holds the full (tokens x vocab) logits: for each chunk of rows it computes the
// logits, the loss, the logits' gradient in place, and that chunk's contributions to dhidden and dweight.

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
inline void check_logits_targets(std::string_view op, const Tensor& logits, const Tensor& targets) {
  check_defined(op, logits, "logits");
  check_defined(op, targets, "targets");
  if (logits.rank() != 2) fail(op, "logits must be (rows, vocab), got " + logits.shape().str());
  check_shape(op, targets, Shape{logits.dim(0)}, "targets");
  check_dtype(op, targets, DType::i32, "targets");
  check_device(op, targets, logits.device(), "targets");
  if (!targets.device().is_cpu()) return;  // device targets are not read back (see embedding.hpp)
  const std::int32_t* t = targets.data<std::int32_t>();
  for (std::int64_t r = 0; r < targets.numel(); ++r)
    if (t[r] != kIgnoreIndex && (t[r] < 0 || t[r] >= logits.dim(1)))
      fail(op, "target " + std::to_string(t[r]) + " at row " + std::to_string(r) + " is outside the vocabulary [0, " +
                   std::to_string(logits.dim(1)) + ") and is not the ignore index -100");
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
inline LinearCrossEntropyResult linear_cross_entropy(const Tensor& hidden, const Tensor& weight, const Tensor& targets,
                                                     std::int64_t chunk_rows, Tensor* dhidden = nullptr,
                                                     Tensor* dweight = nullptr) {
  constexpr std::string_view op = "linear_cross_entropy";
  detail::check_same(op, {{&hidden, "hidden"}, {&weight, "weight"}});
  if (hidden.rank() != 2 || weight.rank() != 2 || hidden.dim(1) != weight.dim(1))
    detail::fail(op, "expected hidden (N, d) and weight (V, d), got " + hidden.shape().str() + " and " + weight.shape().str());
  if (chunk_rows <= 0) detail::fail(op, "chunk_rows must be positive, got " + std::to_string(chunk_rows));
  const std::int64_t rows = hidden.dim(0);
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
  }
  result.loss_sum = detail::scalar_as_double(sum_last(losses));
  result.loss = result.valid_tokens ? result.loss_sum / double(result.valid_tokens) : 0.0;
  return result;
}

}  // namespace qlora::ops
