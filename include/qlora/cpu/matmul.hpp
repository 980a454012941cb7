#pragma once
// CPU twin of cuda/matmul.cu: batched GEMM with BLAS semantics on row-major matrices, through Eigen.
//   C = alpha op(A) op(B) + beta C,   op(X) = X or X^T
// A is stored (m, k), or (k, m) when trans_a; B is stored (k, n), or (n, k) when trans_b; C is (m, n).
// Batch item i uses a + i stride_a, b + i stride_b, c + i stride_c (element strides; 0 broadcasts one
// matrix to every item, e.g. a weight shared by a batch of activations; stride_c must not be 0 when
// batch > 1, as items would race on one C).

#include <cstdint>

#include <Eigen/Dense>

namespace qlora::cpu {

template <class T>
void matmul(const T* a, const T* b, T* c, std::int64_t m, std::int64_t n, std::int64_t k, bool trans_a,
            bool trans_b, float alpha, float beta, std::int64_t batch, std::int64_t stride_a, std::int64_t stride_b,
            std::int64_t stride_c) {
  using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  // Batch items run in parallel, each GEMM on one thread; a single item (the common case) leaves the
  // threads to Eigen's own parallel GEMM, which it only uses outside an active parallel region.
#pragma omp parallel for if (batch > 1)
  for (std::int64_t i = 0; i < batch; ++i) {
    const Eigen::Map<const Matrix> A(a + i * stride_a, trans_a ? k : m, trans_a ? m : k);
    const Eigen::Map<const Matrix> B(b + i * stride_b, trans_b ? n : k, trans_b ? k : n);
    Eigen::Map<Matrix> C(c + i * stride_c, m, n);
    // As in BLAS, beta == 0 means C is not read: it may hold uninitialised memory, even NaN.
    if (beta == 0.0f) {
      C.setZero();
    } else if (beta != 1.0f) {
      C *= T(beta);
    }
    const T s = T(alpha);
    if (!trans_a && !trans_b) {
      C.noalias() += s * A * B;
    } else if (!trans_a && trans_b) {
      C.noalias() += s * A * B.transpose();
    } else if (trans_a && !trans_b) {
      C.noalias() += s * A.transpose() * B;
    } else {
      C.noalias() += s * A.transpose() * B.transpose();
    }
  }
}

}  // namespace qlora::cpu
