// GPTQ's in-block column loop on the GPU (CPU twin: cpu::gptq_block_columns in qlora/cpu/gptq.hpp).
//
// Launch: one thread per row, kGptqThreadsPerBlock rows per thread block. A thread runs the very same
// cpu::gptq_block_row as the twin, on its row of the transposed working weights (wt [cols, rows]: a warp's
// 32 rows of one column are contiguous, so every load and store is coalesced), and every thread of a warp
// reads the same element of U at the same time (a broadcast). The arithmetic is the twin's, one rounding
// per operation, so a block's codes and errors are bit-exact with the CPU given the same inputs.
// Not done yet: staging U's diagonal block in shared memory, and more than one warp's worth of parallelism
// per row (a thread walks its row's block serially: rows / 64 thread blocks, which fills an H100 only from
// about 8k rows); the trailing GEMM dominates the time for blocks of 128 columns anyway.

#include <algorithm>

#include "common.cuh"
#include "qlora/cuda/gptq.hpp"

namespace qlora::cuda {
namespace {

__global__ void __launch_bounds__(kGptqThreadsPerBlock)
    gptq_block_columns_kernel(const cpu::GptqColumnLoop p, std::int64_t begin, std::int64_t end, float* wt,
                              float* fit_scratch) {
  const std::int64_t r = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= p.rows) return;
  float* fit = p.fit_group > 0 ? fit_scratch + r * p.fit_group : nullptr;
  cpu::gptq_block_row(p, begin, end, r, wt + begin * p.rows + r, p.rows, fit);
}

}  // namespace

void gptq_block_columns(const cpu::GptqColumnLoop& p, std::int64_t begin, std::int64_t end, float* wt_mutable,
                        float* fit_scratch, Stream stream) {
  if (begin < 0 || end > p.cols || begin >= end)
    throw Error("cuda::gptq_block_columns: block [" + std::to_string(begin) + ", " + std::to_string(end) +
                ") is out of range for " + std::to_string(p.cols) + " columns");
  if (p.fit_group > 0 && fit_scratch == nullptr)
    throw Error("cuda::gptq_block_columns: groups fitted in the loop need a scratch buffer");
  if (p.rows == 0) return;
  const auto blocks = unsigned((p.rows + kGptqThreadsPerBlock - 1) / kGptqThreadsPerBlock);
  gptq_block_columns_kernel<<<blocks, kGptqThreadsPerBlock, 0, stream>>>(p, begin, end, wt_mutable, fit_scratch);
  detail::check_launch("gptq_block_columns_kernel");
}

}  // namespace qlora::cuda
