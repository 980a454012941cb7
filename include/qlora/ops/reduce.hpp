#pragma once
// Reductions over the last axis (sum, max, mean), and the sum of squares that gradient norms use.
// Results drop the last dimension; on CUDA they are f32 whatever the input dtype.

#include <span>
#include <vector>

#include "qlora/cpu/reduce.hpp"
#include "qlora/cuda/reduce.hpp"
#include "qlora/ops/dispatch.hpp"

namespace qlora::ops {

namespace detail {
enum class RowReduction { sum, max, mean };

inline Tensor reduce_rows(std::string_view op, const Tensor& x, RowReduction which) {
  check_defined(op, x, "x");
  if (x.numel() == 0) fail(op, "cannot reduce the empty tensor " + x.str());
  const std::int64_t rows = x.shape().rows(), cols = x.shape().last();
  Tensor y = Tensor::empty(x.shape().without_last(), accum_dtype(x), x.device());
  dispatch(op, x, [&](auto t, auto backend) {
    using T = decltype(t);
    using A = accum_t<T, decltype(backend)>;
    if constexpr (is_cpu_v<decltype(backend)>) {
      if (which == RowReduction::sum) cpu::row_sum(x.data<T>(), y.data<A>(), rows, cols);
      if (which == RowReduction::max) cpu::row_max(x.data<T>(), y.data<A>(), rows, cols);
      if (which == RowReduction::mean) cpu::row_mean(x.data<T>(), y.data<A>(), rows, cols);
    } else {
      const auto s = cuda::current_stream();
      if (which == RowReduction::sum) cuda::row_sum(x.data<T>(), y.data<A>(), rows, cols, s);
      if (which == RowReduction::max) cuda::row_max(x.data<T>(), y.data<A>(), rows, cols, s);
      if (which == RowReduction::mean) cuda::row_mean(x.data<T>(), y.data<A>(), rows, cols, s);
    }
  });
  return y;
}
}  // namespace detail

inline Tensor sum_last(const Tensor& x) { return detail::reduce_rows("sum_last", x, detail::RowReduction::sum); }
inline Tensor max_last(const Tensor& x) { return detail::reduce_rows("max_last", x, detail::RowReduction::max); }
inline Tensor mean_last(const Tensor& x) { return detail::reduce_rows("mean_last", x, detail::RowReduction::mean); }

// sum over all tensors of sum(x^2), in double on the host. Device tensors accumulate into one f32 per
// device, read back once at the end (one synchronisation per device, not per tensor).
inline double sum_squares(std::span<const Tensor> tensors) {
  double total = 0;
  std::vector<Tensor> device_accumulators;
  for (const Tensor& x : tensors) {
    detail::check_defined("sum_squares", x, "x");
    detail::dispatch("sum_squares", x, [&](auto t, auto backend) {
      using T = decltype(t);
      if constexpr (detail::is_cpu_v<decltype(backend)>) {
        T acc = 0;
        cpu::sum_squares(x.data<T>(), x.numel(), &acc);
        total += double(acc);
      } else {
        Tensor* acc = nullptr;
        for (Tensor& a : device_accumulators)
          if (a.device() == x.device()) acc = &a;
        if (!acc) acc = &device_accumulators.emplace_back(Tensor::zeros({}, DType::f32, x.device()));
        cuda::sum_squares(x.data<T>(), x.numel(), acc->data<float>(), cuda::current_stream());
      }
    });
  }
  for (const Tensor& acc : device_accumulators) total += double(acc.item<float>());
  return total;
}

}  // namespace qlora::ops
