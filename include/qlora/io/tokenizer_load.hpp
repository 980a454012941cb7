#pragma once
// load_tokenizer(path): the tokenizer of a file or model directory, chosen by what the file holds
// (docs/tokenizers.md):
//   *.gguf (GGUF magic)            the embedded vocabulary (tokenizer_vocab.hpp, through io/gguf.hpp)
//   JSON (tokenizer.json)          byte-level BPE (tokenizer_hf_json.hpp), BOS/EOS from a
//                                  tokenizer_config.json beside it
//   lines "base64 rank" (tiktoken) byte-level BPE with Llama 3's regex (tokenizer_tiktoken.hpp), special
//                                  tokens from a tokenizer_config.json beside it, else Meta's Llama 3 list
//                                  when the file has Llama 3's 128000 ranks
//   *.bin                          llama2.c tokenizer.bin (tokenizer_llama2c.hpp)
//   anything else                  a SentencePiece model (tokenizer_sentencepiece.hpp)
// A directory: tokenizer.model when it is a SentencePiece model, else tokenizer.json, else
// tokenizer.model (tiktoken), else tokenizer.bin.

#include <algorithm>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>

#include "qlora/io/gguf.hpp"
#include "qlora/io/tokenizer.hpp"
#include "qlora/io/tokenizer_hf_json.hpp"
#include "qlora/io/tokenizer_llama2c.hpp"
#include "qlora/io/tokenizer_sentencepiece.hpp"
#include "qlora/io/tokenizer_tiktoken.hpp"
#include "qlora/io/tokenizer_vocab.hpp"

namespace qlora::io {

enum class TokenizerFileKind { gguf, hf_json, tiktoken, llama2c, sentencepiece };

namespace detail {

inline bool looks_like_tiktoken(std::string_view head) {
  const std::size_t end = std::min(head.find('\n'), head.size());
  const std::string_view line = head.substr(0, end);
  const std::size_t space = line.find(' ');
  if (space == std::string_view::npos || space == 0 || space + 1 >= line.size()) return false;
  const std::string_view token = line.substr(0, space), rank = line.substr(space + 1);
  static constexpr std::string_view base64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
  return token.find_first_not_of(base64) == std::string_view::npos &&
         rank.find_first_not_of("0123456789\r") == std::string_view::npos;
}

}  // namespace detail

inline TokenizerFileKind tokenizer_file_kind(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  QLORA_CHECK(in.good(), "tokenizer: cannot open '" + path.string() + "'");
  std::string head(256, '\0');
  in.read(head.data(), std::streamsize(head.size()));
  head.resize(std::size_t(in.gcount()));
  if (head.starts_with("GGUF")) return TokenizerFileKind::gguf;
  const std::size_t first = head.find_first_not_of(" \t\r\n");
  if (first != std::string::npos && head[first] == '{') return TokenizerFileKind::hf_json;
  if (detail::looks_like_tiktoken(head)) return TokenizerFileKind::tiktoken;
  if (path.extension() == ".bin") return TokenizerFileKind::llama2c;
  return TokenizerFileKind::sentencepiece;
}

// The vocabulary io/gguf.hpp reads from a GGUF file, as tokenizer_vocab.hpp takes it.
inline EmbeddedVocabulary embedded_vocabulary(const GgufFile& file) {
  const GgufTokenizerData data = gguf_tokenizer(file);
  EmbeddedVocabulary v;
  v.model = data.model;
  v.pre = data.pre;
  v.tokens = data.tokens;
  v.scores = data.scores;
  v.token_types = data.token_types;
  v.merges = data.merges;
  v.bos_id = std::int32_t(data.bos_id.value_or(-1));
  v.eos_id = std::int32_t(data.eos_id.value_or(-1));
  v.unk_id = std::int32_t(data.unknown_id.value_or(-1));
  v.pad_id = std::int32_t(data.padding_id.value_or(-1));
  v.add_space_prefix = file.find_bool("tokenizer.ggml.add_space_prefix").value_or(true);
  return v;
}

inline std::unique_ptr<Tokenizer> load_tokenizer(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  if (fs::is_directory(path)) {
    const fs::path model = path / "tokenizer.model", json = path / "tokenizer.json", bin = path / "tokenizer.bin";
    if (fs::exists(model) && tokenizer_file_kind(model) == TokenizerFileKind::sentencepiece) return load_tokenizer(model);
    if (fs::exists(json)) return load_tokenizer(json);
    if (fs::exists(model)) return load_tokenizer(model);
    if (fs::exists(bin)) return load_tokenizer(bin);
    throw Error("tokenizer: directory '" + path.string() +
                "' has no tokenizer.model, tokenizer.json or tokenizer.bin");
  }
  const std::string name = path.string();
  const fs::path config_path = path.parent_path() / "tokenizer_config.json";
  const bool has_config = fs::exists(config_path) && path.filename() != "tokenizer_config.json";
  switch (tokenizer_file_kind(path)) {
    case TokenizerFileKind::gguf:
      return make_vocabulary_tokenizer(embedded_vocabulary(GgufFile(path)), name);
    case TokenizerFileKind::hf_json: {
      if (!has_config) return load_hf_tokenizer_json(name);
      const HfSpecialTokens config = read_hf_tokenizer_config(config_path.string());
      return load_hf_tokenizer_json(name, &config);
    }
    case TokenizerFileKind::tiktoken: {
      TiktokenOptions options;
      if (has_config) {
        HfSpecialTokens config = read_hf_tokenizer_config(config_path.string());
        options.special_tokens = std::move(config.tokens);
        options.bos_id = config.bos_id, options.eos_id = config.eos_id, options.pad_id = config.pad_id;
      }
      BpeVocabulary vocab = tiktoken_vocabulary(name, std::move(options));
      if (!has_config && vocab.tokens.size() == 128000) {
        // Meta's Llama 3 download: tokenizer.model without a tokenizer_config.json.
        vocab.special_tokens = llama3_special_tokens(128000);
        vocab.bos_id = 128000, vocab.eos_id = 128001;
      }
      return std::make_unique<BpeTokenizer>(std::move(vocab), name);
    }
    case TokenizerFileKind::llama2c:
      return load_llama2c_tokenizer(name);
    case TokenizerFileKind::sentencepiece:
      return SentencePieceTokenizer::from_file(name);
  }
  throw Error("tokenizer: '" + name + "' has an unknown format");
}

}  // namespace qlora::io
