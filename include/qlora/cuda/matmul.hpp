#pragma once
// CUDA matrix multiply through cuBLASLt (kernel layer; CPU twin: qlora/cpu/matmul.hpp).
// C (m, n) = alpha * op(A) op(B) + beta * C, row-major, op(X) = X or X^T: A is stored (m, k), or (k, m) when
// trans_a; B is stored (k, n), or (n, k) when trans_b. Batched: matrix i of A starts at a + i * stride_a (likewise
// B, C); a stride of 0 broadcasts one matrix to the whole batch (A and B only). beta == 0 never reads C.
// f32 accumulation (CUBLAS_COMPUTE_32F: f32 inputs stay full f32, no TF32). Device pointers.
// Instantiated type combinations: TA = TB in {float, bf16}, TC in {float, bf16}. (f32 inputs with a bf16 output
// have no cuBLASLt kernel with f32 compute: they go through an f32 temporary, rounded into C once.)
// One cuBLASLt handle and one 32 MiB workspace per device, created on first use: matmuls issued concurrently
// on two streams of the same device share that workspace and must be ordered by the caller.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

template <class TA, class TB, class TC>
void matmul(const TA* a, const TB* b, TC* c, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
            bool trans_b, float alpha, float beta, std::int64_t batch, std::int64_t stride_a, std::int64_t stride_b,
            std::int64_t stride_c, Stream stream);

}  // namespace qlora::cuda
