#pragma once
// Hugging Face config.json of Llama-architecture models (Llama 1/2/3, TinyLlama, SmolLM, ...), with the
// defaults of transformers' LlamaConfig (configuration_llama.py) for absent keys: num_key_value_heads
// defaults to num_attention_heads, head_dim to hidden_size / num_attention_heads. Also the tensor names
// and shapes an HF Llama checkpoint must hold, to refuse a checkpoint that disagrees with its config.
//
// Every file format is read into this one LlamaConfig (llama2.c headers and GGUF metadata too), so the
// model code has one description of a model.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/core/shape.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora::io {

// rope_scaling of config.json. "llama3" (Llama 3.1+): frequencies between the two wavelength bounds are
// interpolated, low frequencies divided by factor; "linear": every position divided by factor.
struct RopeScaling {
  std::string type;  // "llama3" or "linear"
  double factor = 1.0;
  double low_freq_factor = 1.0;                        // llama3 only
  double high_freq_factor = 4.0;                       // llama3 only
  std::int64_t original_max_position_embeddings = 8192; // llama3 only
  bool operator==(const RopeScaling&) const = default;
};

struct LlamaConfig {
  std::int64_t hidden_size = 4096;
  std::int64_t intermediate_size = 11008;
  std::int64_t num_hidden_layers = 32;
  std::int64_t num_attention_heads = 32;
  std::int64_t num_key_value_heads = 32;
  std::int64_t head_dim = 128;
  std::int64_t vocab_size = 32000;
  std::int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  std::optional<std::int64_t> bos_token_id = 1;
  std::vector<std::int64_t> eos_token_ids = {2};  // config.json allows an int or a list
  std::string torch_dtype = "float32";            // float32, float16 or bfloat16

  static constexpr std::int64_t kMaxLayers = 4096;

  bool operator==(const LlamaConfig&) const = default;

  std::int64_t q_dim() const { return num_attention_heads * head_dim; }
  std::int64_t kv_dim() const { return num_key_value_heads * head_dim; }

  // Throws qlora::Error naming `source` and the offending key when the numbers cannot describe a model.
  void validate(const std::string& source = "config") const {
    const auto positive = [&](std::int64_t v, const char* key) {
      QLORA_CHECK(v > 0, source + ": " + key + " must be positive, got " + std::to_string(v));
    };
    positive(hidden_size, "hidden_size");
    positive(intermediate_size, "intermediate_size");
    positive(num_hidden_layers, "num_hidden_layers");
    positive(num_attention_heads, "num_attention_heads");
    positive(num_key_value_heads, "num_key_value_heads");
    positive(head_dim, "head_dim");
    positive(vocab_size, "vocab_size");
    positive(max_position_embeddings, "max_position_embeddings");
    // Far beyond any Llama (405B has 126): a larger count is a corrupt header, refused before anything sized by it.
    QLORA_CHECK(num_hidden_layers <= kMaxLayers, source + ": num_hidden_layers " + std::to_string(num_hidden_layers) +
                                                     " is beyond any Llama (at most " + std::to_string(kMaxLayers) + ")");
    QLORA_CHECK(num_attention_heads % num_key_value_heads == 0,
                source + ": num_key_value_heads " + std::to_string(num_key_value_heads) +
                    " does not divide num_attention_heads " + std::to_string(num_attention_heads));
    QLORA_CHECK(head_dim % 2 == 0, source + ": head_dim " + std::to_string(head_dim) + " is odd (RoPE rotates pairs)");
    QLORA_CHECK(rms_norm_eps > 0 && rms_norm_eps < 1, source + ": rms_norm_eps " + std::to_string(rms_norm_eps) + " is not in (0, 1)");
    QLORA_CHECK(rope_theta > 0, source + ": rope_theta must be positive, got " + std::to_string(rope_theta));
    if (rope_scaling) {
      QLORA_CHECK(rope_scaling->type == "llama3" || rope_scaling->type == "linear",
                  source + ": rope_scaling type '" + rope_scaling->type + "' is not supported (llama3 or linear)");
      QLORA_CHECK(rope_scaling->factor >= 1, source + ": rope_scaling factor must be >= 1");
      if (rope_scaling->type == "llama3")
        QLORA_CHECK(rope_scaling->high_freq_factor > rope_scaling->low_freq_factor &&
                        rope_scaling->original_max_position_embeddings > 0,
                    source + ": rope_scaling llama3 needs high_freq_factor > low_freq_factor and a positive "
                             "original_max_position_embeddings");
    }
    const auto token = [&](std::int64_t id, const char* key) {
      QLORA_CHECK(id >= 0 && id < vocab_size, source + ": " + key + " " + std::to_string(id) +
                                                  " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    };
    if (bos_token_id) token(*bos_token_id, "bos_token_id");
    for (std::int64_t id : eos_token_ids) token(id, "eos_token_id");
    QLORA_CHECK(torch_dtype == "float32" || torch_dtype == "float16" || torch_dtype == "bfloat16",
                source + ": torch_dtype '" + torch_dtype + "' is not supported (float32, float16 or bfloat16)");
  }

  // config.json as transformers writes it for a LlamaForCausalLM.
  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j;
    j["architectures"] = {"LlamaForCausalLM"};
    j["model_type"] = "llama";
    j["hidden_act"] = "silu";
    j["hidden_size"] = hidden_size;
    j["intermediate_size"] = intermediate_size;
    j["num_hidden_layers"] = num_hidden_layers;
    j["num_attention_heads"] = num_attention_heads;
    j["num_key_value_heads"] = num_key_value_heads;
    j["head_dim"] = head_dim;
    j["vocab_size"] = vocab_size;
    j["max_position_embeddings"] = max_position_embeddings;
    j["rms_norm_eps"] = rms_norm_eps;
    j["rope_theta"] = rope_theta;
    if (rope_scaling) {
      nlohmann::ordered_json r;
      r["rope_type"] = rope_scaling->type;
      r["factor"] = rope_scaling->factor;
      if (rope_scaling->type == "llama3") {
        r["low_freq_factor"] = rope_scaling->low_freq_factor;
        r["high_freq_factor"] = rope_scaling->high_freq_factor;
        r["original_max_position_embeddings"] = rope_scaling->original_max_position_embeddings;
      }
      j["rope_scaling"] = r;
    } else {
      j["rope_scaling"] = nullptr;
    }
    j["tie_word_embeddings"] = tie_word_embeddings;
    j["attention_bias"] = false;
    j["mlp_bias"] = false;
    j["bos_token_id"] = bos_token_id ? nlohmann::ordered_json(*bos_token_id) : nlohmann::ordered_json(nullptr);
    if (eos_token_ids.size() == 1) j["eos_token_id"] = eos_token_ids[0];
    else j["eos_token_id"] = eos_token_ids;
    j["torch_dtype"] = torch_dtype;
    return j;
  }

  static LlamaConfig from_json(const nlohmann::json& j, const std::string& source = "config.json") {
    QLORA_CHECK(j.is_object(), source + " is not a JSON object");
    const auto has = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
    const auto integer = [&](const char* key, std::int64_t fallback) -> std::int64_t {
      if (!has(key)) return fallback;
      QLORA_CHECK(j[key].is_number_integer(), source + ": " + key + " must be an integer, got " + j[key].dump());
      return j[key].get<std::int64_t>();
    };
    const auto number = [&](const nlohmann::json& obj, const char* key, double fallback) -> double {
      if (!obj.contains(key) || obj[key].is_null()) return fallback;
      QLORA_CHECK(obj[key].is_number(), source + ": " + key + " must be a number, got " + obj[key].dump());
      return obj[key].get<double>();
    };
    if (has("model_type")) {
      const std::string type = j["model_type"].is_string() ? j["model_type"].get<std::string>() : j["model_type"].dump();
      QLORA_CHECK(type == "llama", source + ": model_type '" + type + "' is not supported (only llama)");
    }
    if (has("hidden_act"))
      QLORA_CHECK(j["hidden_act"] == "silu", source + ": hidden_act " + j["hidden_act"].dump() + " is not supported (only silu)");
    for (const char* key : {"attention_bias", "mlp_bias"})
      if (has(key)) QLORA_CHECK(j[key] == false, source + ": " + key + " = true is not supported (Llama has no biases)");
    if (has("pretraining_tp"))
      QLORA_CHECK(j["pretraining_tp"].is_number_integer(), source + ": pretraining_tp must be an integer");

    LlamaConfig c;
    c.vocab_size = integer("vocab_size", 32000);
    c.hidden_size = integer("hidden_size", 4096);
    c.intermediate_size = integer("intermediate_size", 11008);
    c.num_hidden_layers = integer("num_hidden_layers", 32);
    c.num_attention_heads = integer("num_attention_heads", 32);
    c.num_key_value_heads = integer("num_key_value_heads", c.num_attention_heads);
    if (has("head_dim")) {
      c.head_dim = integer("head_dim", 0);
    } else {
      QLORA_CHECK(c.num_attention_heads > 0 && c.hidden_size % c.num_attention_heads == 0,
                  source + ": num_attention_heads " + std::to_string(c.num_attention_heads) +
                      " does not divide hidden_size " + std::to_string(c.hidden_size) + " (and no head_dim is given)");
      c.head_dim = c.hidden_size / c.num_attention_heads;
    }
    c.max_position_embeddings = integer("max_position_embeddings", 2048);
    c.rms_norm_eps = number(j, "rms_norm_eps", 1e-6);
    c.rope_theta = number(j, "rope_theta", 10000.0);
    if (has("rope_scaling")) {
      const auto& r = j["rope_scaling"];
      QLORA_CHECK(r.is_object(), source + ": rope_scaling must be an object or null");
      // transformers reads "rope_type" and, for older files, "type".
      const char* type_key = r.contains("rope_type") ? "rope_type" : "type";
      QLORA_CHECK(r.contains(type_key) && r[type_key].is_string(), source + ": rope_scaling has no rope_type");
      const std::string type = r[type_key].get<std::string>();
      if (type != "default") {
        RopeScaling s;
        s.type = type;
        s.factor = number(r, "factor", 1.0);
        s.low_freq_factor = number(r, "low_freq_factor", 1.0);
        s.high_freq_factor = number(r, "high_freq_factor", 4.0);
        if (r.contains("original_max_position_embeddings")) {
          QLORA_CHECK(r["original_max_position_embeddings"].is_number_integer(),
                      source + ": rope_scaling original_max_position_embeddings must be an integer");
          s.original_max_position_embeddings = r["original_max_position_embeddings"].get<std::int64_t>();
        }
        c.rope_scaling = s;
      }
    }
    if (has("tie_word_embeddings")) {
      QLORA_CHECK(j["tie_word_embeddings"].is_boolean(), source + ": tie_word_embeddings must be true or false");
      c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
    }
    c.bos_token_id = j.contains("bos_token_id") ? (has("bos_token_id") ? std::optional(integer("bos_token_id", 0)) : std::nullopt)
                                                : std::optional<std::int64_t>(1);
    if (!j.contains("eos_token_id")) {
      c.eos_token_ids = {2};
    } else if (j["eos_token_id"].is_null()) {
      c.eos_token_ids.clear();
    } else if (j["eos_token_id"].is_array()) {
      c.eos_token_ids.clear();
      for (const auto& v : j["eos_token_id"]) {
        QLORA_CHECK(v.is_number_integer(), source + ": eos_token_id list holds a non-integer " + v.dump());
        c.eos_token_ids.push_back(v.get<std::int64_t>());
      }
    } else {
      c.eos_token_ids = {integer("eos_token_id", 2)};
    }
    // transformers >= 4.56 writes "dtype"; older versions "torch_dtype".
    const char* dtype_key = has("torch_dtype") ? "torch_dtype" : (has("dtype") ? "dtype" : nullptr);
    if (dtype_key) {
      QLORA_CHECK(j[dtype_key].is_string(), source + ": " + dtype_key + " must be a string");
      c.torch_dtype = j[dtype_key].get<std::string>();
    }
    c.validate(source);
    return c;
  }
};

inline LlamaConfig read_hf_config(const std::filesystem::path& path) {
  const MappedFile file(path);
  nlohmann::json j;
  try {
    const char* text = reinterpret_cast<const char*>(file.data());
    j = nlohmann::json::parse(text, text + file.size());
  } catch (const nlohmann::json::exception& e) {
    throw Error(path.string() + " is not valid JSON: " + e.what());
  }
  return LlamaConfig::from_json(j, path.string());
}

inline void write_hf_config(const std::filesystem::path& path, const LlamaConfig& config) {
  config.validate(path.string());
  write_file_atomically(path, config.to_json().dump(2) + "\n");
}

// "[a,b]": shapes in messages, as PyTorch prints them.
inline std::string dims_str(const std::vector<std::int64_t>& dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(dims[i]);
  }
  s += ']';
  return s;
}
inline std::string shape_str(const Shape& shape) {
  std::vector<std::int64_t> dims;
  for (int i = 0; i < shape.rank(); ++i) dims.push_back(shape[i]);
  return dims_str(dims);
}

// A tensor an HF Llama checkpoint holds: its name and row-major shape ([out, in] for a linear weight).
struct TensorSpec {
  std::string name;
  Shape shape;
};

// The tensors of LlamaForCausalLM in HF naming, layer by layer; lm_head.weight only when not tied. `visit`
// sees each in order; readers check a checkpoint through this walk, so a header claiming 10^8 layers fails at
// the first missing tensor instead of building a list of 10^9 names first (fuzz smoke).
template <class Visit>
void for_each_llama_tensor_spec(const LlamaConfig& c, Visit&& visit) {
  const std::int64_t h = c.hidden_size, f = c.intermediate_size;
  visit(TensorSpec{"model.embed_tokens.weight", {c.vocab_size, h}});
  for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    visit(TensorSpec{p + "input_layernorm.weight", {h}});
    visit(TensorSpec{p + "self_attn.q_proj.weight", {c.q_dim(), h}});
    visit(TensorSpec{p + "self_attn.k_proj.weight", {c.kv_dim(), h}});
    visit(TensorSpec{p + "self_attn.v_proj.weight", {c.kv_dim(), h}});
    visit(TensorSpec{p + "self_attn.o_proj.weight", {h, c.q_dim()}});
    visit(TensorSpec{p + "post_attention_layernorm.weight", {h}});
    visit(TensorSpec{p + "mlp.gate_proj.weight", {f, h}});
    visit(TensorSpec{p + "mlp.up_proj.weight", {f, h}});
    visit(TensorSpec{p + "mlp.down_proj.weight", {h, f}});
  }
  visit(TensorSpec{"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) visit(TensorSpec{"lm_head.weight", {c.vocab_size, h}});
}

inline std::vector<TensorSpec> llama_tensor_specs(const LlamaConfig& c) {
  std::vector<TensorSpec> specs;
  for_each_llama_tensor_spec(c, [&](TensorSpec spec) { specs.push_back(std::move(spec)); });
  return specs;
}

// Checks that every expected tensor is present with its expected shape. `shape_of` returns the stored
// shape of a name, or nullopt when the checkpoint lacks it; `source` names the checkpoint in messages.
inline void check_llama_tensors(const LlamaConfig& config,
                                const std::function<std::optional<std::vector<std::int64_t>>(const std::string&)>& shape_of,
                                const std::string& source, const std::string& config_source = "config.json") {
  for_each_llama_tensor_spec(config, [&](const TensorSpec& spec) {
    const auto stored = shape_of(spec.name);
    QLORA_CHECK(stored.has_value(), source + ": tensor " + spec.name + " is missing");
    std::vector<std::int64_t> expected;
    for (int i = 0; i < spec.shape.rank(); ++i) expected.push_back(spec.shape[i]);
    if (*stored != expected)
      throw Error(source + ": tensor " + spec.name + " has shape " + dims_str(*stored) + " but " + config_source +
                  " implies " + dims_str(expected));
  });
}

// RoPE row order. HF's LlamaAttention rotates each head's dimension i with i + head_dim/2 ("rotate
// half"); Meta's original code, llama2.c and the GGUF files of llama.cpp rotate (2i, 2i+1). The two are
// the same model up to a permutation of the rows of W_q and W_k within each head: HF row j*half + i holds
// interleaved row 2i + j (transformers' convert_llama_weights_to_hf.py, permute()). qlora's rope kernels
// use the HF order, so readers of interleaved files convert on load and writers of them convert back.
namespace detail {
inline Tensor permute_rope_rows(const Tensor& w, std::int64_t heads, bool to_half, const std::string& what) {
  QLORA_CHECK(w.rank() >= 1 && heads > 0 && w.dim(0) % (2 * heads) == 0,
              what + ": " + std::to_string(w.rank() ? w.dim(0) : 0) + " rows cannot be split into " +
                  std::to_string(heads) + " heads of an even size");
  const Tensor src = w.to(Device::cpu());
  Tensor out = Tensor::empty(src.shape(), src.dtype());
  const std::int64_t rows = src.dim(0), head_dim = rows / heads, half = head_dim / 2;
  const std::size_t row_bytes = rows ? src.nbytes() / std::size_t(rows) : 0;
  const auto* from = static_cast<const std::byte*>(src.data());
  auto* to = static_cast<std::byte*>(out.data());
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < half; ++i)
      for (std::int64_t j = 0; j < 2; ++j) {
        const std::int64_t interleaved = h * head_dim + 2 * i + j, halves = h * head_dim + j * half + i;
        const std::int64_t s = to_half ? interleaved : halves, d = to_half ? halves : interleaved;
        std::memcpy(to + std::size_t(d) * row_bytes, from + std::size_t(s) * row_bytes, row_bytes);
      }
  return out;
}
}  // namespace detail

// Rows of a q or k projection ([heads * head_dim, in]) from interleaved pairs to HF's halves (a host copy).
inline Tensor rope_rows_interleaved_to_half(const Tensor& w, std::int64_t heads, const std::string& what = "weight") {
  return detail::permute_rope_rows(w, heads, true, what);
}
// The inverse: HF's halves to interleaved pairs (what llama.cpp's convert_hf_to_gguf.py does).
inline Tensor rope_rows_half_to_interleaved(const Tensor& w, std::int64_t heads, const std::string& what = "weight") {
  return detail::permute_rope_rows(w, heads, false, what);
}

}  // namespace qlora::io
