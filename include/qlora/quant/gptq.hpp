#pragma once
// gptq_quantize(w, h, cfg, options): GPTQ / OPTQ (Frantar et al.; baselines.md section 3; the reference is
// IST-DASLab/gptq `gptq.py`, GPTQ.fasterquant) into the same QuantizedTensor that quantize() (RTN) produces.
// Minimises tr((W - Q) H (W - Q)^T) column by column, compensating each column's rounding error on the
// columns not yet quantized through the upper Cholesky factor U of H^-1.
//
// Steps, as fasterquant orders them (docs/ptq.md, "GPTQ", lists where and why we differ):
//   1. group 0 (one group per row): each row's grid from the original W.
//   2. dead inputs (H_ii == 0): H_ii = 1, W[:, i] = 0.
//   3. static_groups: every group's grid from this W, up front.
//   4. act_order: columns permuted by descending diag(H) (a stable sort: ties keep their order).
//   5. H += damp * mean(diag H) * I;  U = upper Cholesky factor of H^-1, in double, then rounded to f32.
//   6. the column loop in f32 (cpu/gptq.hpp: the twin; cuda/quant/gptq.cu), in lazy blocks of block_size
//      columns, each followed by W[:, end:] -= Err U[begin:end, end:] (ops::matmul_into: Eigen or cuBLAS).
//      Without static groups, a group's grid is fitted from the updated weights when the loop reaches its
//      first column.
//   7. codes back to natural column order, packed; f16 scales, u8/f32 zeros; NF4: f32 block absmax, double
//      quantized afterwards exactly as quantize() does (the codes use the exact absmax, as bitsandbytes').
// Every format of QuantConfig is supported: int asym/sym (u8 or f32 zeros), dINT, -mse range search, NF4.
// grid_shrink < 1 fits MagR's shrunk grids instead (every grid GPTQ fits, in steps 1, 3 and 6), as MagR's
// optq.py does after its preprocessing; with H = I the result is magr_rtn_quantize(w, cfg, beta).
// act_order with groups smaller than a row needs static_groups (fasterquant would form the groups in the
// permuted order, which needs a per-column group index that this format does not store).

#include <Eigen/Cholesky>
#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "qlora/core/device.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/cpu/gptq.hpp"
#include "qlora/cpu/quant_pack.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/quantize.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/gptq.hpp"
#include "qlora/cuda/runtime.hpp"
#endif

namespace qlora::quant {

struct GptqOptions {
  double damp = 0.01;             // fraction of mean(diag H) added to the diagonal (fasterquant's percdamp)
  std::int64_t block_size = 128;  // columns per lazy block (the result does not depend on it, up to f32 rounding)
  bool act_order = false;         // quantize columns in order of descending H_ii
  bool static_groups = false;     // fit every group's grid up front, from the weights before any update
  double grid_shrink = 1.0;       // MagR's beta in (0, 1]: every int grid's top at lo + beta (hi - lo) (magr.md)
  Device device = Device::cpu();  // where the column loop and the trailing GEMMs run
};

namespace detail {

static_assert(sizeof(cpu::IntGrid) == 2 * sizeof(float), "grids travel between devices as f32 pairs");

inline cpu::GptqGridFormat gptq_grid_format(const QuantConfig& cfg, double grid_shrink = 1.0) {
  cpu::GptqGridFormat f;
  f.nf4 = cfg.scheme == Scheme::nf4;
  f.kind = f.nf4 ? cpu::IntKind::asym : int_kind(cfg.scheme);
  f.bits = cfg.bits;
  f.mse_search = cfg.mse_search;
  f.range_shrink = float(grid_shrink);
  return f;
}

// U: the upper triangular factor with U^T U = H^-1, from H [n, n] (row-major, double, damped), in double.
// With P the exchange matrix, chol(P H P) = L' gives H = R R^T for the upper triangular R = P L' P, so
// H^-1 = (R^-1)^T R^-1 and U = R^-1: one Cholesky and one triangular inverse (fasterquant computes
// chol(H), its inverse, and the upper Cholesky factor of that: the same U, with two more O(n^3) steps).
inline std::vector<double> gptq_inverse_cholesky_upper(const std::vector<double>& h, std::int64_t n, double damp,
                                                       const std::string& who) {
  // Column-major, Eigen's fast layout for LLT and TRSM (H is symmetric: the same data either way round).
  using Matrix = Eigen::MatrixXd;
  const Eigen::Map<const Matrix> hm(h.data(), n, n);
  const Eigen::LLT<Matrix> llt(hm.reverse());
  const std::string advice = " after damping (damp = " + std::to_string(damp) +
                             " of the mean diagonal); pass a larger --damp, or check the calibration statistics";
  QLORA_CHECK(llt.info() == Eigen::Success, who + ": the Hessian H is not positive definite" + advice);
  const Matrix r = Matrix(llt.matrixL()).reverse();
  Matrix u = r.triangularView<Eigen::Upper>().solve(Matrix::Identity(n, n));
  for (std::int64_t i = 0; i < n; ++i)
    QLORA_CHECK(std::isfinite(u(i, i)) && u(i, i) > 0 && std::isfinite(float(u(i, i))) && float(u(i, i)) > 0.f,
                who + ": the inverse Hessian's Cholesky factor has a non-positive or non-finite pivot at column " +
                    std::to_string(i) + advice);
  std::vector<double> out(static_cast<std::size_t>(n * n), 0.0);  // row-major, zero below the diagonal
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = i; j < n; ++j) out[std::size_t(i * n + j)] = u(i, j);
  return out;
}

inline void gptq_check_inputs(const Tensor& w, const Tensor& h, const QuantConfig& cfg, const GptqOptions& opt,
                              const std::string& who) {
  QLORA_CHECK(w.defined(), who + ": the weight tensor is undefined");
  QLORA_CHECK(w.rank() == 2, who + ": the weight must be 2-D [rows, cols], got " + w.str());
  QLORA_CHECK(w.device().is_cpu(), who + ": the weight must be on the CPU (options.device picks where the loop runs); it is on " +
                                       w.device().str());
  QLORA_CHECK(w.dtype() == DType::f32 || w.dtype() == DType::f64,
              who + ": the weight must be f32 or f64, got " + std::string(dtype_name(w.dtype())));
  QLORA_CHECK(w.dim(0) >= 1 && w.dim(1) >= 1, who + ": the weight " + w.str() + " has no elements");
  const std::int64_t cols = w.dim(1);
  QLORA_CHECK(h.defined(), who + ": the Hessian H is undefined");
  QLORA_CHECK(h.rank() == 2 && h.dim(0) == cols && h.dim(1) == cols,
              who + ": the Hessian H must be [cols, cols] = [" + std::to_string(cols) + ", " + std::to_string(cols) +
                  "] for a weight " + w.str() + ", got " + h.str());
  QLORA_CHECK(h.device().is_cpu(), who + ": the Hessian H must be on the CPU; it is on " + h.device().str());
  QLORA_CHECK(h.dtype() == DType::f32 || h.dtype() == DType::f64,
              who + ": the Hessian H must be f32 or f64, got " + std::string(dtype_name(h.dtype())));
  QLORA_CHECK(std::isfinite(opt.damp) && opt.damp >= 0, who + ": damp must be finite and >= 0, got " + std::to_string(opt.damp));
  QLORA_CHECK(opt.block_size >= 1, who + ": block_size must be >= 1, got " + std::to_string(opt.block_size));
  QLORA_CHECK(opt.grid_shrink > 0 && opt.grid_shrink <= 1,
              who + ": grid_shrink (MagR's beta) must be in (0, 1], got " + std::to_string(opt.grid_shrink));
  QLORA_CHECK(opt.grid_shrink == 1 || cfg.scheme != Scheme::nf4,
              who + ": grid_shrink shrinks an integer grid; NF4 has none");
  QLORA_CHECK(opt.grid_shrink == 1 || !cfg.mse_search, who + ": grid_shrink replaces the MSE range search; drop -mse");
  QLORA_CHECK(!(opt.act_order && cfg.group != 0 && cfg.group < cols && !opt.static_groups),
              who + ": act_order with group size " + std::to_string(cfg.group) +
                  " needs static_groups (groups are stored along natural columns; GPTQ's dynamic groups would follow "
                  "the permuted order)");
  QLORA_CHECK(opt.device.is_cpu() || opt.device.is_cuda(), who + ": unsupported device " + opt.device.str());
#if !defined(QLORA_WITH_CUDA)
  QLORA_CHECK(opt.device.is_cpu(), who + ": device " + opt.device.str() + " needs a build linked with qlora_cuda");
#endif
}

// The codes [cols, rows] (permuted, transposed) and grids [rows, gpr] of the column loop, in a
// QuantizedTensor of the configured format.
inline QuantizedTensor gptq_assemble(const QuantConfig& cfg, std::int64_t rows, std::int64_t cols,
                                     const std::vector<std::int64_t>& perm, const std::uint8_t* codes_t,
                                     const cpu::IntGrid* grids) {
  QuantizedTensor q;
  q.config = cfg;
  q.rows = rows;
  q.cols = cols;
  const std::int64_t gpr = q.groups_per_row(), stride = q.row_stride_bytes();
  q.codes = Tensor::empty(Shape{rows, stride}, DType::u8);
  std::vector<std::uint8_t> row_codes(static_cast<std::size_t>(cols));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) row_codes[std::size_t(perm[std::size_t(c)])] = codes_t[c * rows + r];
    cpu::pack_codes_row(row_codes.data(), cols, cfg.bits, q.codes.data<std::uint8_t>() + r * stride);
  }
  const std::int64_t n = rows * gpr;
  if (cfg.scheme == Scheme::nf4) {
    Tensor absmax = Tensor::empty(Shape{rows, gpr}, DType::f32);
    for (std::int64_t i = 0; i < n; ++i) absmax.data<float>()[i] = grids[i].scale;
    store_nf4_block_absmax(q, absmax);
    return q;
  }
  q.scales = Tensor::empty(Shape{rows, gpr}, DType::f16);
  for (std::int64_t i = 0; i < n; ++i) q.scales.data<f16>()[i] = to_f16(grids[i].scale);
  if (cfg.scheme == Scheme::int_sym) return q;
  q.zeros = Tensor::empty(Shape{rows, gpr}, cfg.float_zeros ? DType::f32 : DType::u8);
  for (std::int64_t i = 0; i < n; ++i) {
    if (cfg.float_zeros) q.zeros.data<float>()[i] = grids[i].zero;
    else q.zeros.data<std::uint8_t>()[i] = std::uint8_t(grids[i].zero);
  }
  return q;
}

}  // namespace detail

// w: f32/f64 [rows, cols] on the CPU; h: f32/f64 [cols, cols] on the CPU, symmetric (GramAccumulator::gram();
// its lower triangle is what the Cholesky reads). Returns what quantize(w, cfg) returns, with GPTQ's codes
// and grids. Throws qlora::Error on a bad shape, dtype, device or option, NaN/Inf in w or h, or an H that is
// not positive definite after damping.
inline QuantizedTensor gptq_quantize(const Tensor& w, const Tensor& h, const QuantConfig& cfg,
                                     const GptqOptions& opt = {}) {
  cfg.validate();
  const std::string who = "gptq_quantize (" + cfg.name() + ")";
  detail::gptq_check_inputs(w, h, cfg, opt, who);
  const std::int64_t rows = w.dim(0), cols = w.dim(1);

  // The weight as quantize() reads it (f64 rounded to f32 after checking for NaN/Inf).
  if (w.dtype() == DType::f64) {
    const double* p = w.data<double>();
    for (std::int64_t i = 0; i < w.numel(); ++i)
      QLORA_CHECK(std::isfinite(p[i]), who + ": weight row " + std::to_string(i / cols) + ", column " +
                                           std::to_string(i % cols) + " is " + (std::isnan(p[i]) ? "NaN" : "infinite"));
  }
  const Tensor w_f32 = w.to(DType::f32);
  detail::check_weight_values(w_f32.data<float>(), rows, cols, cfg);
  std::vector<float> wr(w_f32.data<float>(), w_f32.data<float>() + rows * cols);

  std::vector<double> hd(static_cast<std::size_t>(cols * cols));
  {
    const Tensor h64 = h.to(DType::f64);
    std::copy(h64.data<double>(), h64.data<double>() + cols * cols, hd.begin());
    for (std::int64_t i = 0; i < cols * cols; ++i)
      QLORA_CHECK(std::isfinite(hd[std::size_t(i)]), who + ": the Hessian H has a non-finite entry at (" +
                                                         std::to_string(i / cols) + ", " + std::to_string(i % cols) + ")");
  }

  const cpu::GptqGridFormat format = detail::gptq_grid_format(cfg, opt.grid_shrink);
  const std::int64_t group = cfg.group == 0 ? cols : cfg.group;
  const std::int64_t gpr = (cols + group - 1) / group;
  std::vector<cpu::IntGrid> grids(static_cast<std::size_t>(rows * gpr));
  auto fit_natural_groups = [&] {
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t g = 0; g < gpr; ++g)
        grids[std::size_t(r * gpr + g)] =
            cpu::gptq_fit_grid(format, wr.data() + r * cols + g * group, std::min(group, cols - g * group));
  };
  if (cfg.group == 0) fit_natural_groups();  // 1. fasterquant fits a per-channel grid before anything else

  for (std::int64_t i = 0; i < cols; ++i) {  // 2. dead inputs
    if (hd[std::size_t(i * cols + i)] != 0) continue;
    hd[std::size_t(i * cols + i)] = 1;
    for (std::int64_t r = 0; r < rows; ++r) wr[std::size_t(r * cols + i)] = 0.f;
  }
  if (cfg.group != 0 && opt.static_groups) fit_natural_groups();  // 3.
  const bool fit_in_loop = cfg.group != 0 && !opt.static_groups;

  std::vector<std::int64_t> perm(static_cast<std::size_t>(cols));  // 4. loop position -> natural column
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order)
    std::stable_sort(perm.begin(), perm.end(), [&](std::int64_t a, std::int64_t b) {
      return hd[std::size_t(a * cols + a)] > hd[std::size_t(b * cols + b)];
    });

  // 5. The permuted, damped H and U (f32 for the loop, like the reference).
  std::vector<double> hp(static_cast<std::size_t>(cols * cols));
  double mean_diag = 0;
  for (std::int64_t i = 0; i < cols; ++i) mean_diag += hd[std::size_t(i * cols + i)];
  mean_diag /= double(cols);
  for (std::int64_t a = 0; a < cols; ++a)
    for (std::int64_t b = 0; b < cols; ++b)
      hp[std::size_t(a * cols + b)] = hd[std::size_t(perm[std::size_t(a)] * cols + perm[std::size_t(b)])];
  for (std::int64_t i = 0; i < cols; ++i) hp[std::size_t(i * cols + i)] += opt.damp * mean_diag;
  hd = {};
  const std::vector<double> u64 = detail::gptq_inverse_cholesky_upper(hp, cols, opt.damp, who);
  hp = {};

  // The arrays of the loop, built on the CPU and moved to the device once.
  Tensor u = Tensor::empty(Shape{cols, cols}, DType::f32);
  std::transform(u64.begin(), u64.end(), u.data<float>(), [](double x) { return float(x); });
  Tensor wt = Tensor::empty(Shape{cols, rows}, DType::f32);
  for (std::int64_t c = 0; c < cols; ++c)
    for (std::int64_t r = 0; r < rows; ++r) wt.data<float>()[c * rows + r] = wr[std::size_t(r * cols + perm[std::size_t(c)])];
  wr = {};
  Tensor group_of_column = Tensor::empty(Shape{cols}, DType::i32);
  for (std::int64_t c = 0; c < cols; ++c) group_of_column.data<std::int32_t>()[c] = std::int32_t(perm[std::size_t(c)] / group);
  // The trailing panels U[begin:end, end:], each contiguous, one after the other (the GEMM takes no strides).
  const std::int64_t block = std::min(opt.block_size, cols);
  std::vector<std::int64_t> panel_offset;
  std::int64_t panel_elements = 0;
  for (std::int64_t begin = 0; begin < cols; begin += block) {
    const std::int64_t end = std::min(begin + block, cols);
    panel_offset.push_back(panel_elements);
    panel_elements += (end - begin) * (cols - end);
  }
  Tensor panels = Tensor::empty(Shape{std::max<std::int64_t>(panel_elements, 1)}, DType::f32);
  for (std::int64_t b = 0, begin = 0; begin < cols; begin += block, ++b) {
    const std::int64_t end = std::min(begin + block, cols);
    float* dst = panels.data<float>() + panel_offset[std::size_t(b)];
    for (std::int64_t k = begin; k < end; ++k)
      for (std::int64_t j = end; j < cols; ++j) *dst++ = u.data<float>()[k * cols + j];
  }
  Tensor grid_tensor = Tensor::empty(Shape{rows, gpr, 2}, DType::f32);
  std::copy_n(reinterpret_cast<const float*>(grids.data()), rows * gpr * 2, grid_tensor.data<float>());

  const Device dev = opt.device;
  if (dev.is_cuda()) {
    u = u.to(dev);
    wt = wt.to(dev);
    group_of_column = group_of_column.to(dev);
    panels = panels.to(dev);
    grid_tensor = grid_tensor.to(dev);
  }
  Tensor codes = Tensor::empty(Shape{cols, rows}, DType::u8, dev);
  Tensor err = Tensor::empty(Shape{block, rows}, DType::f32, dev);
  Tensor fit_scratch;
  if (dev.is_cuda() && fit_in_loop) fit_scratch = Tensor::empty(Shape{rows, group}, DType::f32, dev);

  cpu::GptqColumnLoop loop;
  loop.format = format;
  loop.rows = rows;
  loop.cols = cols;
  loop.u = u.data<float>();
  loop.wt = wt.data<float>();
  loop.err = err.data<float>();
  loop.codes = codes.data<std::uint8_t>();
  loop.grids = reinterpret_cast<cpu::IntGrid*>(grid_tensor.data<float>());
  loop.groups_per_row = gpr;
  loop.group_of_column = group_of_column.data<std::int32_t>();
  loop.fit_group = fit_in_loop ? group : 0;

  for (std::int64_t b = 0, begin = 0; begin < cols; begin += block, ++b) {  // 6.
    const std::int64_t end = std::min(begin + block, cols);
    if (dev.is_cpu()) {
      cpu::gptq_block_columns(loop, begin, end);
    } else {
#if defined(QLORA_WITH_CUDA)
      cuda::gptq_block_columns(loop, begin, end, wt.data<float>(), fit_scratch.defined() ? fit_scratch.data<float>() : nullptr,
                               cuda::current_stream());
#endif
    }
    if (end == cols) break;
    Tensor trailing = wt.slice(end, cols);
    const Tensor panel =
        panels.slice(panel_offset[std::size_t(b)], panel_offset[std::size_t(b)] + (end - begin) * (cols - end))
            .reshape(Shape{end - begin, cols - end});
    ops::matmul_into(trailing, panel, err.slice(0, end - begin), /*trans_a=*/true, /*trans_b=*/false, -1.f, 1.f);
  }

  const Tensor codes_host = codes.to(Device::cpu());
  const Tensor grids_host = grid_tensor.to(Device::cpu());
  return detail::gptq_assemble(cfg, rows, cols, perm, codes_host.data<std::uint8_t>(),
                               reinterpret_cast<const cpu::IntGrid*>(grids_host.data<float>()));  // 7.
}

}  // namespace qlora::quant
