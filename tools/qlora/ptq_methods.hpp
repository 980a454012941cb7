#pragma once
// The post-training quantization methods `qlora quantize --method` knows, in one table. A method is a
// per-layer quantizer (models/llama/calibration.hpp's LayerQuantizer: name, dense W, Gram H -> the
// quantized W) and optionally a per-block transform run on the block's calibration inputs before its
// linears are quantized (AWQ / AQAS scaling).

#include <functional>
#include <string>
#include <vector>

#include "models/llama/aqas.hpp"
#include "models/llama/calibration.hpp"
#include "qlora/quant/comq.hpp"
#include "qlora/quant/gptq.hpp"
#include "qlora/quant/magr.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::tool {

// What the flags say about the method.
struct PtqSettings {
  quant::QuantConfig format;  // the stored format (--format, or --bits/--group/--sym)
  double damp = 0.01;         // GPTQ's percdamp: H += damp * mean(diag H) * I
  bool act_order = false;     // GPTQ's act_order (columns by decreasing diag H)
  int act_bits = 0;           // 0 or 8 (W4A8)
  Device device = Device::cpu();  // where GPTQ's column loop, COMQ's sweeps and MagR's iterations run
  double grid_shrink = 1.0;       // MagR's beta (--magr): the methods with fits_magr_grid fit its shrunk grids
};

struct PtqMethod {
  std::string name;
  std::string summary;
  bool calibrated = false;  // needs --calib
  bool nf4_only = false;    // the method is a format: --format must be NF4
  // Empty: the method is not available in this build.
  std::function<models::llama::LayerQuantizer(const PtqSettings&)> make_quantizer;
  // Empty: no per-block transform.
  std::function<models::llama::BlockTransform(const PtqSettings&)> make_block_transform;
  bool fits_magr_grid = false;  // honours PtqSettings::grid_shrink (MagR's quantizer grid after --magr)
};

// Round to nearest in the stored format (quant/quantize.hpp): the same numbers as loading with --quant; on
// MagR's shrunk grid when grid_shrink < 1 (magr_rtn_quantize, which is quantize at beta = 1).
inline models::llama::LayerQuantizer round_to_nearest(const PtqSettings& s) {
  return [format = s.format, beta = s.grid_shrink](const std::string&, const Tensor& w, const Tensor&) {
    return beta == 1.0 ? quant::quantize(w, format) : quant::magr_rtn_quantize(w, format, beta);
  };
}

inline models::llama::LayerQuantizer gptq(const PtqSettings& s) {
  quant::GptqOptions o;
  o.damp = s.damp;
  o.act_order = s.act_order;
  o.static_groups = s.act_order && s.format.group != 0;  // our groups run along natural columns (docs/ptq.md)
  o.device = s.device;
  o.grid_shrink = s.grid_shrink;
  return [format = s.format, o](const std::string&, const Tensor& w, const Tensor& h) {
    return quant::gptq_quantize(w, h, format, o);
  };
}

inline models::llama::LayerQuantizer comq(const PtqSettings& s) {
  quant::ComqOptions o;
  o.update_scales = true;
  // The sweeps run on --device (W and H moved there); the result comes back to the host, as GPTQ's does.
  return [format = s.format, o, device = s.device](const std::string&, const Tensor& w, const Tensor& h) {
    return quant::comq_quantize(w.to(device), h.to(device), format, o).to(Device::cpu());
  };
}

// AWQ (activations unquantized in the search) or AQAS (both operands quantized, 8-bit activations unless
// --act-bits says otherwise), folded into the block before its linears are quantized.
inline std::function<models::llama::BlockTransform(const PtqSettings&)> scale_search(bool quantize_activations) {
  return [quantize_activations](const PtqSettings& s) -> models::llama::BlockTransform {
    models::llama::AqasOptions o;
    o.weight_format = s.format;
    o.quantize_activations = quantize_activations;
    if (s.act_bits != 0) o.activation_bits = s.act_bits;
    // Collective: each rank searches on its own windows' inputs; apply_aqas exchanges the statistics.
    return [o](models::llama::DecoderBlock& block, const std::vector<Tensor>& inputs, dist::Communicator& comm) {
      (void)models::llama::apply_aqas(block, inputs, o, comm);
    };
  };
}

inline const std::vector<PtqMethod>& ptq_methods() {
  static const std::vector<PtqMethod> methods = {
      {"rtn", "round to nearest in any format (int, dint, nf4)", false, false, round_to_nearest, {}, true},
      {"nf4", "NF4 with double quantization (QLoRA), round to nearest", false, true, round_to_nearest, {}},
      {"gptq", "GPTQ / OPTQ with damping, lazy blocks, act-order (baselines.md section 3)", true, false, gptq, {}, true},
      {"comq", "COMQ greedy coordinate descent from RTN, one sweep with scale updates (comq.md)", true, false, comq, {}},
      {"awq", "AWQ activation-aware scaling (weights only in the search), then round to nearest", true, false,
       round_to_nearest, scale_search(false)},
      {"aqas", "AQAS scaling searched with weights and 8-bit activations quantized, then round to nearest "
               "(w4a8-aqas-slac-dint.md)", true, false, round_to_nearest, scale_search(true)},
  };
  return methods;
}

// MagR (magr.md): W preprocessed with the layer's H (the l-infinity proximal steps) before any method. The
// quantizer after it is the method's own; rtn and gptq fit MagR's shrunk grids through grid_shrink (set by
// magr_grid_shrink), COMQ and the scaled methods their usual ones.
inline models::llama::LayerQuantizer with_magr(models::llama::LayerQuantizer inner, const PtqSettings& s) {
  quant::MagrOptions o = quant::magr_options_for_group(s.format.group);
  o.device = s.device;
  return [inner = std::move(inner), o](const std::string& name, const Tensor& w, const Tensor& h) {
    return inner(name, quant::magr_preprocess(w, h, o), h);
  };
}

// MagR's beta for a method and format: `requested` (--magr-beta; 0 = not given) or the code's default for the
// format (magr_default_beta), where the method fits MagR's grid and the format has an integer grid without the
// MSE search (which beta replaces); 1 otherwise. An explicit beta that cannot apply is an error.
inline double magr_grid_shrink(const PtqMethod& m, const quant::QuantConfig& format, double requested) {
  const bool applies = m.fits_magr_grid && format.scheme != quant::Scheme::nf4 && !format.mse_search;
  if (requested == 0) return applies ? quant::magr_default_beta(format) : 1.0;
  if (!(requested > 0 && requested <= 1)) throw Error("--magr-beta must be in (0, 1], got " + std::to_string(requested));
  if (!m.fits_magr_grid) throw Error("--magr-beta applies to --method rtn and gptq, not " + m.name);
  if (!applies) throw Error("--magr-beta shrinks an integer grid without -mse; --format " + format.name() + " has none");
  return requested;
}

inline const PtqMethod& find_ptq_method(const std::string& name) {
  std::string names;
  for (const PtqMethod& m : ptq_methods()) {
    if (m.name == name) return m;
    names += (names.empty() ? "" : ", ") + m.name;
  }
  throw Error("--method '" + name + "' is not a quantization method (" + names + ")");
}

}  // namespace qlora::tool
