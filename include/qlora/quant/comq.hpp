#pragma once
// COMQ (../shared/methods/comq.md; Zhang et al., "COMQ: A Backpropagation-Free Algorithm for Post-Training
// Quantization", arXiv 2403.07134; code AozhongZhang/COMQ): coordinate-wise minimisation of the layer error
// tr((W - Q) H (W - Q)^T) over the integer codes of Q, visiting each row's columns in the greedy order
// |w_ij| sqrt(H_jj) descending, on the grid RTN would use; optionally alternating with closed-form
// per-(row, group) scale updates. The result is an ordinary QuantizedTensor: same storage and kernels as RTN.
//
//   comq_quantize(w, h, cfg, opts)   RTN grid of cfg, then COMQ sweeps (int asym/sym, dint; group-wise too)
//   comq_refine(w, h, start, opts)   COMQ sweeps from any INT/dINT QuantizedTensor: RTN, MagR's shrunk RTN,
//                                    GPTQ (the refinement the MagR code runs after GPTQ) ...
//
// Runs on the CPU (one output row per OpenMP thread; loops in qlora/cpu/comq.hpp). Cost per sweep: one row
// of H read per coordinate, rows * cols^2 multiply-adds, bandwidth bound on H (see docs/ptq.md, "COMQ").
// Started from the given codes (the default), every step is an exact coordinate or block minimiser, so the
// result's layer error is never above the start's.

#include <cstdint>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/cpu/comq.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/int_codes.hpp"
#include "qlora/quant/layer_inputs.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::quant {

struct ComqOptions {
  int sweeps = 1;                   // code sweeps (the code's --iters, default 1)
  bool greedy_order = true;         // the paper's greedy order (--greedy); false: natural column order
  bool update_scales = false;       // closed-form scale per (row, group) after each sweep (not in the code)
  bool start_from_weights = false;  // true: Q = W before the first sweep, as the released code does (the
                                    // first sweep then rounds with error feedback; no bound by the start)
};

// COMQ from `start` (an INT/dINT quantization of a weight of w's shape: its grids and codes), for the layer
// error of the ORIGINAL weights w under H [cols, cols] (X^T X / N, f32 or f64). Returns the refined tensor
// in start's format.
inline QuantizedTensor comq_refine(const Tensor& w, const Tensor& h, const QuantizedTensor& start,
                                   const ComqOptions& opts = {}) {
  const std::string who = "comq (" + start.config.name() + ")";
  detail::check_layer_inputs(w, h, who);
  QLORA_CHECK(opts.sweeps >= 1, who + ": sweeps must be at least 1, got " + std::to_string(opts.sweeps));
  QLORA_CHECK(start.rows == w.dim(0) && start.cols == w.dim(1),
              who + ": the starting quantization is " + std::to_string(start.rows) + " x " +
                  std::to_string(start.cols) + " but W is " + w.str());
  IntCodes u = unpack_int_codes(start, who);
  cpu::ComqSettings settings;
  settings.kind = u.kind;
  settings.bits = u.bits;
  settings.group = u.group;
  settings.sweeps = opts.sweeps;
  settings.greedy_order = opts.greedy_order;
  settings.update_scales = opts.update_scales;
  settings.start_from_weights = opts.start_from_weights;
  const Tensor w32 = w.to(DType::f32);
  if (h.dtype() == DType::f64)
    cpu::comq_rows(settings, w32.data<float>(), h.data<double>(), u.rows, u.cols, u.codes.data(), u.grids.data());
  else
    cpu::comq_rows(settings, w32.data<float>(), h.data<float>(), u.rows, u.cols, u.codes.data(), u.grids.data());
  QuantizedTensor out = start;
  out.codes = start.codes.clone();
  out.scales = start.scales.clone();
  if (start.zeros.defined()) out.zeros = start.zeros.clone();  // never write through to start's storage
  store_int_codes(u, out);
  return out;
}

// COMQ on the RTN grid of cfg (int asym/sym or dint, any group size, -mse picks the grid as RTN does):
// w [rows, cols] f32/f64 on the CPU, h [cols, cols]. Throws qlora::Error on NF4, bad shapes, NaN/Inf.
inline QuantizedTensor comq_quantize(const Tensor& w, const Tensor& h, const QuantConfig& cfg,
                                     const ComqOptions& opts = {}) {
  cfg.validate();
  QLORA_CHECK(cfg.scheme != Scheme::nf4,
              "comq (" + cfg.name() + "): needs an integer grid (int or dint), not NF4");
  detail::check_layer_inputs(w, h, "comq (" + cfg.name() + ")");
  return comq_refine(w, h, quantize(w, cfg), opts);
}

}  // namespace qlora::quant
