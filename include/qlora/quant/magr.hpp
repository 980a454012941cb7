#pragma once
// MagR (../shared/methods/magr.md; Zhang et al., "MagR: Weight Magnitude Reduction for Enhancing
// Post-Training Quantization", NeurIPS 2024, arXiv 2406.00800; code AozhongZhang/MagR): replaces a layer's
// weights by nearby weights with a smaller per-channel (or per-group) max magnitude that give almost the
// same outputs on the calibration data, before quantization. No inference overhead: the result is an
// ordinary weight, quantized by RTN, GPTQ or COMQ afterwards.
//
//   magr_preprocess(w, h, opts)       W' = argmin 0.5 ||Xn (W' - W)^T||_F^2 + alpha sum ||w'_seg||_inf, by
//                                     `iterations` proximal-gradient steps (step 1, Hn = H / lambda_max(H)):
//                                       V = W' - (W' - W) Hn;   W' = prox_{alpha ||.||inf}(V) per segment
//   magr_rtn_quantize(w, cfg, beta)   RTN on MagR's quantizer grid: the GPTQ range [lo, hi] (containing 0)
//                                     with the scale shrunk by beta: scale = beta (hi - lo) / qmax,
//                                     zero = round(-lo / scale) (quant.py)
//   magr_default_beta(cfg)            the code's beta: 1.0 / 0.9 / 0.8 at 4 / 3 / 2 bits per channel,
//                                     0.95 for group 128, 1.0 for group 64
//   magr_objective(w, w', h, opts)    the objective above (tests, diagnostics)
//
// Composition (llama.py, optq.py): Wm = magr_preprocess(W, H); then quantize(Wm, cfg) (plain RTN),
// magr_rtn_quantize(Wm, cfg, beta), GPTQ on Wm, or comq_refine(W, H, magr_rtn_quantize(Wm, ...)) (COMQ
// against the ORIGINAL weights, as the MagR code's coordinate-descent post-pass does).
//
// The iterations are matmuls (ops::matmul: Eigen on the CPU, cuBLASLt in f32 on CUDA when opts.device is a
// CUDA device in a build linked with qlora_cuda) plus the prox kernel (qlora/cpu/magr.hpp,
// cuda/quant/magr.cu). The Gram matrix is the full-calibration H (gram.hpp); the released code takes the SVD
// of the last calibration batch only (magr.md), which is not reproduced.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/cpu/magr.hpp"
#include "qlora/cpu/quant_fp.hpp"
#include "qlora/cpu/quant_int.hpp"
#include "qlora/cuda/magr.hpp"
#include "qlora/cuda/runtime.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/int_codes.hpp"
#include "qlora/quant/layer_inputs.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::quant {

struct MagrOptions {
  double alpha = 1e-3;            // l_inf weight (the code's per-channel default; 1e-4 for group 128)
  int iterations = 200;           // proximal-gradient steps (the code's n_iter; not converged at 200)
  int group = 0;                  // 0: one l_inf term per row; G > 0: one per (row, group of G columns)
  Device device = Device::cpu();  // where the iterations run
};

// The code's defaults for a group size: alpha 1e-3 per channel (group 0), 1e-4 group-wise.
inline MagrOptions magr_options_for_group(int group) {
  MagrOptions o;
  o.group = group;
  o.alpha = group == 0 ? 1e-3 : 1e-4;
  return o;
}

namespace detail {

inline void check_magr_options(const MagrOptions& o, const std::string& who) {
  QLORA_CHECK(std::isfinite(o.alpha) && o.alpha >= 0, who + ": alpha must be finite and >= 0, got " + std::to_string(o.alpha));
  QLORA_CHECK(o.iterations >= 0, who + ": iterations must be >= 0, got " + std::to_string(o.iterations));
  QLORA_CHECK(o.group >= 0, who + ": group must be 0 (per row) or positive, got " + std::to_string(o.group));
#if !defined(QLORA_WITH_CUDA)
  QLORA_CHECK(o.device.is_cpu(), who + ": device " + o.device.str() + " requested but qlora was built without CUDA");
#endif
}

// lambda_max of a symmetric PSD H [n, n] (f32 or f64, CPU) by power iteration in f64 from a fixed
// non-constant start: ||H v|| for unit v, until it changes by less than 1e-10 relative (at most 1000 steps).
// It converges from below; a step 1/lambda slightly above 1/L still decreases MagR's objective (any step
// below 2/L does). On the host whatever the device of the iterations, so both paths use the same lambda.
template <class HT>
double power_iteration_lambda_max(const HT* h, std::int64_t n) {
  std::vector<double> v(static_cast<std::size_t>(n)), y(static_cast<std::size_t>(n));
  double norm = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    v[std::size_t(i)] = 1.0 + 0.5 * double((std::uint64_t(i) * 2654435761u) % 1000u) / 1000.0;
    norm += v[std::size_t(i)] * v[std::size_t(i)];
  }
  for (auto& x : v) x /= std::sqrt(norm);
  double lambda = 0;
  for (int step = 0; step < 1000; ++step) {
#pragma omp parallel for if (qlora::cpu::worth_parallel(n * n))
    for (std::int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (std::int64_t k = 0; k < n; ++k) s += double(h[i * n + k]) * v[std::size_t(k)];
      y[std::size_t(i)] = s;
    }
    double s = 0;
    for (const double x : y) s += x * x;
    const double next = std::sqrt(s);
    if (!(next > 0)) return 0.0;
    for (std::int64_t i = 0; i < n; ++i) v[std::size_t(i)] = y[std::size_t(i)] / next;
    const bool converged = std::fabs(next - lambda) <= 1e-10 * next;
    lambda = next;
    if (converged) break;
  }
  return lambda;
}

// out = prox_{t ||.||inf}(v) per (row, group) segment, on v's device.
inline void linf_prox(const Tensor& v, Tensor& out, std::int64_t group, double t) {
  const std::int64_t rows = v.dim(0), cols = v.dim(1);
  if (v.device().is_cpu()) {
    cpu::linf_prox_rows(v.data<float>(), out.data<float>(), rows, cols, group, t);
    return;
  }
#if defined(QLORA_WITH_CUDA)
  cuda::set_device(v.device().index);
  cuda::linf_prox_rows(v.data<float>(), out.data<float>(), rows, cols, group, float(t), cuda::current_stream());
#endif
}

}  // namespace detail

// lambda_max(H) of a Gram matrix H [cols, cols] (f32/f64, CPU): the Lipschitz constant MagR divides by.
inline double gram_spectral_norm(const Tensor& h) {
  detail::check_host_matrix(h, "gram_spectral_norm", "the Gram matrix H");
  QLORA_CHECK(h.dim(0) == h.dim(1), "gram_spectral_norm: H must be square, got " + h.str());
  return h.dtype() == DType::f64 ? detail::power_iteration_lambda_max(h.data<double>(), h.dim(0))
                                 : detail::power_iteration_lambda_max(h.data<float>(), h.dim(0));
}

// W' [rows, cols] f32 on the CPU from w [rows, cols] and h [cols, cols] (f32/f64, CPU tensors, finite; H
// non-zero). alpha = 0 or iterations = 0 return W exactly (as f32).
inline Tensor magr_preprocess(const Tensor& w, const Tensor& h, const MagrOptions& opts = {}) {
  const std::string who = "magr";
  detail::check_layer_inputs(w, h, who);
  detail::check_magr_options(opts, who);
  const std::int64_t rows = w.dim(0), cols = w.dim(1);
  const std::int64_t group = opts.group == 0 ? cols : std::min<std::int64_t>(opts.group, cols);
  const Tensor w_dev = w.to(DType::f32).to(opts.device);
  if (opts.iterations == 0 || opts.alpha == 0) return w_dev.to(Device::cpu()).clone();
  const Tensor h_dev = h.to(DType::f32).to(opts.device);
  const double lambda = gram_spectral_norm(h);
  QLORA_CHECK(lambda > 0 && std::isfinite(lambda),
              who + ": the Gram matrix H is zero (no calibration signal), MagR has nothing to preserve");
  const Tensor hn = ops::scale(h_dev, float(1.0 / lambda));  // ||Hn||_2 = 1: step size 1
  Tensor wm = w_dev.clone();
  Tensor diff = Tensor::empty(Shape{rows, cols}, DType::f32, opts.device);
  Tensor v = Tensor::empty(Shape{rows, cols}, DType::f32, opts.device);
  for (int it = 0; it < opts.iterations; ++it) {
    diff.copy_from(wm);
    ops::axpy_(diff, -1.f, w_dev);                                     // W' - W
    v.copy_from(wm);
    ops::matmul_into(v, diff, hn, false, false, -1.f, 1.f);            // V = W' - (W' - W) Hn
    detail::linf_prox(v, wm, group, opts.alpha);                       // W' = prox(V)
  }
  return wm.to(Device::cpu());
}

// 0.5 ||Xn (W' - W)^T||_F^2 + alpha sum_seg ||w'_seg||_inf with Xn^T Xn = H / lambda_max(H), in f64.
inline double magr_objective(const Tensor& w, const Tensor& w_magr, const Tensor& h, const MagrOptions& opts = {}) {
  detail::check_layer_inputs(w, h, "magr_objective");
  detail::check_host_matrix(w_magr, "magr_objective", "W'");
  QLORA_CHECK(w_magr.shape() == w.shape(), "magr_objective: W' " + w_magr.str() + " and W " + w.str() + " differ in shape");
  const std::int64_t rows = w.dim(0), cols = w.dim(1);
  const std::int64_t group = opts.group == 0 ? cols : std::min<std::int64_t>(opts.group, cols);
  const double lambda = gram_spectral_norm(h);
  const Tensor a = w.to(DType::f64), b = w_magr.to(DType::f64), hh = h.to(DType::f64);
  const double *pa = a.data<double>(), *pb = b.data<double>(), *ph = hh.data<double>();
  double smooth = 0, penalty = 0;
  std::vector<double> d(static_cast<std::size_t>(cols));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < cols; ++j) d[std::size_t(j)] = pb[r * cols + j] - pa[r * cols + j];
    for (std::int64_t i = 0; i < cols; ++i) {
      double s = 0;
      for (std::int64_t j = 0; j < cols; ++j) s += ph[i * cols + j] * d[std::size_t(j)];
      smooth += d[std::size_t(i)] * s;
    }
    for (std::int64_t begin = 0; begin < cols; begin += group) {
      double m = 0;
      for (std::int64_t j = begin; j < std::min(cols, begin + group); ++j) m = std::max(m, std::fabs(pb[r * cols + j]));
      penalty += m;
    }
  }
  return 0.5 * smooth / lambda + opts.alpha * penalty;
}

// The code's beta for a format: group 64 -> 1.0, group 128 -> 0.95, otherwise by bits: 2 -> 0.8, 3 -> 0.9,
// else 1.0 (per-channel settings of the README; other group sizes have no published value).
inline double magr_default_beta(const QuantConfig& cfg) {
  if (cfg.group == 64) return 1.0;
  if (cfg.group == 128) return 0.95;
  return cfg.bits == 2 ? 0.8 : cfg.bits == 3 ? 0.9 : 1.0;
}

// RTN on MagR's shrunk grid: per (row, group) the grid of [lo, lo + beta (hi - lo)], where [lo, hi] is the
// range RTN uses (int_range: containing 0 for int, symmetric for -sym, raw for dint), i.e. scale =
// beta (hi - lo) / qmax and zero = round(-lo / scale); values above the shrunk top clamp to the last code.
// beta in (0, 1]; beta = 1 is exactly quantize(w, cfg). INT/dINT formats without -mse (beta replaces the
// MSE range search). w [rows, cols] f32/f64 on the CPU.
inline QuantizedTensor magr_rtn_quantize(const Tensor& w, const QuantConfig& cfg, double beta) {
  cfg.validate();
  const std::string who = "magr_rtn_quantize (" + cfg.name() + ")";
  QLORA_CHECK(cfg.scheme != Scheme::nf4, who + ": needs an integer grid (int or dint), not NF4");
  QLORA_CHECK(beta > 0 && beta <= 1, who + ": beta must be in (0, 1], got " + std::to_string(beta));
  QLORA_CHECK(!cfg.mse_search || beta == 1.0, who + ": beta replaces the MSE range search; drop -mse");
  QuantizedTensor q = quantize(w, cfg);
  if (beta == 1.0) return q;
  IntCodes u = unpack_int_codes(q, who);
  const Tensor w32 = w.to(DType::f32);
  const float* wp = w32.data<float>();
  const float b = float(beta);
#pragma omp parallel for if (qlora::cpu::worth_parallel(u.rows * u.cols))
  for (std::int64_t r = 0; r < u.rows; ++r)
    for (std::int64_t g = 0; g < u.groups_per_row; ++g) {
      const std::int64_t begin = g * u.group, n = std::min(u.cols, begin + u.group) - begin;
      u.grids[std::size_t(r * u.groups_per_row + g)] = cpu::quantize_int_group(
          u.kind, u.bits, false, wp + r * u.cols + begin, n, u.codes.data() + r * u.cols + begin, b);
    }
  store_int_codes(u, q);
  return q;
}

}  // namespace qlora::quant
