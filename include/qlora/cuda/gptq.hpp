#pragma once
// CUDA kernel of GPTQ's column loop (kernel layer; CPU twin: qlora/cpu/gptq.hpp, which documents the loop,
// the layouts and the arithmetic). Only the in-block column loop is a kernel of its own; the Tensor-level
// driver (qlora/quant/gptq.hpp) runs the lazy trailing update W[:, end:] -= Err U[begin:end, end:] through
// ops::matmul_into (cuBLAS) on the same stream, and prepares U (Cholesky and inverse in double) on the CPU.

#include <cstdint>

#include "qlora/cpu/gptq.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// Block [begin, end) of the column loop for every row: one thread per row (kGptqThreadsPerBlock rows per
// thread block), each running cpu::gptq_block_row on its row of the transposed working weights, updating
// them in place (wt_mutable is p.wt, writable). fit_scratch holds rows * p.fit_group floats (unused when
// p.fit_group == 0). Device pointers; the caller checks sizes.
void gptq_block_columns(const cpu::GptqColumnLoop& p, std::int64_t begin, std::int64_t end, float* wt_mutable,
                        float* fit_scratch, Stream stream);

inline constexpr int kGptqThreadsPerBlock = 64;

}  // namespace qlora::cuda
