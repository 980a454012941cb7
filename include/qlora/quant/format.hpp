#pragma once
// Quantized weight formats (issue 4): what a quantized 2-D weight is and how many bits it costs.
// Maths: ../shared/methods/baselines.md sections 1 (INT, GPTQ grid), 2 (NF4 + double quantization),
// w4a8-aqas-slac-dint.md section 3 (dINT). Layouts and tables: docs/quant.md.
//
// The public API of the quant layer (namespace qlora::quant):
//
//   enum class Scheme { nf4, int_asym, int_sym, dint };
//   struct QuantConfig {                    // format.hpp
//     Scheme scheme; int bits; int group; bool double_quant, float_zeros, mse_search;
//     static QuantConfig parse(std::string_view name);   // "nf4", "nf4-nodq", "int4-g64", "int2-g0",
//     std::string name() const;                         //  "int4-g64-sym", "dint4-g128", ... (grammar below)
//     void validate() const;
//   };
//   struct QuantizedTensor { ... };         // format.hpp: codes, scales, zeros, DQ constants of one W
//   double bits_per_weight(const QuantConfig&, std::int64_t rows, std::int64_t cols);   // format.hpp
//   QuantizedTensor quantize(const Tensor& w, const QuantConfig&);                       // quantize.hpp
//   Tensor dequantize(const QuantizedTensor&, DType out = DType::f32);                   // dequantize.hpp
//   void dequantize_rows_into(const QuantizedTensor&, std::int64_t row_begin,
//                             std::int64_t row_end, Tensor& out);                       // dequantize.hpp
//   Tensor gemv(const QuantizedTensor&, const Tensor& x);                                // gemv.hpp
// The CPU twins (what a CUDA kernel mirrors) are in qlora/cpu/quant_*.hpp. quantize runs on the CPU;
// dequantize_rows_into and gemv also run on a CUDA-resident QuantizedTensor (q.to(Device::cuda())) in
// builds linked with qlora_cuda, through packed_weight.hpp and qlora/cuda/quant.hpp.
//
// Name grammar (parse accepts the suffixes in any order, each once; name() writes this order):
//   nf4[-gG][-nodq]                       G defaults to 64 (the QLoRA block)
//   intB-gG[-sym][-fz][-mse]              B in {2,3,4,8}; -sym symmetric, -fz f32 zeros, -mse range search
//   dintB-gG[-fz][-mse]                   B in {3,4}
// G is 0 (one group per row) or a power of two from 16 to 4096. A row whose length G does not divide
// ends with a shorter group: groups never straddle rows.

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/core/device.hpp"
#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/cpu/quant_pack.hpp"

namespace qlora::quant {

enum class Scheme { nf4, int_asym, int_sym, dint };

struct QuantConfig {
  Scheme scheme = Scheme::nf4;
  int bits = 4;              // nf4: 4; int_asym/int_sym: 2, 3, 4, 8; dint: 3, 4
  int group = 64;            // elements per group along a row; 0 = one group per row (per-channel)
  bool double_quant = true;  // nf4 only: QLoRA double quantization of the block absmax
  bool float_zeros = false;  // int_asym/dint: zeros stored as f32 (exact adapter merging) instead of u8
  bool mse_search = false;   // int/dint: GPTQ's range search (grid 100, maxshrink 0.8, norm 2.4)

  static QuantConfig parse(std::string_view name);
  std::string name() const;
  void validate() const;

  bool operator==(const QuantConfig&) const = default;
};

namespace detail {

inline bool parse_int(std::string_view text, int& value) {
  if (text.empty() || text.size() > 6) return false;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  return ec == std::errc() && end == text.data() + text.size();
}

inline std::vector<std::string_view> split_dashes(std::string_view text) {
  std::vector<std::string_view> parts;
  while (true) {
    const std::size_t dash = text.find('-');
    parts.push_back(text.substr(0, dash));
    if (dash == std::string_view::npos) return parts;
    text.remove_prefix(dash + 1);
  }
}

}  // namespace detail

inline void QuantConfig::validate() const {
  const std::string what = "quantization format '" + name() + "': ";
  switch (scheme) {
    case Scheme::nf4:
      QLORA_CHECK(bits == 4, what + "NF4 has 4 bits, not " + std::to_string(bits));
      QLORA_CHECK(!float_zeros, what + "NF4 has no zero points (float_zeros applies to int/dint)");
      QLORA_CHECK(!mse_search, what + "the MSE range search applies to int/dint, not NF4 (absmax blocks)");
      break;
    case Scheme::int_asym:
    case Scheme::int_sym:
      QLORA_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
                  what + "unsupported bit width " + std::to_string(bits) + " (int supports 2, 3, 4, 8)");
      QLORA_CHECK(!double_quant, what + "double quantization applies to NF4 only");
      QLORA_CHECK(!(scheme == Scheme::int_sym && float_zeros),
                  what + "symmetric int has no stored zeros (its zero is fixed at 2^(bits-1)); use asymmetric int for float zeros");
      break;
    case Scheme::dint:
      QLORA_CHECK(bits == 3 || bits == 4,
                  what + "unsupported bit width " + std::to_string(bits) + " (dint supports 3 and 4)");
      QLORA_CHECK(!double_quant, what + "double quantization applies to NF4 only");
      break;
  }
  const bool power_of_two = group > 0 && (group & (group - 1)) == 0;
  QLORA_CHECK(group == 0 || (power_of_two && group >= 16 && group <= 4096),
              what + "unsupported group size " + std::to_string(group) +
                  " (0 = one group per row, or a power of two from 16 to 4096)");
}

inline std::string QuantConfig::name() const {
  const std::string g = "-g" + std::to_string(group);
  switch (scheme) {
    case Scheme::nf4:
      return "nf4" + (group == 64 ? std::string() : g) + (double_quant ? "" : "-nodq") + (mse_search ? "-mse" : "") +
             (float_zeros ? "-fz" : "");
    case Scheme::int_asym:
    case Scheme::int_sym:
      return "int" + std::to_string(bits) + g + (scheme == Scheme::int_sym ? "-sym" : "") + (float_zeros ? "-fz" : "") +
             (mse_search ? "-mse" : "") + (double_quant ? "-dq" : "");
    case Scheme::dint:
      return "dint" + std::to_string(bits) + g + (float_zeros ? "-fz" : "") + (mse_search ? "-mse" : "") +
             (double_quant ? "-dq" : "");
  }
  return "?";
}

inline QuantConfig QuantConfig::parse(std::string_view name) {
  const std::string bad = "unknown quantization format '" + std::string(name) +
                          "' (expected nf4[-gG][-nodq], intB-gG[-sym][-fz][-mse] with B in 2,3,4,8, or dintB-gG[-fz][-mse] "
                          "with B in 3,4; G = 0 or a power of two 16..4096)";
  const auto parts = detail::split_dashes(name);
  QuantConfig cfg;
  std::string_view head = parts[0];
  bool has_group = false;
  if (head == "nf4") {
    cfg = QuantConfig{Scheme::nf4, 4, 64, true, false, false};
  } else {
    const bool dint = head.starts_with("dint");
    QLORA_CHECK(dint || head.starts_with("int"), bad);
    head.remove_prefix(dint ? 4 : 3);
    int bits = 0;
    QLORA_CHECK(detail::parse_int(head, bits), bad);
    cfg = QuantConfig{dint ? Scheme::dint : Scheme::int_asym, bits, 64, false, false, false};
  }
  bool seen_nodq = false, seen_sym = false, seen_fz = false, seen_mse = false;
  for (std::size_t i = 1; i < parts.size(); ++i) {
    const std::string_view p = parts[i];
    auto once = [&](bool& seen) {
      QLORA_CHECK(!seen, bad + ": '" + std::string(p) + "' given twice");
      seen = true;
    };
    if (p.starts_with("g")) {
      QLORA_CHECK(!has_group, bad + ": group given twice");
      QLORA_CHECK(detail::parse_int(p.substr(1), cfg.group), bad);
      has_group = true;
    } else if (p == "nodq" && cfg.scheme == Scheme::nf4) {
      once(seen_nodq);
      cfg.double_quant = false;
    } else if (p == "sym" && cfg.scheme == Scheme::int_asym) {
      once(seen_sym);
      cfg.scheme = Scheme::int_sym;
    } else if (p == "fz" && cfg.scheme != Scheme::nf4) {
      once(seen_fz);
      cfg.float_zeros = true;
    } else if (p == "mse" && cfg.scheme != Scheme::nf4) {
      once(seen_mse);
      cfg.mse_search = true;
    } else {
      throw Error(bad);
    }
  }
  QLORA_CHECK(has_group || cfg.scheme == Scheme::nf4, bad + ": int and dint need a group, e.g. -g64 or -g0");
  try {
    cfg.validate();
  } catch (const Error& e) {
    throw Error(bad + ": " + e.what());
  }
  return cfg;
}

// A quantized 2-D weight W (rows = d_out, cols = d_in), row-major, on one device. Which members are
// defined depends on the scheme (docs/quant.md, "Formats"):
//   codes          u8 [rows, row_stride_bytes()]   packed codes (cpu/quant_pack.hpp), every scheme
//   scales         int/dint: f16 [rows, groups_per_row()]; nf4 without DQ: f32 block absmax, same shape
//   zeros          int_asym/dint: u8 or (float_zeros) f32 [rows, groups_per_row()]; int_sym: undefined
//   absmax_codes   nf4+DQ: u8 [rows * groups_per_row()], code q + 127 of the block constant (q in -127..127)
//   absmax_scales  nf4+DQ: f32 [ceil(rows * groups_per_row() / 256)], absmax of each 256 centred constants
//   absmax_mean    nf4+DQ: the mean subtracted from the block constants before their 8-bit quantization
struct QuantizedTensor {
  QuantConfig config;
  std::int64_t rows = 0, cols = 0;
  Tensor codes;
  Tensor scales;
  Tensor zeros;
  Tensor absmax_codes;
  Tensor absmax_scales;
  float absmax_mean = 0.f;

  std::int64_t group_size() const { return config.group == 0 ? cols : config.group; }
  std::int64_t groups_per_row() const { return (cols + group_size() - 1) / group_size(); }
  std::int64_t row_stride_bytes() const { return cpu::packed_row_bytes(cols, config.bits); }
  Device device() const { return codes.device(); }

  QuantizedTensor to(Device device) const {
    QuantizedTensor out = *this;
    for (Tensor* t : {&out.codes, &out.scales, &out.zeros, &out.absmax_codes, &out.absmax_scales})
      if (t->defined()) *t = t->to(device);
    return out;
  }

  // Bytes of every member tensor, plus the 4 bytes of absmax_mean with double quantization.
  std::size_t storage_bytes() const {
    std::size_t bytes = 0;
    for (const Tensor* t : {&codes, &scales, &zeros, &absmax_codes, &absmax_scales})
      if (t->defined()) bytes += t->nbytes();
    if (config.scheme == Scheme::nf4 && config.double_quant) bytes += sizeof(float);
    return bytes;
  }

  // Throws qlora::Error naming the member whose presence, dtype, shape or device does not match the
  // config: for tensors built by hand or read from a file. quantize() always produces a valid one.
  void check(std::string_view who = "quantized tensor") const;
};

// Number of double-quantization blocks (256 block constants each) of a NF4+DQ matrix.
inline constexpr std::int64_t kDoubleQuantBlock = 256;

namespace detail {

inline void expect_member(std::string_view who, const Tensor& t, std::string_view member, bool wanted, DType dtype,
                          const Shape& shape, Device device) {
  const std::string prefix = std::string(who) + ": member '" + std::string(member) + "' ";
  if (!wanted) {
    QLORA_CHECK(!t.defined(), prefix + "must be undefined for this format");
    return;
  }
  QLORA_CHECK(t.defined(), prefix + "is missing");
  QLORA_CHECK(t.dtype() == dtype, prefix + "has dtype " + std::string(dtype_name(t.dtype())) + ", expected " +
                                      std::string(dtype_name(dtype)));
  QLORA_CHECK(t.shape() == shape, prefix + "has shape " + t.shape().str() + ", expected " + shape.str());
  QLORA_CHECK(t.device() == device, prefix + "is on " + t.device().str() + ", expected " + device.str());
}

}  // namespace detail

inline void QuantizedTensor::check(std::string_view who) const {
  const std::string name = std::string(who) + " (" + config.name() + ", " + std::to_string(rows) + " x " +
                           std::to_string(cols) + ")";
  config.validate();
  QLORA_CHECK(rows >= 1 && cols >= 1, name + ": rows and cols must be positive");
  const Device dev = device();
  const std::int64_t gpr = groups_per_row();
  const bool nf4 = config.scheme == Scheme::nf4;
  const bool dq = nf4 && config.double_quant;
  const bool has_zeros = config.scheme == Scheme::int_asym || config.scheme == Scheme::dint;
  const std::int64_t n_const = rows * gpr;
  detail::expect_member(name, codes, "codes", true, DType::u8, Shape{rows, row_stride_bytes()}, dev);
  detail::expect_member(name, scales, "scales", !dq, nf4 ? DType::f32 : DType::f16, Shape{rows, gpr}, dev);
  detail::expect_member(name, zeros, "zeros", has_zeros, config.float_zeros ? DType::f32 : DType::u8, Shape{rows, gpr},
                        dev);
  detail::expect_member(name, absmax_codes, "absmax_codes", dq, DType::u8, Shape{n_const}, dev);
  detail::expect_member(name, absmax_scales, "absmax_scales", dq, DType::f32,
                        Shape{(n_const + kDoubleQuantBlock - 1) / kDoubleQuantBlock}, dev);
}

// Bits per weight of a rows x cols matrix in this format, counting everything that is stored: packed
// codes including each row's padding to 16 bytes, scales, zeros, and the second-level DQ constants
// (8-bit codes, one f32 absmax per 256 of them, the f32 mean). Equals
// quantize(w, cfg).storage_bytes() * 8 / (rows * cols).
inline double bits_per_weight(const QuantConfig& cfg, std::int64_t rows, std::int64_t cols) {
  cfg.validate();
  QLORA_CHECK(rows >= 1 && cols >= 1, "bits_per_weight: shape " + std::to_string(rows) + " x " + std::to_string(cols) +
                                          " must be positive");
  const std::int64_t group = cfg.group == 0 ? cols : cfg.group;
  const std::int64_t n_const = rows * ((cols + group - 1) / group);
  double bytes = double(rows) * double(cpu::packed_row_bytes(cols, cfg.bits));
  switch (cfg.scheme) {
    case Scheme::nf4:
      if (cfg.double_quant)
        bytes += double(n_const) + 4.0 * double((n_const + kDoubleQuantBlock - 1) / kDoubleQuantBlock) + 4.0;
      else
        bytes += 4.0 * double(n_const);
      break;
    case Scheme::int_sym: bytes += 2.0 * double(n_const); break;
    case Scheme::int_asym:
    case Scheme::dint: bytes += (2.0 + (cfg.float_zeros ? 4.0 : 1.0)) * double(n_const); break;
  }
  return bytes * 8.0 / (double(rows) * double(cols));
}

}  // namespace qlora::quant
