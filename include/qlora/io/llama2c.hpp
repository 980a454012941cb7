#pragma once
// llama2.c legacy checkpoints (.bin, karpathy/llama2.c export.py legacy_export, read by run.c):
//   7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
//              (vocab_size < 0: the classifier is not shared with the token embedding and is stored last)
//   f32 arrays, each for all layers at once: tok_embeddings [vocab, dim], rms_att [L, dim],
//   wq [L, dim, dim], wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn [L, dim],
//   w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim], rms_final [dim],
//   freq_cis_real [seq_len, head_size/2], freq_cis_imag [seq_len, head_size/2], then wcls [vocab, dim] if unshared.
//
// Tensors come out under the HF Llama names (hf_config.hpp): w1 = gate_proj, w3 = up_proj, w2 = down_proj.
// llama2.c rotates interleaved pairs (2i, 2i+1) like Meta's code and its export does not permute W_q/W_k,
// so their rows are converted to HF's rotate-half order on load (rope_rows_interleaved_to_half): one RoPE
// convention for every format. Other tensors are zero-copy views of the mapped file.
// The file carries no norm epsilon or RoPE base: run.c hard-codes 1e-5 and 10000, used here too.

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora::io {

struct Llama2cHeader {
  std::int32_t dim = 0, hidden_dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, vocab_size = 0, seq_len = 0;
  bool shared_classifier = true;  // vocab_size was positive in the file

  std::int64_t head_size() const { return dim / n_heads; }
  std::string str() const {
    return "dim " + std::to_string(dim) + ", hidden_dim " + std::to_string(hidden_dim) + ", n_layers " +
           std::to_string(n_layers) + ", n_heads " + std::to_string(n_heads) + ", n_kv_heads " +
           std::to_string(n_kv_heads) + ", vocab_size " + std::to_string(shared_classifier ? vocab_size : -vocab_size) +
           ", seq_len " + std::to_string(seq_len);
  }
};

class Llama2cCheckpoint {
 public:
  static constexpr std::uint64_t kHeaderBytes = 7 * 4;

  explicit Llama2cCheckpoint(const std::filesystem::path& path) : file_(std::make_shared<MappedFile>(path)) {
    const std::string where = path.string();
    QLORA_CHECK(file_->size() >= kHeaderBytes, where + " has " + std::to_string(file_->size()) +
                                                   " bytes, fewer than the 28-byte llama2.c header");
    std::int32_t h[7];
    std::memcpy(h, file_->data(), sizeof h);
    // -2^31 has no positive counterpart (negating it is undefined): no checkpoint stores it.
    QLORA_CHECK(h[5] != std::numeric_limits<std::int32_t>::min(),
                where + ": llama2.c header field vocab_size is " + std::to_string(h[5]) + ": not a llama2.c checkpoint?");
    header_ = {h[0], h[1], h[2], h[3], h[4], h[5] < 0 ? -h[5] : h[5], h[6], h[5] > 0};
    const auto positive = [&](std::int32_t v, const char* field) {
      QLORA_CHECK(v > 0, where + ": llama2.c header field " + field + " is " + std::to_string(v) + " (header " +
                             header_.str() + "): not a llama2.c checkpoint?");
    };
    positive(header_.dim, "dim");
    positive(header_.hidden_dim, "hidden_dim");
    positive(header_.n_layers, "n_layers");
    positive(header_.n_heads, "n_heads");
    positive(header_.n_kv_heads, "n_kv_heads");
    positive(header_.vocab_size, "vocab_size");
    positive(header_.seq_len, "seq_len");
    QLORA_CHECK(header_.dim % header_.n_heads == 0 && header_.head_size() % 2 == 0 &&
                    header_.n_heads % header_.n_kv_heads == 0,
                where + ": inconsistent llama2.c header (" + header_.str() +
                    "): n_heads must divide dim into even head sizes and n_kv_heads must divide n_heads");

    const std::int64_t L = header_.n_layers, d = header_.dim, f = header_.hidden_dim, V = header_.vocab_size;
    const std::int64_t hs = header_.head_size(), kv = header_.n_kv_heads * hs;
    std::uint64_t offset = kHeaderBytes;
    // Lays out one array of `count` per-layer tensors of `shape` (count 0: a single tensor).
    const auto place = [&](const std::string& key, Shape shape, std::int64_t count) {
      // A corrupt header can ask for more bytes than 64 bits count: refuse before the sum wraps.
      QLORA_CHECK(double(offset) + double(shape.numel()) * 4.0 * double(count ? count : 1) < 1e18,
                  where + ": llama2.c header (" + header_.str() + ") implies an impossible file size");
      arrays_[key] = {offset, shape};
      offset += std::uint64_t(shape.numel()) * 4 * std::uint64_t(count ? count : 1);
    };
    place("tok_embeddings", {V, d}, 0);
    place("rms_att", {d}, L);
    place("wq", {d, d}, L);
    place("wk", {kv, d}, L);
    place("wv", {kv, d}, L);
    place("wo", {d, d}, L);
    place("rms_ffn", {d}, L);
    place("w1", {f, d}, L);
    place("w2", {d, f}, L);
    place("w3", {f, d}, L);
    place("rms_final", {d}, 0);
    place("freq_cis_real", {header_.seq_len, hs / 2}, 0);
    place("freq_cis_imag", {header_.seq_len, hs / 2}, 0);
    if (!header_.shared_classifier) place("wcls", {V, d}, 0);
    QLORA_CHECK(file_->size() == offset, where + " has " + std::to_string(file_->size()) + " bytes but its header (" +
                                             header_.str() + ") implies " + std::to_string(offset) +
                                             " bytes: truncated or not a llama2.c legacy checkpoint");

    config_.hidden_size = d;
    config_.intermediate_size = f;
    config_.num_hidden_layers = L;
    config_.num_attention_heads = header_.n_heads;
    config_.num_key_value_heads = header_.n_kv_heads;
    config_.head_dim = hs;
    config_.vocab_size = V;
    config_.max_position_embeddings = header_.seq_len;
    config_.rms_norm_eps = 1e-5;  // run.c rmsnorm
    config_.rope_theta = 10000.0; // run.c RoPE
    config_.tie_word_embeddings = header_.shared_classifier;
    config_.bos_token_id = 1;     // llama2.c's SentencePiece tokenizers: <s> = 1, </s> = 2
    config_.eos_token_ids = {2};
    config_.torch_dtype = "float32";
    config_.validate(where);

    const auto map_layers = [&](const char* key, const char* hf_suffix, std::int64_t rope_heads) {
      for (std::int64_t l = 0; l < L; ++l)
        sources_["model.layers." + std::to_string(l) + "." + hf_suffix] = {key, l, rope_heads};
    };
    sources_["model.embed_tokens.weight"] = {"tok_embeddings", -1, 0};
    map_layers("rms_att", "input_layernorm.weight", 0);
    map_layers("wq", "self_attn.q_proj.weight", header_.n_heads);
    map_layers("wk", "self_attn.k_proj.weight", header_.n_kv_heads);
    map_layers("wv", "self_attn.v_proj.weight", 0);
    map_layers("wo", "self_attn.o_proj.weight", 0);
    map_layers("rms_ffn", "post_attention_layernorm.weight", 0);
    map_layers("w1", "mlp.gate_proj.weight", 0);
    map_layers("w3", "mlp.up_proj.weight", 0);
    map_layers("w2", "mlp.down_proj.weight", 0);
    sources_["model.norm.weight"] = {"rms_final", -1, 0};
    if (!header_.shared_classifier) sources_["lm_head.weight"] = {"wcls", -1, 0};
  }

  const std::filesystem::path& path() const { return file_->path(); }
  const Llama2cHeader& header() const { return header_; }
  const LlamaConfig& config() const { return config_; }

  // HF names of the tensors, in llama_tensor_specs order.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& spec : llama_tensor_specs(config_)) out.push_back(spec.name);
    return out;
  }
  bool contains(const std::string& hf_name) const { return sources_.count(hf_name) != 0; }

  // A tensor by HF name as `dtype`: q/k rows permuted to HF order (a copy), others zero-copy when f32.
  Tensor load(const std::string& hf_name, DType dtype = DType::f32) const {
    const auto it = sources_.find(hf_name);
    QLORA_CHECK(it != sources_.end(), "tensor " + hf_name + " is not in the llama2.c checkpoint " + path().string());
    const Source& s = it->second;
    Tensor t = view(s.array, s.layer);
    if (s.rope_heads) t = rope_rows_interleaved_to_half(t, s.rope_heads, hf_name);
    return dtype == DType::f32 ? t : t.to(dtype);
  }

  // The stored RoPE tables, [seq_len, head_size / 2]: cos and sin of pos * 10000^(-2i / head_size).
  Tensor freq_cis_real() const { return view("freq_cis_real", -1); }
  Tensor freq_cis_imag() const { return view("freq_cis_imag", -1); }

  // Parameters of the model (the RoPE tables are not parameters), as HF would count them.
  std::int64_t parameter_count() const {
    std::int64_t n = 0;
    for (const auto& spec : llama_tensor_specs(config_)) n += spec.shape.numel();
    return n;
  }

 private:
  struct Array {
    std::uint64_t offset = 0;  // bytes from the start of the file
    Shape shape;               // of one layer's tensor
  };
  struct Source {
    std::string array;
    std::int64_t layer = -1;      // -1: a single tensor
    std::int64_t rope_heads = 0;  // nonzero: q/k rows to permute, in this many heads
  };

  Tensor view(const std::string& key, std::int64_t layer) const {
    const Array& a = arrays_.at(key);
    const std::uint64_t bytes = std::uint64_t(a.shape.numel()) * 4;
    std::byte* p = file_->data() + a.offset + (layer < 0 ? 0 : std::uint64_t(layer) * bytes);
    std::shared_ptr<const MappedFile> keep = file_;
    return Tensor::wrap(p, a.shape, DType::f32, Device::cpu(), [keep](void*) {});
  }

  std::shared_ptr<MappedFile> file_;
  Llama2cHeader header_;
  LlamaConfig config_;
  std::map<std::string, Array> arrays_;
  std::map<std::string, Source> sources_;
};

}  // namespace qlora::io
