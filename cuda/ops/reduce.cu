// Row reductions (sum, max, mean over the last axis) and the global sum of squares.
// Launch: row_*: one block of 256 threads per row, each thread strides over the columns, then a block
// reduction (warp shuffles + 32-float shared scratch). sum_squares: grid-stride partial sums, one block
// reduction and one f32 atomicAdd per block, about 4 blocks per SM. f32 accumulation throughout.
// Not done yet: vectorised loads; several rows per block for short rows; a deterministic sum_squares.

#include "common.cuh"
#include "qlora/cuda/reduce.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

enum class RowReduction { sum, max, mean };

template <RowReduction op, class T>
__global__ void row_reduce_kernel(const T* x, float* y, std::int64_t rows, std::int64_t cols) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* row = x + r * cols;
    float acc = op == RowReduction::max ? -INFINITY : 0.0f;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x)
      acc = op == RowReduction::max ? fmaxf(acc, to_f32(row[j])) : acc + to_f32(row[j]);
    acc = op == RowReduction::max ? block_max(acc) : block_sum(acc);
    if (threadIdx.x == 0) y[r] = op == RowReduction::mean ? acc / float(cols) : acc;
  }
}

template <class T>
__global__ void sum_squares_kernel(const T* x, std::int64_t n, float* acc) {
  float partial = 0.0f;
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const float xi = to_f32(x[i]);
    partial += xi * xi;
  }
  partial = block_sum(partial);
  if (threadIdx.x == 0) atomicAdd(acc, partial);
}

template <RowReduction op, class T>
void row_reduce(const T* x, float* y, std::int64_t rows, std::int64_t cols, Stream stream, const char* name) {
  if (rows <= 0) return;
  row_reduce_kernel<op><<<row_grid(rows), kRowThreads, 0, stream>>>(dev(x), y, rows, cols);
  check_launch(name);
}

}  // namespace

template <class T>
void row_sum(const T* x, float* y, std::int64_t rows, std::int64_t cols, Stream stream) {
  row_reduce<RowReduction::sum>(x, y, rows, cols, stream, "row_reduce_kernel<sum>");
}

template <class T>
void row_max(const T* x, float* y, std::int64_t rows, std::int64_t cols, Stream stream) {
  row_reduce<RowReduction::max>(x, y, rows, cols, stream, "row_reduce_kernel<max>");
}

template <class T>
void row_mean(const T* x, float* y, std::int64_t rows, std::int64_t cols, Stream stream) {
  row_reduce<RowReduction::mean>(x, y, rows, cols, stream, "row_reduce_kernel<mean>");
}

template <class T>
void sum_squares(const T* x, std::int64_t n, float* acc, Stream stream) {
  if (n <= 0) return;
  // A few blocks per SM, each thread summing many elements: few atomics, so the f32 sum of the block totals
  // adds little rounding error.
  const auto grid = unsigned(std::min<std::int64_t>(ceil_div(n, kElementwiseThreads), 4 * std::int64_t(sm_count())));
  sum_squares_kernel<<<grid, kElementwiseThreads, 0, stream>>>(dev(x), n, acc);
  check_launch("sum_squares_kernel");
}

#define QLORA_INSTANTIATE(T)                                                       \
  template void row_sum<T>(const T*, float*, std::int64_t, std::int64_t, Stream);  \
  template void row_max<T>(const T*, float*, std::int64_t, std::int64_t, Stream);  \
  template void row_mean<T>(const T*, float*, std::int64_t, std::int64_t, Stream); \
  template void sum_squares<T>(const T*, std::int64_t, float*, Stream);
QLORA_INSTANTIATE(float)
QLORA_INSTANTIATE(qlora::bf16)

}  // namespace qlora::cuda
