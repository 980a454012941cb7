#pragma once
// Tokenizers from a vocabulary embedded in a model file (GGUF's tokenizer.ggml.* keys), taken as plain
// vectors so that this header does not depend on a file reader (tokenizer_load.hpp connects it to
// io/gguf.hpp). As llama.cpp reads them:
//   model "llama": SentencePiece pieces + scores + token types -> the score merge
//                  (tokenizer_score_merge.hpp, llama.cpp's SPM tokenizer);
//   model "gpt2":  byte-level tokens + "a b" merges, the pre-tokenizer chosen by tokenizer.ggml.pre
//                  -> byte-level BPE (tokenizer_bpe.hpp).

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/io/tokenizer.hpp"
#include "qlora/io/tokenizer_bpe.hpp"
#include "qlora/io/tokenizer_score_merge.hpp"

namespace qlora::io {

struct EmbeddedVocabulary {
  std::string model;  // tokenizer.ggml.model: "llama" or "gpt2"
  std::string pre;    // tokenizer.ggml.pre (gpt2 only): "llama-bpe", "gpt-2", "smollm", ...
  std::vector<std::string> tokens;
  std::vector<float> scores;              // llama: one per token
  std::vector<std::int32_t> token_types;  // TokenType values; empty: all normal
  std::vector<std::string> merges;        // gpt2: "left right", highest priority first
  std::int32_t bos_id = -1;
  std::int32_t eos_id = -1;
  std::int32_t unk_id = -1;
  std::int32_t pad_id = -1;
  bool add_space_prefix = true;  // tokenizer.ggml.add_space_prefix (llama)
};

struct PreTokenizer {
  std::vector<std::string> patterns;
  bool ignore_merges = false;
};

// The pre-tokenizer regexes llama.cpp (src/llama-vocab.cpp) uses for a tokenizer.ggml.pre name.
inline PreTokenizer gguf_pre_tokenizer(std::string_view pre, const std::string& name) {
  // GPT-2's regex without its final "|\s+" alternative, as llama.cpp writes it (the split keeps the
  // unmatched text as pieces, so the two agree).
  static const std::string gpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S))";
  if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") return {{std::string(kLlama3Pattern)}, true};
  if (pre.empty() || pre == "default" || pre == "gpt-2" || pre == "gpt2" || pre == "mpt" || pre == "olmo") {
    return {{gpt2}, false};
  }
  if (pre == "smollm" || pre == "starcoder" || pre == "refact" || pre == "command-r" || pre == "codeshell") {
    return {{R"(\p{N})", gpt2}, false};
  }
  throw Error("tokenizer: '" + name + "' uses GGUF pre-tokenizer '" + std::string(pre) + "', which is not supported");
}

namespace detail {

inline TokenType token_type_at(const EmbeddedVocabulary& v, std::size_t id) {
  return v.token_types.empty() ? TokenType::normal : static_cast<TokenType>(v.token_types[id]);
}

inline std::unique_ptr<Tokenizer> make_score_merge_from_vocabulary(const EmbeddedVocabulary& v, const std::string& name) {
  QLORA_CHECK(v.scores.size() == v.tokens.size(), "tokenizer: '" + name + "' has " + std::to_string(v.tokens.size()) +
                                                      " tokens but " + std::to_string(v.scores.size()) + " scores");
  ScoreMergeVocabulary vocab;
  vocab.pieces = v.tokens;
  vocab.scores = v.scores;
  for (std::size_t id = 0; id < v.tokens.size(); ++id) vocab.types.push_back(token_type_at(v, id));
  vocab.bos_id = v.bos_id;
  vocab.eos_id = v.eos_id;
  vocab.pad_id = v.pad_id;
  vocab.unk_id = v.unk_id;
  vocab.add_dummy_prefix = v.add_space_prefix;
  return std::make_unique<ScoreMergeTokenizer>(std::move(vocab), name);
}

inline std::unique_ptr<Tokenizer> make_bpe_from_vocabulary(const EmbeddedVocabulary& v, const std::string& name) {
  BpeVocabulary vocab;
  PreTokenizer pre = gguf_pre_tokenizer(v.pre, name);
  vocab.pre_tokenizer_patterns = std::move(pre.patterns);
  vocab.ignore_merges = pre.ignore_merges;
  PieceToId ids;  // the tokens as spelled in the file, which the merges name
  vocab.tokens.resize(v.tokens.size());
  for (std::size_t id = 0; id < v.tokens.size(); ++id) {
    const TokenType type = token_type_at(v, id);
    const auto i = std::int32_t(id);
    ids.emplace(v.tokens[id], i);
    if (type == TokenType::control || type == TokenType::user_defined) {
      // Stored as plain text; llama.cpp matches user-defined tokens always, control ones when allowed.
      if (!v.tokens[id].empty()) vocab.special_tokens.push_back({v.tokens[id], i, type == TokenType::control});
    } else if (type != TokenType::unused) {
      vocab.tokens[id] = vocab_token_bytes(v.tokens[id]);
    }
  }
  std::int32_t rank = 0;
  for (const std::string& merge : v.merges) {
    const std::size_t space = merge.find(' ', 1);
    QLORA_CHECK(space != std::string::npos, "tokenizer: '" + name + "' has merge '" + merge + "' without a space");
    const auto a = find_piece(ids, std::string_view(merge).substr(0, space));
    const auto b = find_piece(ids, std::string_view(merge).substr(space + 1));
    QLORA_CHECK(a && b, "tokenizer: '" + name + "' has merge '" + merge + "' of a token not in the vocabulary");
    vocab.merges.push_back({*a, *b, rank++});
  }
  vocab.bos_id = v.bos_id;
  vocab.eos_id = v.eos_id;
  vocab.pad_id = v.pad_id;
  return std::make_unique<BpeTokenizer>(std::move(vocab), name);
}

}  // namespace detail

// `name` (the model file's path) labels error messages.
inline std::unique_ptr<Tokenizer> make_vocabulary_tokenizer(const EmbeddedVocabulary& vocab, const std::string& name) {
  QLORA_CHECK(!vocab.tokens.empty(), "tokenizer: '" + name + "' embeds no tokens");
  QLORA_CHECK(vocab.token_types.empty() || vocab.token_types.size() == vocab.tokens.size(),
              "tokenizer: '" + name + "' has " + std::to_string(vocab.tokens.size()) + " tokens but " +
                  std::to_string(vocab.token_types.size()) + " token types");
  for (std::int32_t t : vocab.token_types) {
    QLORA_CHECK(t >= 0 && t <= 6, "tokenizer: '" + name + "' has unknown token type " + std::to_string(t));
  }
  if (vocab.model == "llama") return detail::make_score_merge_from_vocabulary(vocab, name);
  if (vocab.model == "gpt2") return detail::make_bpe_from_vocabulary(vocab, name);
  throw Error("tokenizer: '" + name + "' has tokenizer model '" + vocab.model + "'; supported: llama, gpt2");
}

}  // namespace qlora::io
