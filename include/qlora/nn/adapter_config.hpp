#pragma once
// Adapter configuration and the presets of the QLoRA family (methods/qblora.md, "Generic operator"):
//   y = deq(Wq) x + s * E_k( B( A( drop(P_p x) ) ) ),   A: r' x d_in/p,  B: d_out/k x r'
//
// | preset  | p      | k        | adapter                     | rank r'                                   |
// | lora    | 1      | 1        | low rank                    | r                                         |
// | qblora  | 2      | 2        | low rank                    | 2r (same parameter count as LoRA)         |
// | qalora  | g      | 1        | low rank                    | r                                         |
// | qablora | g      | 2 (opt.) | low rank                    | raised to LoRA's parameter count, capped  |
// | hira    | 4      | 8        | one full matrix d_out/k x d_in/p (the single-matrix variant)            |
// The scale is s = alpha / r with the NOMINAL r for every preset, as the released Q-BLoRA code does.
// g is the quantization group of the base (0 = per-row, which pools the whole row).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "qlora/core/error.hpp"

namespace qlora::nn {

enum class AdapterKind { none, lora, qblora, qalora, qablora, hira };
enum class AdapterInit { kaiming, xavier };  // of A (or of the full matrix: zero); B always starts at 0

inline std::string_view adapter_kind_name(AdapterKind kind) {
  switch (kind) {
    case AdapterKind::none: return "none";
    case AdapterKind::lora: return "lora";
    case AdapterKind::qblora: return "qblora";
    case AdapterKind::qalora: return "qalora";
    case AdapterKind::qablora: return "qablora";
    case AdapterKind::hira: return "hira";
  }
  return "?";
}

inline AdapterKind parse_adapter_kind(std::string_view name) {
  for (AdapterKind k : {AdapterKind::none, AdapterKind::lora, AdapterKind::qblora, AdapterKind::qalora,
                        AdapterKind::qablora, AdapterKind::hira})
    if (adapter_kind_name(k) == name) return k;
  throw Error("unknown adapter '" + std::string(name) + "' (expected lora, qblora, qalora, qablora, hira or none)");
}

struct AdapterConfig {
  AdapterKind kind = AdapterKind::lora;
  int rank = 64;        // nominal r (QLoRA default)
  float alpha = 16.f;   // s = alpha / rank
  float dropout = 0.f;  // on the pooled adapter input
  int pool = 0;         // p; 0 = the preset's
  int repeat = 0;       // k; 0 = the preset's
  AdapterInit init = AdapterInit::kaiming;
};

// An adapter's geometry for one layer, with every divisibility checked.
struct AdapterShape {
  AdapterKind kind = AdapterKind::none;
  std::int64_t pool = 1, repeat = 1;  // p, k
  std::int64_t rank = 0;              // r' (low rank); 0 for hira and none
  float scale = 0.f;                  // s
  float dropout = 0.f;
  AdapterInit init = AdapterInit::kaiming;
  bool full_matrix() const { return kind == AdapterKind::hira; }
  std::int64_t pooled_in(std::int64_t d_in) const { return d_in / pool; }
  std::int64_t pooled_out(std::int64_t d_out) const { return d_out / repeat; }
};

// Resolves a configuration for a layer of d_out x d_in whose base quantization group is quant_group
// (0 = per row; ignored for non-QA presets).
inline AdapterShape resolve_adapter(const AdapterConfig& cfg, std::int64_t d_out, std::int64_t d_in,
                                    std::int64_t quant_group, std::string_view layer = "layer") {
  const std::string where = "adapter " + std::string(adapter_kind_name(cfg.kind)) + " on " + std::string(layer) +
                            " (" + std::to_string(d_out) + " x " + std::to_string(d_in) + "): ";
  AdapterShape a;
  a.kind = cfg.kind;
  a.dropout = cfg.dropout;
  a.init = cfg.init;
  if (cfg.kind == AdapterKind::none) return a;
  if (cfg.rank < 1) throw Error(where + "rank must be >= 1, got " + std::to_string(cfg.rank));
  if (!(cfg.dropout >= 0.f && cfg.dropout < 1.f))
    throw Error(where + "dropout must be in [0, 1), got " + std::to_string(cfg.dropout));
  const std::int64_t g = quant_group > 0 ? quant_group : d_in;
  switch (cfg.kind) {
    case AdapterKind::lora: a.pool = 1, a.repeat = 1; break;
    case AdapterKind::qblora: a.pool = 2, a.repeat = 2; break;
    case AdapterKind::qalora: a.pool = g, a.repeat = 1; break;
    case AdapterKind::qablora: a.pool = g, a.repeat = 2; break;
    case AdapterKind::hira: a.pool = 4, a.repeat = 8; break;
    case AdapterKind::none: break;
  }
  if (cfg.pool > 0) a.pool = cfg.pool;
  if (cfg.repeat > 0) a.repeat = cfg.repeat;
  if (d_in % a.pool != 0)
    throw Error(where + "input pooling p = " + std::to_string(a.pool) + " does not divide d_in = " + std::to_string(d_in));
  if (d_out % a.repeat != 0)
    throw Error(where + "output repeat k = " + std::to_string(a.repeat) + " does not divide d_out = " +
                std::to_string(d_out));
  a.scale = cfg.alpha / float(cfg.rank);
  const std::int64_t in_p = d_in / a.pool, out_k = d_out / a.repeat;
  switch (cfg.kind) {
    case AdapterKind::lora:
    case AdapterKind::qalora: a.rank = cfg.rank; break;
    case AdapterKind::qblora: a.rank = 2 * std::int64_t(cfg.rank); break;
    case AdapterKind::qablora: {
      // Same trainable parameter count as LoRA of rank r: r' (d_in/p + d_out/k) = r (d_in + d_out), capped
      // at the largest rank the pooled shapes allow (a higher rank adds parameters but no expressiveness).
      const double lora_params = double(cfg.rank) * double(d_in + d_out);
      a.rank = std::max<std::int64_t>(1, std::llround(lora_params / double(in_p + out_k)));
      a.rank = std::min(a.rank, std::min(in_p, out_k));
      break;
    }
    default: break;
  }
  return a;
}

// Trainable parameters of an adapter of this shape on a d_out x d_in layer.
inline std::int64_t adapter_parameter_count(const AdapterShape& a, std::int64_t d_out, std::int64_t d_in) {
  if (a.kind == AdapterKind::none) return 0;
  if (a.full_matrix()) return a.pooled_out(d_out) * a.pooled_in(d_in);
  return a.rank * (a.pooled_in(d_in) + a.pooled_out(d_out));
}

}  // namespace qlora::nn
