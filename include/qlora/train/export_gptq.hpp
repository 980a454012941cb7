#pragma once
// Exporting a model as a GPTQ checkpoint that AutoGPTQ and transformers (optimum GPTQ, GPTQModel) load
// (docs/export.md, "--to gptq"). The layout follows AutoGPTQ/AutoGPTQ auto_gptq/nn_modules/qlinear/
// qlinear_cuda_old.py: QuantLinear.pack() and the torch dequantization of its forward(). For bits b in
// {2, 3, 4, 8}, every block linear W [out, in] becomes
//   <linear>.qweight  i32 [in b / 32, out]   column o: the codes code(o, 0..in) as one bit stream
//   <linear>.qzeros   i32 [groups, out b / 32] row g: the zeros zero(0..out, g) - offset as one bit stream
//   <linear>.scales   f16 [groups, out]
//   <linear>.g_idx    i32 [in]               i / group_size (groups in column order: desc_act false)
// where "one bit stream" is pack()'s order: code k occupies bits [b k, b k + b) of the little-endian
// concatenation of the words. At 2, 4 and 8 bits that is 32 / b codes per word, low bits first; at 3 bits
// pack()'s loops (ten codes, one split over two words, ten, one split, ten) are the same stream, 32 codes
// in 3 words. AutoGPTQ dequantizes w(o, i) = scales[g, o] * (code - ((stored zero & mask) + offset)),
// g = g_idx[i]. That is our grid, w = scale * (code - zero) (quant/format.hpp), with the same f16 scales and
// integer zeros, so the export is exact. checkpoint_format "gptq" (v1, AutoGPTQ's): offset 1, pack()
// stores zeros - 1, so a zero point of 0 has no v1 form (pack() would write -1 into the neighbours' bits;
// GPTQModel's v1 -> v2 conversion adds 1 per field and carries): refused, naming the tensor. "gptq_v2"
// (GPTQModel) stores the zero itself (offset 0). GPTQ's act-order (quantize --act-order) runs with static
// groups along natural columns here (docs/ptq.md), for which AutoGPTQ's g_idx is i / group_size as well.
// Non-quantized tensors are f16; config.json carries quantization_config and quantize_config.json repeats
// it for AutoGPTQ.

#include <bit>
#include <numeric>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/llama/model.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/quant/int_codes.hpp"
#include "qlora/quant/quantize.hpp"
#include "qlora/train/export.hpp"

namespace qlora::train {

// quantize_config.json's checkpoint_format.
enum class GptqCheckpointFormat { gptq, gptq_v2 };

inline const char* gptq_checkpoint_format_name(GptqCheckpointFormat f) {
  return f == GptqCheckpointFormat::gptq ? "gptq" : "gptq_v2";
}

inline GptqCheckpointFormat parse_gptq_checkpoint_format(const std::string& name) {
  if (name == "gptq") return GptqCheckpointFormat::gptq;
  if (name == "gptq_v2") return GptqCheckpointFormat::gptq_v2;
  throw Error("GPTQ checkpoint format '" + name + "' is not supported (gptq or gptq_v2)");
}

// What the stored zero point is short of the real one: v1 writes zero - 1.
inline int gptq_zero_offset(GptqCheckpointFormat f) { return f == GptqCheckpointFormat::gptq ? 1 : 0; }

// Why a base format has no GPTQ form ("" when it has one).
inline std::string gptq_format_refusal(const quant::QuantConfig& c) {
  const std::string fmt = c.name();
  switch (c.scheme) {
    case quant::Scheme::nf4: return fmt + " has no GPTQ form (GPTQ stores integer codes on a uniform grid, NF4 a lookup table)";
    case quant::Scheme::dint: return fmt + " has no GPTQ form (dINT's half-step codes +-s/2 are not on GPTQ's uniform grid)";
    case quant::Scheme::int_asym:
    case quant::Scheme::int_sym: break;
  }
  if (c.bits != 2 && c.bits != 3 && c.bits != 4 && c.bits != 8)
    return fmt + ": GPTQ packs 2, 3, 4 or 8-bit codes, not " + std::to_string(c.bits);
  return "";
}

// The fewest codes that fill whole int32 words at `bits` (16, 32, 8, 4 for 2, 3, 4, 8 bits): a packed
// dimension must be a multiple of it.
inline int gptq_codes_per_unit(int bits) { return 32 / std::gcd(32, bits); }

// Packs `count` codes (a multiple of gptq_codes_per_unit(bits)) as one bit stream, code k in bits
// [bits k, bits k + bits): word j of the stream is words[j * word_stride]. A code that crosses a word
// boundary (3 bits) puts its low bits at the top of one word and its high bits at the bottom of the next.
template <class CodeAt>
void pack_gptq_bit_stream(std::int64_t count, int bits, CodeAt code_at, std::int32_t* words, std::int64_t word_stride) {
  const std::int64_t n_words = count * bits / 32;
  for (std::int64_t j = 0; j < n_words; ++j) words[j * word_stride] = 0;
  for (std::int64_t k = 0; k < count; ++k) {
    const std::uint64_t code = code_at(k);
    const std::int64_t bit = k * bits, word = bit / 32;
    const int shift = int(bit % 32);
    const std::uint64_t placed = code << shift;  // up to 39 bits: the part above 32 spills into the next word
    words[word * word_stride] = std::bit_cast<std::int32_t>(std::bit_cast<std::uint32_t>(words[word * word_stride]) |
                                                            std::uint32_t(placed));
    if (shift + bits > 32)
      words[(word + 1) * word_stride] = std::bit_cast<std::int32_t>(
          std::bit_cast<std::uint32_t>(words[(word + 1) * word_stride]) | std::uint32_t(placed >> 32));
  }
}

// The four GPTQ tensors of one linear.
struct GptqLinear {
  Tensor qweight, qzeros, scales, g_idx;
};

// `q` (an INT base of `name`, any device) in GPTQ's layout. Refuses, naming `name`, what GPTQ cannot hold:
// a format without a GPTQ form, in or out features not a multiple of 32 / bits (whole int32 words), a group
// that does not divide the row (AutoGPTQ's kernels reshape by whole groups), a fractional zero point (an
// adapter merged into the zeros) and, in v1, a zero point of 0.
inline GptqLinear pack_gptq_linear(const quant::QuantizedTensor& q, GptqCheckpointFormat format, const std::string& name) {
  const std::string refusal = gptq_format_refusal(q.config);
  QLORA_CHECK(refusal.empty(), "export to gptq: " + name + ": " + refusal);
  const quant::IntCodes u = quant::unpack_int_codes(q.to(Device::cpu()), "export to gptq: " + name);
  const int bits = u.bits, unit = gptq_codes_per_unit(bits);
  const std::int64_t out = u.rows, in = u.cols, groups = u.groups_per_row;
  const std::string shape = std::to_string(out) + " x " + std::to_string(in);
  QLORA_CHECK(in % unit == 0 && out % unit == 0,
              "export to gptq: " + name + " (" + shape + ") cannot be packed: GPTQ packs " + std::to_string(bits) +
                  "-bit codes into whole int32 words along both dimensions, so in and out features must be multiples of " +
                  std::to_string(unit));
  QLORA_CHECK(in % u.group == 0, "export to gptq: " + name + " (" + shape + "): group size " + std::to_string(u.group) +
                                     " does not divide its " + std::to_string(in) + " input features (GPTQ kernels need "
                                     "whole groups; use -g0 or a group that divides every layer)");

  const std::uint32_t mask = (1u << bits) - 1u;
  GptqLinear g;
  g.qweight = Tensor::empty(Shape{in * bits / 32, out}, DType::i32);
  for (std::int64_t o = 0; o < out; ++o)  // column o of qweight: row o of the codes, along the input dimension
    pack_gptq_bit_stream(in, bits, [&](std::int64_t i) { return u.codes[std::size_t(o * in + i)]; },
                         g.qweight.data<std::int32_t>() + o, out);

  const int offset = gptq_zero_offset(format);
  g.qzeros = Tensor::empty(Shape{groups, out * bits / 32}, DType::i32);
  g.scales = Tensor::empty(Shape{groups, out}, DType::f16);
  f16* scales = g.scales.data<f16>();
  std::int64_t unstorable = 0;
  std::string first;
  for (std::int64_t j = 0; j < groups; ++j) {
    const auto stored_zero = [&](std::int64_t o) -> std::uint32_t {
      const cpu::IntGrid grid = u.grids[std::size_t(o * groups + j)];
      scales[j * out + o] = to_f16(grid.scale);  // an f16 value already: exact
      QLORA_CHECK(std::nearbyint(grid.zero) == grid.zero,
                  "export to gptq: " + name + " has a fractional zero point " + std::to_string(grid.zero) + " (row " +
                      std::to_string(o) + ", group " + std::to_string(j) + "; an adapter merged into the zeros): GPTQ "
                      "stores integer zeros, so re-quantize the merged weights instead");
      const double stored = double(grid.zero) - offset;
      if (stored >= 0 && stored <= double(mask)) return std::uint32_t(stored);
      if (unstorable++ == 0) first = "row " + std::to_string(o) + ", group " + std::to_string(j);
      return 0;
    };
    pack_gptq_bit_stream(out, bits, stored_zero, g.qzeros.data<std::int32_t>() + j * (out * bits / 32), 1);
  }
  QLORA_CHECK(unstorable == 0,
              "export to gptq: " + name + " has " + std::to_string(unstorable) + " group(s) whose zero point " +
                  (offset == 1 ? "is 0, which checkpoint_format \"gptq\" (v1, stores zero - 1) cannot hold (first: "
                               : "is outside 0.." + std::to_string(mask) + " (first: ") +
                  first + "); " + (offset == 1 ? "use checkpoint_format gptq_v2 (qlora export --gptq-format gptq_v2) or a symmetric format (-sym)" : "re-quantize"));

  g.g_idx = Tensor::empty(Shape{in}, DType::i32);
  for (std::int64_t i = 0; i < in; ++i) g.g_idx.data<std::int32_t>()[i] = std::int32_t(i / u.group);
  return g;
}

// quantization_config of config.json and the whole of quantize_config.json (AutoGPTQ's BaseQuantizeConfig
// fields; transformers' GPTQConfig reads the same names). group_size -1 is one group per row (our -g0).
inline nlohmann::ordered_json gptq_quantization_config(const quant::QuantConfig& format, GptqCheckpointFormat checkpoint,
                                                       double damp_percent) {
  nlohmann::ordered_json j;
  j["bits"] = format.bits;
  j["group_size"] = format.group == 0 ? -1 : format.group;
  j["damp_percent"] = damp_percent;
  j["desc_act"] = false;  // g_idx is i / group_size: groups in column order
  j["static_groups"] = false;
  j["sym"] = format.scheme == quant::Scheme::int_sym;
  j["true_sequential"] = true;
  j["model_name_or_path"] = nullptr;
  j["model_file_base_name"] = "model";
  j["quant_method"] = "gptq";
  j["checkpoint_format"] = gptq_checkpoint_format_name(checkpoint);
  return j;
}

struct GptqExportOptions {
  GptqCheckpointFormat checkpoint_format = GptqCheckpointFormat::gptq;
  // Set: every block linear is W + dW (its adapter merged into a dense copy) RTN-quantized into this format.
  // Unset: every block linear's stored INT base is written as it is (no adapter allowed).
  std::optional<quant::QuantConfig> requantize;
  double damp_percent = 0.01;  // recorded in the config (the damping of the GPTQ run that made the codes, if any)
  std::filesystem::path tokenizer_source;  // a HF directory whose tokenizer files are copied; empty: none
};

struct GptqExportResult {
  quant::QuantConfig format;                // the format of every block linear
  std::vector<std::string> tokenizer_files;  // copied from tokenizer_source
};

// Writes OUT/model.safetensors, OUT/config.json (with quantization_config), OUT/quantize_config.json and the
// tokenizer files; OUT appears only when complete. Every block linear must end in one GPTQ-representable
// format (pack_gptq_linear says what is refused).
inline GptqExportResult export_gptq(models::llama::Model& model, const std::filesystem::path& out_dir,
                                    const GptqExportOptions& options = {}) {
  GptqExportResult result;
  std::optional<quant::QuantConfig> format = options.requantize;
  if (format) {
    format->validate();
    const std::string refusal = gptq_format_refusal(*format);
    QLORA_CHECK(refusal.empty(), "export to gptq: " + refusal);
  }
  const auto dense = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::f32).to(DType::f16); };
  const auto tensors = detail::hf_checkpoint_tensors(model, dense, [&](const nn::Linear& linear) {
    quant::QuantizedTensor q;
    if (options.requantize) {
      q = quant::quantize(linear.merged_weight(DType::f32), *options.requantize);
    } else {
      const quant::QuantizedTensor* stored = linear.quantized_weight();
      QLORA_CHECK(stored != nullptr, "export to gptq: " + linear.name() +
                                         " has a dense base; name a format to RTN-quantize into (--quant intB-gG) or "
                                         "export a directory written by qlora quantize");
      QLORA_CHECK(linear.adapter_shape().kind == nn::AdapterKind::none,
                  "export to gptq: " + linear.name() + " carries an adapter; GPTQ holds integer zeros, so the merged "
                  "weights must be re-quantized (--quant intB-gG)");
      q = *stored;
      if (!format) format = q.config;
      QLORA_CHECK(q.config.scheme == format->scheme && q.config.bits == format->bits && q.config.group == format->group,
                  "export to gptq: " + linear.name() + " is " + q.config.name() + " but the other layers are " +
                      format->name() + " (one quantize_config.json holds one format)");
    }
    const GptqLinear g = pack_gptq_linear(q, options.checkpoint_format, linear.name());
    return std::vector<std::pair<std::string, Tensor>>{{linear.name() + ".qweight", g.qweight},
                                                       {linear.name() + ".qzeros", g.qzeros},
                                                       {linear.name() + ".scales", g.scales},
                                                       {linear.name() + ".g_idx", g.g_idx}};
  });
  QLORA_CHECK(format.has_value(), "export to gptq: the model has no block linears");
  result.format = *format;

  const nlohmann::ordered_json quantization = gptq_quantization_config(*format, options.checkpoint_format, options.damp_percent);
  io::LlamaConfig config = model.config();
  config.torch_dtype = "float16";
  nlohmann::ordered_json config_json = config.to_json();
  config_json["quantization_config"] = quantization;

  io::AtomicDirectory out(out_dir);
  io::write_safetensors(out.path() / "model.safetensors", tensors, {{"format", "pt"}});
  io::write_file_atomically(out.path() / "config.json", config_json.dump(2) + "\n");
  io::write_file_atomically(out.path() / "quantize_config.json", quantization.dump(2) + "\n");
  result.tokenizer_files = copy_tokenizer_files(options.tokenizer_source, out.path());
  out.commit();
  return result;
}

}  // namespace qlora::train
