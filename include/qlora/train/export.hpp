#pragma once
// Exporting a model (and its trained adapter) to formats other tools load (docs/export.md):
//   export_peft  PEFT LoRA adapter: adapter_model.safetensors + adapter_config.json (every LowRank adapter,
//                Q-BLoRA and QA-(B)LoRA included, as its equivalent plain LoRA of rank r' via plain_lora())
//   export_hf    merged Hugging Face checkpoint: model.safetensors (W + dW per linear) + config.json
//                (+ the source's tokenizer files)
//   export_gguf  merged llama.cpp GGUF (F16 / Q8_0 / Q4_1 matrices, F32 norms), q/k rows interleaved,
//                tokenizer.ggml.* from the source vocabulary when there is one; Q4_1 straight from the codes
//                of an INT base (b <= 4 bits, groups of a multiple of 32) with its adapter folded into Q4_1's
//                per-block minimum when that is exact (QA-(B)LoRA, methods/qblora.md "Mergeability condition")
// Every output is built under a temporary name and renamed when complete (io/atomic_write.hpp).

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "models/llama/model.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/io/tokenizer_llama2c.hpp"
#include "qlora/io/tokenizer_load.hpp"
#include "qlora/nn/merge.hpp"
#include "qlora/quant/int_codes.hpp"

namespace qlora::train {

namespace detail {

// The block linears in file order: layer by layer, all_block_linears() order within a layer.
inline std::vector<const nn::Linear*> block_linears(models::llama::Model& model) {
  std::vector<const nn::Linear*> out;
  for (std::int64_t i = 0; i < model.num_layers(); ++i)
    for (std::size_t p = 0; p < models::llama::all_block_linears().size(); ++p)
      out.push_back(&model.block(i).linear(models::llama::DecoderBlock::Proj(p)));
  return out;
}

// "model.layers.3.self_attn.q_proj" -> "q_proj".
inline std::string short_name(const std::string& layer) { return layer.substr(layer.rfind('.') + 1); }

// The tensors of a checkpoint in HF order: the embedding, each block's two norms and `linear_tensors(linear)`
// for its seven linears, the final norm and an untied head, the dense ones as `dense(t)`. One walker for the
// merged HF model, a qlora quantized directory and a GPTQ export, which differ only in how a linear is stored.
template <class Dense, class LinearTensors>
std::vector<std::pair<std::string, Tensor>> hf_checkpoint_tensors(models::llama::Model& model, Dense dense,
                                                                     LinearTensors linear_tensors) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  tensors.emplace_back("model.embed_tokens.weight", dense(model.embedding()));
  for (std::int64_t i = 0; i < model.num_layers(); ++i) {
    auto& block = model.block(i);
    const std::string p = "model.layers." + std::to_string(i) + ".";
    tensors.emplace_back(p + "input_layernorm.weight", dense(block.input_norm()));
    tensors.emplace_back(p + "post_attention_layernorm.weight", dense(block.post_norm()));
    for (std::size_t k = 0; k < models::llama::all_block_linears().size(); ++k)
      for (auto& entry : linear_tensors(block.linear(models::llama::DecoderBlock::Proj(k))))
        tensors.push_back(std::move(entry));
  }
  tensors.emplace_back("model.norm.weight", dense(model.final_norm()));
  if (!model.tied_head()) tensors.emplace_back("lm_head.weight", dense(model.head_weight()));
  return tensors;
}

// Every tensor of the merged model under its HF name, in llama_tensor_specs() order (f32, CPU, HF q/k rows).
inline std::vector<std::pair<std::string, Tensor>> merged_hf_tensors(models::llama::Model& model) {
  const auto host = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::f32); };
  return hf_checkpoint_tensors(model, host, [](const nn::Linear& linear) {
    return std::vector<std::pair<std::string, Tensor>>{{linear.name() + ".weight", linear.merged_weight(DType::f32)}};
  });
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------- PEFT

// adapter_config.json's base_model_name_or_path.
struct PeftExportOptions {
  std::string base_model_name_or_path;
};

// PEFT's tensor name for a layer's A or B: "base_model.model.<layer>.lora_A.weight".
inline std::string peft_key(const std::string& layer, char which) {
  return "base_model.model." + layer + ".lora_" + std::string(1, which) + ".weight";
}

// Writes OUT/adapter_model.safetensors (f32) and OUT/adapter_config.json. PEFT computes scaling =
// lora_alpha / r, so r = r' (the plain rank) and lora_alpha = s * r'; layers whose r' or s differ from the
// first adapter's go into rank_pattern / alpha_pattern (QA-BLoRA's rank may vary with the layer shape).
// A FullPooled (hira) adapter is not a low-rank update: refused.
inline void export_peft(models::llama::Model& model, const std::filesystem::path& out_dir,
                        const PeftExportOptions& options = {}) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::vector<std::string> targets;
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object(), alpha_pattern = nlohmann::ordered_json::object();
  std::int64_t rank = 0;
  double alpha = 0;
  for (const nn::Linear* linear : detail::block_linears(model)) {
    const nn::AdapterShape shape = linear->adapter_shape();
    if (shape.kind == nn::AdapterKind::none) continue;
    QLORA_CHECK(!shape.full_matrix(), "export to peft: " + linear->name() + " carries a " +
                                          std::string(nn::adapter_kind_name(shape.kind)) +
                                          " adapter (one full pooled matrix), which is not a LoRA; export it merged "
                                          "(--to hf or gguf-*) instead");
    const std::optional<nn::PlainLora> lora = linear->plain_lora();
    QLORA_CHECK(lora.has_value(), "export to peft: " + linear->name() + " has no low-rank form");
    const std::int64_t r = lora->A.dim(0);
    const double a = double(lora->scale) * double(r);
    if (rank == 0) rank = r, alpha = a;
    if (r != rank) rank_pattern[linear->name()] = r;
    if (a != alpha) alpha_pattern[linear->name()] = a;
    tensors.emplace_back(peft_key(linear->name(), 'A'), lora->A.to(DType::f32));
    tensors.emplace_back(peft_key(linear->name(), 'B'), lora->B.to(DType::f32));
    const std::string target = detail::short_name(linear->name());
    if (std::find(targets.begin(), targets.end(), target) == targets.end()) targets.push_back(target);
  }
  QLORA_CHECK(!tensors.empty(), "export to peft: the model carries no adapter (pass --adapter DIR)");
  const nlohmann::ordered_json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", options.base_model_name_or_path},
      {"r", rank},
      {"lora_alpha", alpha},
      {"lora_dropout", 0.0},
      {"target_modules", targets},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"modules_to_save", nullptr},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
  };
  io::AtomicDirectory out(out_dir);
  io::write_safetensors(out.path() / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  io::write_file_atomically(out.path() / "adapter_config.json", config.dump(2) + "\n");
  out.commit();
}

// ------------------------------------------------------------------------------------------------ HF

// The files of a Hugging Face tokenizer that an export copies when the source directory has them.
inline const std::vector<std::string>& hf_tokenizer_files() {
  static const std::vector<std::string> names = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                                 "special_tokens_map.json", "generation_config.json"};
  return names;
}

// Copies the tokenizer files of source_dir (a HF directory; empty or not a directory: none) into out_dir.
// Returns the names copied.
inline std::vector<std::string> copy_tokenizer_files(const std::filesystem::path& source_dir,
                                                     const std::filesystem::path& out_dir) {
  std::vector<std::string> copied;
  if (source_dir.empty() || !std::filesystem::is_directory(source_dir)) return copied;
  for (const std::string& name : hf_tokenizer_files())
    if (std::filesystem::exists(source_dir / name)) {
      std::filesystem::copy_file(source_dir / name, out_dir / name);
      copied.push_back(name);
    }
  return copied;
}

// Writes OUT/model.safetensors (merged weights in dtype f32 / bf16 / f16, HF q/k convention), OUT/config.json
// and the tokenizer files of source_dir (a HF directory; empty: none). Returns the tokenizer files copied.
inline std::vector<std::string> export_hf(models::llama::Model& model, const std::filesystem::path& out_dir,
                                          DType dtype = DType::bf16, const std::filesystem::path& source_dir = {}) {
  QLORA_CHECK(dtype == DType::f32 || dtype == DType::bf16 || dtype == DType::f16,
              "export to hf: dtype " + std::string(dtype_name(dtype)) + " is not supported (f32, bf16 or f16)");
  io::LlamaConfig config = model.config();
  config.torch_dtype = dtype == DType::f32 ? "float32" : dtype == DType::bf16 ? "bfloat16" : "float16";
  auto tensors = detail::merged_hf_tensors(model);
  for (auto& [name, t] : tensors) t = t.to(dtype);
  io::AtomicDirectory out(out_dir);
  io::write_safetensors(out.path() / "model.safetensors", tensors, {{"format", "pt"}});
  io::write_hf_config(out.path() / "config.json", config);
  const std::vector<std::string> copied = copy_tokenizer_files(source_dir, out.path());
  out.commit();
  return copied;
}

// ---------------------------------------------------------------------------------------------- GGUF

// A vocabulary to embed as tokenizer.ggml.*.
struct GgufVocabulary {
  io::GgufTokenizerData data;
  bool add_space_prefix = true;
};

// The vocabulary of a tokenizer file, when it can be embedded: a GGUF file's own (copied) or a llama2.c
// tokenizer.bin (pieces, scores and types: tokenizer.ggml.model "llama"; a directory's tokenizer.bin too).
// nullopt for Hugging Face tokenizer.model / tokenizer.json (not converted: docs/export.md) and for none.
inline std::optional<GgufVocabulary> gguf_vocabulary_of(const std::filesystem::path& tokenizer) {
  if (tokenizer.empty()) return std::nullopt;
  if (std::filesystem::is_directory(tokenizer))  // a model directory: the llama2.c tokenizer qlora quantize copies
    return std::filesystem::exists(tokenizer / "tokenizer.bin") ? gguf_vocabulary_of(tokenizer / "tokenizer.bin") : std::nullopt;
  const io::TokenizerFileKind kind = io::tokenizer_file_kind(tokenizer);
  GgufVocabulary v;
  if (kind == io::TokenizerFileKind::gguf) {
    const io::GgufFile file(tokenizer);
    if (!file.has("tokenizer.ggml.model")) return std::nullopt;
    v.data = io::gguf_tokenizer(file);
    v.add_space_prefix = file.find_bool("tokenizer.ggml.add_space_prefix").value_or(true);
    return v;
  }
  if (kind != io::TokenizerFileKind::llama2c) return std::nullopt;
  const io::ScoreMergeVocabulary sm = io::parse_llama2c_tokenizer(io::detail::read_tokenizer_file(tokenizer.string()), tokenizer.string());
  v.data.model = "llama";
  v.data.tokens = sm.pieces;
  v.data.scores = sm.scores;
  for (io::TokenType t : sm.types) v.data.token_types.push_back(std::int32_t(t));
  if (sm.bos_id >= 0) v.data.bos_id = sm.bos_id;
  if (sm.eos_id >= 0) v.data.eos_id = sm.eos_id;
  if (sm.unk_id >= 0) v.data.unknown_id = sm.unk_id;
  v.data.add_bos = true;
  v.data.add_eos = false;
  v.add_space_prefix = sm.add_dummy_prefix;
  return v;
}

// general.file_type as llama.cpp numbers it (enum llama_ftype: 1 MOSTLY_F16, 3 MOSTLY_Q4_1, 7 MOSTLY_Q8_0).
inline std::uint32_t gguf_file_type(io::GgmlType type) {
  switch (type) {
    case io::GgmlType::F32: return 0;
    case io::GgmlType::F16: return 1;
    case io::GgmlType::Q4_1: return 3;
    case io::GgmlType::Q8_0: return 7;
    case io::GgmlType::BF16: return 32;
    default: throw Error("export to gguf: matrix type " + io::ggml_type_name(std::uint32_t(type)) +
                         " is not supported (F32, F16, BF16, Q8_0 or Q4_1)");
  }
}

// The INT base of `linear` with its adapter folded into the zero points (nn::merge_into_zero_points, on a copy:
// the layer is not changed), or nullopt when the base is not INT or the adapter does not merge exactly.
inline std::optional<quant::QuantizedTensor> int_base_with_merged_adapter(nn::Linear& linear) {
  using nn::IntGroupBase;
  if (auto* l = dynamic_cast<nn::QuantLinear<IntGroupBase, nn::NoAdapter>*>(&linear)) return l->base().quantized();
  const auto merged = [](auto* l) -> std::optional<quant::QuantizedTensor> {
    quant::QuantizedTensor q = l->base().quantized();
    if (!nn::zero_point_merge_refusal(q, l->adapter().shape()).empty()) return std::nullopt;
    nn::merge_into_zero_points(q, l->adapter().pooled_delta(), l->adapter().shape());
    return q;
  };
  if (auto* l = dynamic_cast<nn::QuantLinear<IntGroupBase, nn::LowRank>*>(&linear)) return merged(l);
  if (auto* l = dynamic_cast<nn::QuantLinear<IntGroupBase, nn::FullPooled>*>(&linear)) return merged(l);
  return std::nullopt;
}

// Q4_1 blocks ([rows, cols / 32 * 20] bytes, HF row order) holding exactly the INT grid of q, or nullopt when
// q has no exact Q4_1 form. Our value scale * (code - zero) is ggml's d * nibble + m with d = scale (an f16
// value: exact), nibble = code (0..2^b - 1 <= 15) and m = -scale * zero, which is exact up to m's rounding to
// f16: a QA-(B)LoRA adapter merged into the (then fractional) zero moves m, never d or the codes. Needs b <= 4
// bits and every 32-value block inside one group (group a multiple of 32, rows of a multiple of 32 values).
inline std::optional<Tensor> exact_q4_1_blocks(const quant::QuantizedTensor& q) {
  const bool int_grid = q.config.scheme == quant::Scheme::int_asym || q.config.scheme == quant::Scheme::int_sym;
  const std::int64_t block = cpu::kGgufBlockValues;
  if (!int_grid || q.config.bits > 4 || q.cols % block != 0 || q.group_size() % block != 0) return std::nullopt;
  const quant::IntCodes u = quant::unpack_int_codes(q.to(Device::cpu()), "export to gguf");
  const std::int64_t blocks_per_row = u.cols / block;
  Tensor out = Tensor::empty(Shape{u.rows, blocks_per_row * std::int64_t(sizeof(cpu::BlockQ4_1))}, DType::u8);
  auto* blocks = reinterpret_cast<cpu::BlockQ4_1*>(out.data<std::uint8_t>());
  for (std::int64_t o = 0; o < u.rows; ++o)
    for (std::int64_t b = 0; b < blocks_per_row; ++b) {
      const cpu::IntGrid grid = u.grids[std::size_t(o * u.groups_per_row + b * block / u.group)];
      cpu::BlockQ4_1& dst = blocks[o * blocks_per_row + b];
      dst.d = to_f16(grid.scale);
      dst.m = to_f16(float(-double(grid.scale) * double(grid.zero)));
      if (!std::isfinite(to_float(dst.m))) return std::nullopt;  // beyond f16's range: re-quantize instead
      const std::uint8_t* codes = u.codes.data() + o * u.cols + b * block;
      for (std::int64_t j = 0; j < block / 2; ++j) dst.q[j] = std::uint8_t(codes[j] | (codes[j + block / 2] << 4));
    }
  return out;
}

// How export_gguf wrote the matrices (embedding, block linears, head) when asked for Q8_0 or Q4_1.
struct GgufExportSummary {
  std::int64_t exact_q4_1 = 0;    // block linears in Q4_1 taken from their INT codes (adapter folded into m)
  std::int64_t requantized = 0;   // Q8_0 / Q4_1 by ggml's reference quantizer from the merged dense weights
  std::int64_t f16_fallback = 0;  // rows not a multiple of 32 values: F16
};

// Writes a llama-architecture GGUF of the merged model: matrices as `matrix_type` (a matrix whose rows are
// not a multiple of 32 values falls back to F16, as llama.cpp's quantize does), norms F32, q/k rows
// permuted to llama.cpp's interleaved order, and the vocabulary when given (without one the file is valid
// but llama.cpp cannot tokenize with it). Q4_1 block linears come straight from their INT codes when
// exact_q4_1_blocks allows it (the adapter folded into m when it merges exactly), else from ggml's reference
// quantizer over W + dW.
inline GgufExportSummary export_gguf(models::llama::Model& model, const std::filesystem::path& out_file,
                                     io::GgmlType matrix_type, const std::optional<GgufVocabulary>& vocabulary = std::nullopt,
                                     const std::string& name = "") {
  const io::LlamaConfig& c = model.config();
  QLORA_CHECK(!c.rope_scaling || c.rope_scaling->type == "linear",
              "export to gguf: rope_scaling '" + (c.rope_scaling ? c.rope_scaling->type : std::string()) +
                  "' is not supported (none or linear)");
  io::GgufWriter w;
  using V = io::GgufValue;
  w.set("general.architecture", V::string("llama"));
  if (!name.empty()) w.set("general.name", V::string(name));
  w.set("general.file_type", V::u32(gguf_file_type(matrix_type)));
  w.set("llama.vocab_size", V::u32(std::uint32_t(c.vocab_size)));
  w.set("llama.context_length", V::u32(std::uint32_t(c.max_position_embeddings)));
  w.set("llama.embedding_length", V::u32(std::uint32_t(c.hidden_size)));
  w.set("llama.block_count", V::u32(std::uint32_t(c.num_hidden_layers)));
  w.set("llama.feed_forward_length", V::u32(std::uint32_t(c.intermediate_size)));
  w.set("llama.rope.dimension_count", V::u32(std::uint32_t(c.head_dim)));
  w.set("llama.attention.head_count", V::u32(std::uint32_t(c.num_attention_heads)));
  w.set("llama.attention.head_count_kv", V::u32(std::uint32_t(c.num_key_value_heads)));
  if (c.head_dim * c.num_attention_heads != c.hidden_size) {
    w.set("llama.attention.key_length", V::u32(std::uint32_t(c.head_dim)));
    w.set("llama.attention.value_length", V::u32(std::uint32_t(c.head_dim)));
  }
  w.set("llama.attention.layer_norm_rms_epsilon", V::f32(float(c.rms_norm_eps)));
  w.set("llama.rope.freq_base", V::f32(float(c.rope_theta)));
  if (c.rope_scaling) {
    w.set("llama.rope.scaling.type", V::string("linear"));
    w.set("llama.rope.scaling.factor", V::f32(float(c.rope_scaling->factor)));
  }
  if (vocabulary) {
    const io::GgufTokenizerData& t = vocabulary->data;
    QLORA_CHECK(std::int64_t(t.tokens.size()) == c.vocab_size,
                "export to gguf: the tokenizer holds " + std::to_string(t.tokens.size()) +
                    " tokens but the model's vocab_size is " + std::to_string(c.vocab_size));
    w.set("tokenizer.ggml.model", V::string(t.model));
    if (!t.pre.empty()) w.set("tokenizer.ggml.pre", V::string(t.pre));
    w.set("tokenizer.ggml.tokens", V::strings(t.tokens));
    if (!t.scores.empty()) w.set("tokenizer.ggml.scores", V::f32s(t.scores));
    if (!t.token_types.empty()) w.set("tokenizer.ggml.token_type", V::i32s(t.token_types));
    if (!t.merges.empty()) w.set("tokenizer.ggml.merges", V::strings(t.merges));
    if (t.bos_id) w.set("tokenizer.ggml.bos_token_id", V::u32(std::uint32_t(*t.bos_id)));
    if (t.eos_id) w.set("tokenizer.ggml.eos_token_id", V::u32(std::uint32_t(*t.eos_id)));
    if (t.unknown_id) w.set("tokenizer.ggml.unknown_token_id", V::u32(std::uint32_t(*t.unknown_id)));
    if (t.padding_id) w.set("tokenizer.ggml.padding_token_id", V::u32(std::uint32_t(*t.padding_id)));
    if (t.add_bos) w.set("tokenizer.ggml.add_bos_token", V::boolean(*t.add_bos));
    if (t.add_eos) w.set("tokenizer.ggml.add_eos_token", V::boolean(*t.add_eos));
    if (t.model == "llama") w.set("tokenizer.ggml.add_space_prefix", V::boolean(vocabulary->add_space_prefix));
  }
  // The block linears whose Q4_1 blocks come from their INT codes, by HF tensor name.
  std::vector<std::pair<std::string, Tensor>> exact;
  if (matrix_type == io::GgmlType::Q4_1)
    for (std::int64_t i = 0; i < model.num_layers(); ++i)
      for (std::size_t p = 0; p < models::llama::all_block_linears().size(); ++p) {
        nn::Linear& linear = model.block(i).linear(models::llama::DecoderBlock::Proj(p));
        if (const auto q = int_base_with_merged_adapter(linear))
          if (auto blocks = exact_q4_1_blocks(*q)) exact.emplace_back(linear.name() + ".weight", std::move(*blocks));
      }
  GgufExportSummary summary;
  // convert_hf_to_gguf.py's permute(): q over head_count heads, k over head_count_kv heads (rows of any dtype).
  const auto interleave_rope_rows = [&](const std::string& hf_name, const Tensor& t) {
    if (hf_name.ends_with("self_attn.q_proj.weight")) return io::rope_rows_half_to_interleaved(t, c.num_attention_heads, hf_name);
    if (hf_name.ends_with("self_attn.k_proj.weight")) return io::rope_rows_half_to_interleaved(t, c.num_key_value_heads, hf_name);
    return t;
  };
  for (auto& [hf_name, tensor] : detail::merged_hf_tensors(model)) {
    const std::optional<std::string> gguf_name = io::hf_to_gguf_name(hf_name);
    QLORA_CHECK(gguf_name.has_value(), "export to gguf: no llama.cpp name for tensor " + hf_name);
    // (a named copy: clang before 16 cannot capture a structured binding in a lambda)
    const std::string& name = hf_name;
    const auto from_codes = std::find_if(exact.begin(), exact.end(), [&](const auto& e) { return e.first == name; });
    if (from_codes != exact.end()) {
      const Tensor blocks = interleave_rope_rows(hf_name, from_codes->second);
      const auto* bytes = reinterpret_cast<const std::byte*>(blocks.data<std::uint8_t>());
      w.add_encoded_tensor(*gguf_name, {tensor.dim(0), tensor.dim(1)}, io::GgmlType::Q4_1,
                           std::vector<std::byte>(bytes, bytes + blocks.nbytes()));
      ++summary.exact_q4_1;
      continue;
    }
    const Tensor t = interleave_rope_rows(hf_name, tensor);
    io::GgmlType type = io::GgmlType::F32;
    if (t.rank() == 2) {
      type = matrix_type;
      const bool blocked = type == io::GgmlType::Q8_0 || type == io::GgmlType::Q4_1;
      if (blocked && t.shape().last() % cpu::kGgufBlockValues != 0) type = io::GgmlType::F16;
      if (blocked) ++(type == io::GgmlType::F16 ? summary.f16_fallback : summary.requantized);
    }
    w.add_tensor(*gguf_name, t, type);
  }
  w.write(out_file);
  return summary;
}

}  // namespace qlora::train
