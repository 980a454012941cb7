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
};

// Round to nearest in the stored format (quant/quantize.hpp): the same numbers as loading with --quant.
inline models::llama::LayerQuantizer round_to_nearest(const PtqSettings& s) {
  return [format = s.format](const std::string&, const Tensor& w, const Tensor&) { return quant::quantize(w, format); };
}

inline models::llama::LayerQuantizer gptq(const PtqSettings& s) {
  quant::GptqOptions o;
  o.damp = s.damp;
  o.act_order = s.act_order;
  o.static_groups = s.act_order && s.format.group != 0;  // our groups run along natural columns (docs/ptq.md)
  o.device = s.device;
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
    return [o](models::llama::DecoderBlock& block, const std::vector<Tensor>& inputs) {
      (void)models::llama::apply_aqas(block, inputs, o);
    };
  };
}

inline const std::vector<PtqMethod>& ptq_methods() {
  static const std::vector<PtqMethod> methods = {
      {"rtn", "round to nearest in any format (int, dint, nf4)", false, false, round_to_nearest, {}},
      {"nf4", "NF4 with double quantization (QLoRA), round to nearest", false, true, round_to_nearest, {}},
      {"gptq", "GPTQ / OPTQ with damping, lazy blocks, act-order (baselines.md section 3)", true, false, gptq, {}},
      {"comq", "COMQ greedy coordinate descent from RTN, one sweep with scale updates (comq.md)", true, false, comq, {}},
      {"awq", "AWQ activation-aware scaling (weights only in the search), then round to nearest", true, false,
       round_to_nearest, scale_search(false)},
      {"aqas", "AQAS scaling searched with weights and 8-bit activations quantized, then round to nearest "
               "(w4a8-aqas-slac-dint.md)", true, false, round_to_nearest, scale_search(true)},
  };
  return methods;
}

// MagR (magr.md): W preprocessed with the layer's H (the l-infinity proximal steps) before any method. After
// plain RTN the grid is MagR's own shrunk one (magr_rtn_quantize with the code's beta for the format); GPTQ,
// COMQ and the scaled methods quantize the preprocessed W with their usual grids.
inline models::llama::LayerQuantizer with_magr(models::llama::LayerQuantizer inner, const PtqSettings& s,
                                               bool plain_rtn) {
  quant::MagrOptions o = quant::magr_options_for_group(s.format.group);
  o.device = s.device;
  return [inner = std::move(inner), format = s.format, o, plain_rtn](const std::string& name, const Tensor& w,
                                                                     const Tensor& h) {
    const Tensor reduced = quant::magr_preprocess(w, h, o);
    if (plain_rtn && format.scheme != quant::Scheme::nf4 && !format.mse_search)
      return quant::magr_rtn_quantize(reduced, format, quant::magr_default_beta(format));
    return inner(name, reduced, h);
  };
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
