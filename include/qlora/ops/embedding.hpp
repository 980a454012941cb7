#pragma once
// Token embedding lookup and its scatter-add backward. ids are i32 of any shape; the result has ids'
// shape plus the embedding dimension.

#include "qlora/cpu/embedding.hpp"
#include "qlora/cuda/embedding.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

namespace detail {
// Host ids are checked here; device ids are not read back (a synchronisation per step): the kernels skip
// out-of-range ids, and the tokenizer layer guarantees them.
inline void check_ids(std::string_view op, const Tensor& ids, std::int64_t vocab) {
  check_dtype(op, ids, DType::i32, "ids");
  if (!ids.device().is_cpu()) return;
  const std::int32_t* p = ids.data<std::int32_t>();
  for (std::int64_t i = 0; i < ids.numel(); ++i)
    if (p[i] < 0 || p[i] >= vocab)
      fail(op, "token id " + std::to_string(p[i]) + " at position " + std::to_string(i) + " is outside the vocabulary [0, " +
                   std::to_string(vocab) + ")");
}
}  // namespace detail

inline Tensor embedding(const Tensor& table, const Tensor& ids) {
  constexpr std::string_view op = "embedding";
  detail::check_defined(op, table, "table");
  detail::check_defined(op, ids, "ids");
  if (table.rank() != 2) detail::fail(op, "table must be (vocab, dim), got " + table.shape().str());
  detail::check_device(op, ids, table.device(), "ids");
  const std::int64_t vocab = table.dim(0), dim = table.dim(1);
  detail::check_ids(op, ids, vocab);
  Tensor y = Tensor::empty(ids.shape().appended(dim), table.dtype(), table.device());
  detail::dispatch(op, table, [&](auto t, auto backend) {
    using T = decltype(t);
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::embedding_forward(table.data<T>(), ids.data<std::int32_t>(), y.data<T>(), ids.numel(), vocab, dim);
    else
      cuda::embedding_forward(table.data<T>(), ids.data<std::int32_t>(), y.data<T>(), ids.numel(), vocab, dim,
                              cuda::current_stream());
  });
  return y;
}

// dtable[ids[t]] += dy[t]; dtable is (vocab, dim) of accum dtype (dy's on the CPU, f32 on CUDA).
inline void embedding_backward(const Tensor& dy, const Tensor& ids, Tensor& dtable) {
  constexpr std::string_view op = "embedding_backward";
  detail::check_defined(op, dy, "dy");
  detail::check_defined(op, dtable, "dtable");
  if (dtable.rank() != 2) detail::fail(op, "dtable must be (vocab, dim), got " + dtable.shape().str());
  const std::int64_t vocab = dtable.dim(0), dim = dtable.dim(1);
  detail::check_shape(op, dy, ids.shape().appended(dim), "dy");
  detail::check_device(op, ids, dy.device(), "ids");
  detail::check_device(op, dtable, dy.device(), "dtable");
  detail::check_dtype(op, dtable, detail::accum_dtype(dy), "dtable");
  detail::check_ids(op, ids, vocab);
  detail::dispatch(op, dy, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = detail::accum_t<T, decltype(backend)>;
    if constexpr (detail::is_cpu_v<decltype(backend)>)
      cpu::embedding_backward(dy.data<T>(), ids.data<std::int32_t>(), dtable.data<A>(), ids.numel(), vocab, dim);
    else
      cuda::embedding_backward(dy.data<T>(), ids.data<std::int32_t>(), dtable.data<A>(), ids.numel(), vocab, dim,
                               cuda::current_stream());
  });
}

}  // namespace qlora::ops
