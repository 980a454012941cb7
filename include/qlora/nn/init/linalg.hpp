#pragma once
// The float64 linear algebra of the adapter initialisations (LoftQ, CLoQ: docs/adapter-init.md), on Eigen:
// conversions between row-major tensors and Eigen matrices, the group maps of the adapter's structure, and a
// truncated SVD.
//
// Structure (methods/qblora.md, "Generic operator"): an adapter with input pooling p and output repeat k
// updates the weight by dW = s E_k B A P_p, i.e. dW[o, i] = D[o/k, i/p] with the pooled update
// D = (s/p) B A (d_out/k x d_in/p; (s/p) M for the single matrix). With the 0/1 group indicators
// S_out (d_out x d_out/k, S_out[o, a] = [o/k == a]) and S_in (d_in x d_in/p, S_in[i, b] = [i/p == b]):
//   dW = S_out D S_in^T.
// The helpers below are the two halves of the adjoint: the mean over each group of k rows ((1/k) S_out^T R)
// and the sum over each group of p columns (R S_in).

#include <Eigen/Dense>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"

namespace qlora::nn::init {

using Eigen::MatrixXd;
using Eigen::VectorXd;
using RowMajorMatrixXd = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// A 2-D f32/f64 tensor (any device) as an f64 matrix; every element must be finite. `what` names it in errors.
inline MatrixXd to_matrix(const Tensor& t, std::string_view what) {
  QLORA_CHECK(t.defined() && t.rank() == 2, std::string(what) + " must be a 2-D tensor, got " +
                                                (t.defined() ? t.shape().str() : std::string("an undefined tensor")));
  QLORA_CHECK(t.dtype() == DType::f32 || t.dtype() == DType::f64,
              std::string(what) + " must be f32 or f64, got " + std::string(dtype_name(t.dtype())));
  const Tensor host = t.to(Device::cpu()).to(DType::f64);
  const double* p = host.data<double>();
  for (std::int64_t i = 0; i < host.numel(); ++i)
    QLORA_CHECK(std::isfinite(p[i]), std::string(what) + " holds a non-finite value (" + std::to_string(p[i]) +
                                         ") at row " + std::to_string(i / t.dim(1)) + ", column " +
                                         std::to_string(i % t.dim(1)));
  return Eigen::Map<const RowMajorMatrixXd>(p, t.dim(0), t.dim(1));
}

// An f64 matrix as a row-major f64 CPU tensor.
inline Tensor to_tensor(const MatrixXd& m) {
  Tensor t = Tensor::empty(Shape{m.rows(), m.cols()}, DType::f64);
  Eigen::Map<RowMajorMatrixXd>(t.data<double>(), m.rows(), m.cols()) = m;
  return t;
}

// (1/k) S_out^T R: row a is the mean of rows a*k .. a*k+k-1 of R (rows / k x cols).
inline MatrixXd mean_of_row_groups(const MatrixXd& r, std::int64_t k) {
  MatrixXd out = MatrixXd::Zero(r.rows() / k, r.cols());
  for (std::int64_t o = 0; o < r.rows(); ++o) out.row(o / k) += r.row(o);
  return out / double(k);
}

// R S_in: column b is the sum of columns b*p .. b*p+p-1 of R (rows x cols / p).
inline MatrixXd sum_of_column_groups(const MatrixXd& r, std::int64_t p) {
  MatrixXd out = MatrixXd::Zero(r.rows(), r.cols() / p);
  for (std::int64_t i = 0; i < r.cols(); ++i) out.col(i / p) += r.col(i);
  return out;
}

// The mean of R over every k x p tile: the Frobenius projection of R onto {S_out D S_in^T} is
// S_out tile_means(R) S_in^T.
inline MatrixXd tile_means(const MatrixXd& r, std::int64_t k, std::int64_t p) {
  return sum_of_column_groups(mean_of_row_groups(r, k), p) / double(p);
}

// The leading `rank` singular triplets of m (fewer when min(rows, cols) < rank): m ~ u diag(s) v^T.
struct TruncatedSvd {
  MatrixXd u;  // rows x q
  VectorXd s;  // q, descending
  MatrixXd v;  // cols x q
};

inline TruncatedSvd truncated_svd(const MatrixXd& m, std::int64_t rank) {
  // BDCSVD falls back to Jacobi for small matrices and divides and conquers large ones.
  const Eigen::BDCSVD<MatrixXd> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const std::int64_t q = std::min<std::int64_t>(rank, svd.singularValues().size());
  return {svd.matrixU().leftCols(q), svd.singularValues().head(q), svd.matrixV().leftCols(q)};
}

}  // namespace qlora::nn::init
