#pragma once
// The Llama model's configuration and load options. The architecture is io::LlamaConfig (every file
// format is read into it); what the model adds is how to build it: device, activation dtype, the base
// quantization, the adapters and which linear layers carry them.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qlora/core/device.hpp"
#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/nn/adapter_config.hpp"
#include "qlora/ops/rope.hpp"
#include "qlora/quant/format.hpp"

namespace qlora::models::llama {

using Config = io::LlamaConfig;

// The seven linear layers of a decoder block, in HF naming (the LM head is never a target).
inline const std::vector<std::string>& all_block_linears() {
  static const std::vector<std::string> names = {"q_proj", "k_proj", "v_proj", "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

struct LoadOptions {
  Device device = Device::cpu();
  // Activations and the frozen dense tensors (embedding, norms, LM head, dense bases): f32 on the CPU
  // (f64 for gradient checks), bf16 or f32 on CUDA. nullopt: f32 on the CPU, bf16 on CUDA.
  std::optional<DType> dtype;
  // The base format of every block linear (quantized on load, one layer at a time); nullopt: dense.
  std::optional<quant::QuantConfig> quant;
  // Adapters on the `targets` linears of every block; kind none: a frozen model (inference).
  nn::AdapterConfig adapter = {nn::AdapterKind::none};
  std::vector<std::string> targets = all_block_linears();
  DType param_dtype = DType::f32;  // adapter master weights (f64 for gradient checks on the CPU)
  std::uint64_t seed = 0;          // the adapters' initial draw
  // W4A8: every block linear fake-quantizes its base input per token to this many bits (4..8); 0 = off
  // (docs/ptq.md, "W4A8"). The adapters see the unquantized input.
  int activation_bits = 0;

  DType activation_dtype() const { return dtype.value_or(device.is_cpu() ? DType::f32 : DType::bf16); }

  void validate() const {
    for (const std::string& t : targets)
      QLORA_CHECK(std::find(all_block_linears().begin(), all_block_linears().end(), t) != all_block_linears().end(),
                  "adapter target '" + t + "' is not a block linear (expected q_proj, k_proj, v_proj, o_proj, "
                  "gate_proj, up_proj or down_proj)");
    const DType d = activation_dtype();
    if (device.is_cpu())
      QLORA_CHECK(d == DType::f32 || d == DType::f64, "the CPU model runs in f32 or f64, not " + std::string(dtype_name(d)));
    else
      QLORA_CHECK(d == DType::f32 || d == DType::bf16, "the CUDA model runs in bf16 or f32, not " + std::string(dtype_name(d)));
    QLORA_CHECK(param_dtype == DType::f32 || (param_dtype == DType::f64 && device.is_cpu()),
                "adapter parameters are f32 (or f64 on the CPU), not " + std::string(dtype_name(param_dtype)));
    if (quant) quant->validate();
    QLORA_CHECK(activation_bits == 0 || (activation_bits >= 4 && activation_bits <= 8),
                "activation bits must be 0 (off) or 4..8, got " + std::to_string(activation_bits));
  }
};

// RoPE inverse frequencies with the config's rope_scaling applied (f32 host tensor, (head_dim / 2)).
//   linear: positions divided by factor, i.e. every frequency divided by factor.
//   llama3: transformers' _compute_llama3_parameters: wavelengths above original_max / low_freq_factor
//           are divided by factor, below original_max / high_freq_factor kept, smoothly interpolated between.
inline Tensor rope_frequencies(const Config& c) {
  Tensor inv = ops::rope_inv_freq(c.head_dim, c.rope_theta);
  if (!c.rope_scaling) return inv;
  const io::RopeScaling& s = *c.rope_scaling;
  float* f = inv.data<float>();
  for (std::int64_t i = 0; i < inv.numel(); ++i) {
    const double freq = f[i];
    if (s.type == "linear") {
      f[i] = float(freq / s.factor);
      continue;
    }
    const double old_ctx = double(s.original_max_position_embeddings);
    const double low_wavelen = old_ctx / s.low_freq_factor, high_wavelen = old_ctx / s.high_freq_factor;
    const double wavelen = 2 * M_PI / freq;
    double out = freq;
    if (wavelen > low_wavelen) {
      out = freq / s.factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      out = (1 - smooth) * freq / s.factor + smooth * freq;
    }
    f[i] = float(out);
  }
  return inv;
}

}  // namespace qlora::models::llama
