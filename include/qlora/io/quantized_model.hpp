#pragma once
// The quantized model directory that `qlora quantize` writes (docs/model-files.md, "Quantized model
// directories"): a Hugging Face directory whose config.json carries a quantization_config block with
// quant_method "qlora", and whose model.safetensors holds the dense tensors (embedding, norms, LM head)
// under their HF names and, for every block linear <name>, the members of its quant::QuantizedTensor
// (quant/format.hpp) as stored in memory, so loading is exact (no re-quantization):
//   <name>.qweight        u8  [rows, row_stride_bytes]  packed codes
//   <name>.scales         f16 [rows, groups] (int/dint) | f32 block absmax (nf4 without DQ)
//   <name>.zeros          u8 or f32 [rows, groups]      (int asymmetric, dint)
//   <name>.absmax_codes   u8  [rows * groups]           (nf4 + DQ)
//   <name>.absmax_scales  f32 [ceil(rows * groups / 256)] (nf4 + DQ)
//   <name>.absmax_mean    f32 [1]                        (nf4 + DQ)
// This header holds the format: the quantization_config block, the member names, and reading one linear
// back with every member checked (errors name the file and the tensor). Writing a model is
// train/export_quantized.hpp; opening one is io::QuantizedModelFiles (model_files.hpp).

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/io/mapped_file.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/quant/format.hpp"

namespace qlora::io {

// quantization_config.quant_method of our directories (other values, e.g. "gptq" or "awq", are other
// tools' layouts and are not read).
inline constexpr const char* kQloraQuantMethod = "qlora";

// Where the calibration statistics came from (absent for methods without calibration).
struct CalibrationRecord {
  std::string file;
  std::int64_t samples = 0, seq_len = 0;
  std::uint64_t seed = 0;
  bool operator==(const CalibrationRecord&) const = default;
};

// config.json's quantization_config.
struct QuantizationInfo {
  quant::QuantConfig format;  // the stored base format of every block linear
  std::string method = "rtn"; // rtn, nf4, gptq, comq, awq, aqas
  int act_bits = 0;           // 0: activations unquantized; 8: W4A8 (per-token INT8 activations); read
                              // into LoadOptions::activation_bits on load
  std::optional<CalibrationRecord> calibration;
  bool magr = false;          // MagR preprocessing before the quantizer
  std::string tool_version;
  nlohmann::ordered_json method_options = nlohmann::ordered_json::object();  // damp, act_order, ...

  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j;
    j["quant_method"] = kQloraQuantMethod;
    j["format"] = format.name();
    j["method"] = method;
    j["bits"] = format.bits;
    j["group_size"] = format.group;
    j["sym"] = format.scheme == quant::Scheme::int_sym;
    j["act_bits"] = act_bits;
    if (calibration)
      j["calibration"] = {{"file", calibration->file},
                          {"samples", calibration->samples},
                          {"seq_len", calibration->seq_len},
                          {"seed", calibration->seed}};
    else
      j["calibration"] = nullptr;
    j["magr"] = magr;
    j["method_options"] = method_options;
    j["qlora_version"] = tool_version;
    return j;
  }

  // `source` names the file in errors ("out/config.json: quantization_config.format ...").
  static QuantizationInfo from_json(const nlohmann::json& j, const std::string& source) {
    const std::string where = source + ": quantization_config";
    QLORA_CHECK(j.is_object(), where + " is not an object");
    try {
      QLORA_CHECK(j.value("quant_method", std::string()) == kQloraQuantMethod,
                  where + ".quant_method is not \"" + std::string(kQloraQuantMethod) + "\"");
      QuantizationInfo info;
      info.format = quant::QuantConfig::parse(j.at("format").get<std::string>());
      info.method = j.value("method", std::string("rtn"));
      info.act_bits = j.value("act_bits", 0);
      QLORA_CHECK(info.act_bits == 0 || (info.act_bits >= 4 && info.act_bits <= 8),
                  where + ".act_bits must be 0 or 4..8, got " + std::to_string(info.act_bits));
      QLORA_CHECK(j.value("bits", info.format.bits) == info.format.bits &&
                      j.value("group_size", info.format.group) == info.format.group,
                  where + ": bits / group_size disagree with format " + info.format.name());
      if (j.contains("calibration") && !j["calibration"].is_null()) {
        const auto& c = j["calibration"];
        info.calibration = CalibrationRecord{c.value("file", std::string()), c.value("samples", std::int64_t(0)),
                                             c.value("seq_len", std::int64_t(0)), c.value("seed", std::uint64_t(0))};
      }
      info.magr = j.value("magr", false);
      info.tool_version = j.value("qlora_version", std::string());
      if (j.contains("method_options") && j["method_options"].is_object()) info.method_options = j["method_options"];
      return info;
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + " is malformed (" + std::string(e.what()) + ")");
    } catch (const Error& e) {
      const std::string what = e.what();
      if (what.rfind(source, 0) == 0) throw;
      throw Error(where + ": " + what);
    }
  }
};

// The quantization_config of a config.json when it is one of ours (quant_method "qlora"), else nullopt;
// a quantization_config of another tool is refused (its layout is not ours).
inline std::optional<QuantizationInfo> read_quantization_info(const std::filesystem::path& config_json) {
  const MappedFile file(config_json);
  nlohmann::json j;
  try {
    const char* text = reinterpret_cast<const char*>(file.data());
    j = nlohmann::json::parse(text, text + file.size());
  } catch (const nlohmann::json::exception& e) {
    throw Error(config_json.string() + " is not valid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("quantization_config") || j["quantization_config"].is_null()) return std::nullopt;
  const nlohmann::json& q = j["quantization_config"];
  // Not q.value<std::string>: a quant_method that is not a string (fuzzing found `false`) must be refused, not throw
  // nlohmann's type_error past the caller.
  const auto* m = q.is_object() && q.contains("quant_method") ? &q["quant_method"] : nullptr;
  const std::string method = m == nullptr ? std::string() : m->is_string() ? m->get<std::string>() : m->dump();
  QLORA_CHECK(method == kQloraQuantMethod,
              config_json.string() + ": quantization_config.quant_method \"" + method +
                  "\" is not supported (qlora reads its own \"qlora\" directories; load the original model instead)");
  return QuantizationInfo::from_json(q, config_json.string());
}

// ---- members -------------------------------------------------------------------------------------------

// The member tensors of one quantized linear under their file names, in a fixed order.
inline std::vector<std::pair<std::string, Tensor>> quantized_tensor_entries(const std::string& linear,
                                                                            const quant::QuantizedTensor& q) {
  std::vector<std::pair<std::string, Tensor>> out;
  const auto host = [](const Tensor& t) { return t.to(Device::cpu()); };
  out.emplace_back(linear + ".qweight", host(q.codes));
  if (q.scales.defined()) out.emplace_back(linear + ".scales", host(q.scales));
  if (q.zeros.defined()) out.emplace_back(linear + ".zeros", host(q.zeros));
  if (q.absmax_codes.defined()) {
    out.emplace_back(linear + ".absmax_codes", host(q.absmax_codes));
    out.emplace_back(linear + ".absmax_scales", host(q.absmax_scales));
    out.emplace_back(linear + ".absmax_mean", Tensor::from(std::vector<float>{q.absmax_mean}, Shape{1}));
  }
  return out;
}

// The stored QuantizedTensor of `linear` (rows x cols in `format`), as zero-copy views of the file where
// possible. Every member the format needs must be there with its dtype and shape; errors name the file
// and the tensor.
inline quant::QuantizedTensor read_quantized_tensor(const SafetensorsCheckpoint& file, const std::string& linear,
                                                    const quant::QuantConfig& format, std::int64_t rows,
                                                    std::int64_t cols) {
  quant::QuantizedTensor q;
  q.config = format;
  q.rows = rows;
  q.cols = cols;
  const bool nf4 = format.scheme == quant::Scheme::nf4, dq = nf4 && format.double_quant;
  const bool zeros = format.scheme == quant::Scheme::int_asym || format.scheme == quant::Scheme::dint;
  const auto member = [&](const std::string& suffix, bool wanted) -> Tensor {
    const std::string name = linear + "." + suffix;
    if (!wanted) {
      QLORA_CHECK(!file.contains(name), file.describe() + ": tensor " + name + " is not part of format " + format.name());
      return Tensor();
    }
    QLORA_CHECK(file.contains(name), file.describe() + ": tensor " + name + " is missing (format " + format.name() + ")");
    const SafetensorsEntry& e = file.entry(name);
    QLORA_CHECK(e.dtype.has_value(), file.describe() + ": tensor " + name + " has dtype " + e.dtype_name +
                                         ", which qlora cannot hold");
    return file.load(name);
  };
  q.codes = member("qweight", true);
  q.scales = member("scales", !dq);
  q.zeros = member("zeros", zeros);
  q.absmax_codes = member("absmax_codes", dq);
  q.absmax_scales = member("absmax_scales", dq);
  const Tensor mean = member("absmax_mean", dq);
  if (dq) {
    QLORA_CHECK(mean.numel() == 1 && mean.dtype() == DType::f32,
                file.describe() + ": tensor " + linear + ".absmax_mean must be one f32 value, got " + mean.str());
    q.absmax_mean = mean.data<float>()[0];
  }
  q.check(file.describe() + ": tensor " + linear);
  return q;
}

}  // namespace qlora::io
