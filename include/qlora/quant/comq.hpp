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
// Runs where w and h are: on the CPU one output row per OpenMP thread (loops in qlora/cpu/comq.hpp); on a
// CUDA device one thread block per row (cuda/quant/comq.cu, the CPU loops its twin), in a build linked with
// qlora_cuda. Cost per sweep: one row of H read per coordinate, rows * cols^2 multiply-adds, bandwidth bound
// on H (see docs/ptq.md, "COMQ"). On CUDA the checks, RTN's grid and the unpacking and packing of the codes
// stay on the host (rows * cols work and bytes, against rows * cols^2 for the sweeps); the result comes back
// on w's device.
// Started from the given codes (the default), every step is an exact coordinate or block minimiser, so the
// result's layer error is never above the start's.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/cpu/comq.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/int_codes.hpp"
#include "qlora/quant/layer_inputs.hpp"
#include "qlora/quant/quantize.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/comq.hpp"
#include "qlora/cuda/runtime.hpp"
#endif

namespace qlora::quant {

struct ComqOptions {
  int sweeps = 1;                   // code sweeps (the code's --iters, default 1)
  bool greedy_order = true;         // the paper's greedy order (--greedy); false: natural column order
  bool update_scales = false;       // closed-form scale per (row, group) after each sweep (not in the code)
  bool start_from_weights = false;  // true: Q = W before the first sweep, as the released code does (the
                                    // first sweep then rounds with error feedback; no bound by the start)
};

namespace detail {

inline cpu::ComqSettings comq_settings(const IntCodes& u, const ComqOptions& opts) {
  cpu::ComqSettings settings;
  settings.kind = u.kind;
  settings.bits = u.bits;
  settings.group = u.group;
  settings.sweeps = opts.sweeps;
  settings.greedy_order = opts.greedy_order;
  settings.update_scales = opts.update_scales;
  settings.start_from_weights = opts.start_from_weights;
  return settings;
}

// W and H both on the CPU or both on one CUDA device (the rest is checked on their host copies, with the same
// messages on every device: check_layer_inputs).
inline void comq_check_devices(const Tensor& w, const Tensor& h, const std::string& who) {
  if (!w.defined() || !h.defined()) return;  // check_layer_inputs names the undefined one
  QLORA_CHECK(w.device() == h.device(), who + ": the weight W is on " + w.device().str() + " but the Gram matrix H on " +
                                            h.device().str() + "; both must be on one device");
#if !defined(QLORA_WITH_CUDA)
  QLORA_CHECK(w.device().is_cpu(), who + ": W and H are on " + w.device().str() + " but qlora was built without CUDA");
#endif
}

// t itself when it is on the CPU (or undefined), else its copy there.
inline Tensor host_copy(const Tensor& t) { return t.defined() ? t.to(Device::cpu()) : t; }

inline void comq_check_options(const QuantizedTensor& start, const Tensor& w, const ComqOptions& opts,
                               const std::string& who) {
  QLORA_CHECK(opts.sweeps >= 1, who + ": sweeps must be at least 1, got " + std::to_string(opts.sweeps));
  QLORA_CHECK(start.rows == w.dim(0) && start.cols == w.dim(1),
              who + ": the starting quantization is " + std::to_string(start.rows) + " x " +
                  std::to_string(start.cols) + " but W is " + w.str());
}

// The sweeps on the CPU, codes and grids of u updated in place. w, h: checked host tensors.
inline void comq_sweeps_on_host(const Tensor& w, const Tensor& h, const ComqOptions& opts, IntCodes& u) {
  const cpu::ComqSettings settings = comq_settings(u, opts);
  const Tensor w32 = w.to(DType::f32);
  if (h.dtype() == DType::f64)
    cpu::comq_rows(settings, w32.data<float>(), h.data<double>(), u.rows, u.cols, u.codes.data(), u.grids.data());
  else
    cpu::comq_rows(settings, w32.data<float>(), h.data<float>(), u.rows, u.cols, u.codes.data(), u.grids.data());
}

#if defined(QLORA_WITH_CUDA)
// The sweeps on `device` (cuda/quant/comq.cu), codes and grids of u updated in place. w_host, h_host: the
// checked host copies; h_device: H on the device (f32 or f64).
inline void comq_sweeps_on_device(const Tensor& w_host, const Tensor& h_host, const Tensor& h_device,
                                  const ComqOptions& opts, IntCodes& u, Device device) {
  static_assert(sizeof(cpu::IntGrid) == 2 * sizeof(float), "grids travel between devices as f32 pairs");
  const cpu::ComqSettings settings = comq_settings(u, opts);
  const std::int64_t rows = u.rows, cols = u.cols;
  cuda::set_device(device.index);
  const cuda::Stream stream = cuda::current_stream();
  std::vector<std::int32_t> live;  // the columns with H_jj > 0, in natural order
  for (std::int64_t j = 0; j < cols; ++j) {
    const double h_jj = h_host.dtype() == DType::f64 ? h_host.data<double>()[j * cols + j]
                                                     : double(h_host.data<float>()[j * cols + j]);
    if (h_jj > 0) live.push_back(std::int32_t(j));
  }
  const auto active = std::int64_t(live.size());
  const Tensor w32 = w_host.to(DType::f32).to(device);
  Tensor codes = Tensor::from(u.codes, Shape{rows, cols}).to(device);
  Tensor grids = Tensor::empty(Shape{rows, u.groups_per_row, 2}, DType::f32);
  std::copy_n(reinterpret_cast<const float*>(u.grids.data()), rows * u.groups_per_row * 2, grids.data<float>());
  grids = grids.to(device);
  auto* grid_ptr = reinterpret_cast<cpu::IntGrid*>(grids.data<float>());

  Tensor order;
  std::int64_t order_stride = 0;
  if (active == 0) {
    order = Tensor::empty(Shape{1}, DType::i32, device);
  } else if (opts.greedy_order) {
    order = Tensor::empty(Shape{rows, cols}, DType::i32, device);
    order_stride = cols;
    const std::size_t bytes = cuda::comq_greedy_order_scratch_bytes(rows, cols);
    Tensor scratch = Tensor::empty(Shape{std::int64_t(std::max<std::size_t>(bytes, 1))}, DType::u8, device);
    if (h_device.dtype() == DType::f64)
      cuda::comq_greedy_order(w32.data<float>(), h_device.data<double>(), rows, cols, order.data<std::int32_t>(),
                              scratch.data(), bytes, stream);
    else
      cuda::comq_greedy_order(w32.data<float>(), h_device.data<float>(), rows, cols, order.data<std::int32_t>(),
                              scratch.data(), bytes, stream);
  } else {
    order = Tensor::from(live, Shape{active}).to(device);
  }
  const std::size_t scratch_bytes = cuda::comq_rows_scratch_bytes(rows, cols);
  Tensor scratch;
  if (scratch_bytes > 0) scratch = Tensor::empty(Shape{std::int64_t(scratch_bytes)}, DType::u8, device);
  void* scratch_ptr = scratch_bytes > 0 ? scratch.data() : nullptr;
  if (h_device.dtype() == DType::f64)
    cuda::comq_rows(settings, w32.data<float>(), h_device.data<double>(), rows, cols, order.data<std::int32_t>(),
                    order_stride, active, codes.data<std::uint8_t>(), grid_ptr, scratch_ptr, stream);
  else
    cuda::comq_rows(settings, w32.data<float>(), h_device.data<float>(), rows, cols, order.data<std::int32_t>(),
                    order_stride, active, codes.data<std::uint8_t>(), grid_ptr, scratch_ptr, stream);
  u.codes = codes.to_vector<std::uint8_t>();
  const std::vector<float> grids_host = grids.to_vector<float>();
  std::copy_n(grids_host.data(), grids_host.size(), reinterpret_cast<float*>(u.grids.data()));
}
#endif

// COMQ from `start` with w, h already checked; w_host, h_host: w and h themselves on the CPU, else their
// host copies.
inline QuantizedTensor comq_refine_checked(const Tensor& w, const Tensor& h, [[maybe_unused]] const Tensor& w_host,
                                           [[maybe_unused]] const Tensor& h_host,
                                           const QuantizedTensor& start, const ComqOptions& opts,
                                           const std::string& who) {
  comq_check_options(start, w, opts, who);
  const QuantizedTensor start_host = start.to(Device::cpu());
  IntCodes u = unpack_int_codes(start_host, who);
  if (w.device().is_cpu()) {
    comq_sweeps_on_host(w, h, opts, u);
  } else {
#if defined(QLORA_WITH_CUDA)
    comq_sweeps_on_device(w_host, h_host, h, opts, u, w.device());
#endif
  }
  QuantizedTensor out = start_host;
  out.codes = start_host.codes.clone();
  out.scales = start_host.scales.clone();
  if (start_host.zeros.defined()) out.zeros = start_host.zeros.clone();  // never write through to start's storage
  store_int_codes(u, out);
  return out.to(w.device());
}

}  // namespace detail

// COMQ from `start` (an INT/dINT quantization of a weight of w's shape: its grids and codes, on any device),
// for the layer error of the ORIGINAL weights w under H [cols, cols] (X^T X / N, f32 or f64). w and h on the
// CPU or both on one CUDA device (where the sweeps then run). Returns the refined tensor in start's format,
// on w's device.
inline QuantizedTensor comq_refine(const Tensor& w, const Tensor& h, const QuantizedTensor& start,
                                   const ComqOptions& opts = {}) {
  const std::string who = "comq (" + start.config.name() + ")";
  detail::comq_check_devices(w, h, who);
  const Tensor w_host = detail::host_copy(w), h_host = detail::host_copy(h);
  detail::check_layer_inputs(w_host, h_host, who);
  return detail::comq_refine_checked(w, h, w_host, h_host, start, opts, who);
}

// COMQ on the RTN grid of cfg (int asym/sym or dint, any group size, -mse picks the grid as RTN does):
// w [rows, cols] f32/f64, h [cols, cols], on the CPU or both on one CUDA device (RTN's grid is fitted on the
// host either way). Throws qlora::Error on NF4, bad shapes or devices, NaN/Inf.
inline QuantizedTensor comq_quantize(const Tensor& w, const Tensor& h, const QuantConfig& cfg,
                                     const ComqOptions& opts = {}) {
  cfg.validate();
  const std::string who = "comq (" + cfg.name() + ")";
  QLORA_CHECK(cfg.scheme != Scheme::nf4, who + ": needs an integer grid (int or dint), not NF4");
  detail::comq_check_devices(w, h, who);
  const Tensor w_host = detail::host_copy(w), h_host = detail::host_copy(h);
  detail::check_layer_inputs(w_host, h_host, who);
  return detail::comq_refine_checked(w, h, w_host, h_host, quantize(w_host, cfg), opts, who);
}

}  // namespace qlora::quant
