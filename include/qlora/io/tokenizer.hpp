#pragma once
// Tokenizer: the interface every tokenizer of the library implements (docs/tokenizers.md).
//   encode(text, add_bos, add_eos, allow_special) -> token ids;  decode(ids) -> text.
// The base class owns what all of them share: BOS/EOS/pad ids, the table of special tokens and their
// matching in the text (before any pre-tokenization), and the range checks on ids. A subclass only
// encodes ordinary text and decodes checked ids.

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "qlora/core/error.hpp"

namespace qlora::io {

// A token whose text is matched as a whole before the ordinary tokenizer sees the text.
struct SpecialToken {
  std::string text;  // e.g. "<|begin_of_text|>"
  std::int32_t id = -1;
  // true: matched only when encode(..., allow_special = true) (control tokens: BOS, EOS, chat markers).
  // false: always matched, like Hugging Face's non-special added tokens and GGUF user-defined tokens.
  bool needs_allow = true;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids of `text`. allow_special: spans equal to a special token's text become that token;
  // otherwise they are tokenized as ordinary text (Meta's Llama 3 tokenizer.py default, which keeps
  // user text from injecting control tokens).
  std::vector<std::int32_t> encode(std::string_view text, bool add_bos = false, bool add_eos = false,
                                   bool allow_special = false) const {
    std::vector<std::int32_t> ids;
    if (add_bos) {
      QLORA_CHECK(bos_id_ >= 0, "tokenizer: add_bos requested but the vocabulary has no BOS token");
      ids.push_back(bos_id_);
    }
    std::size_t start = 0;
    while (start < text.size()) {
      const auto [at, special] = find_special(text, start, allow_special);
      if (at > start) encode_ordinary(text.substr(start, at - start), ids);
      if (special == nullptr) break;
      ids.push_back(special->id);
      start = at + special->text.size();
    }
    if (add_eos) {
      QLORA_CHECK(eos_id_ >= 0, "tokenizer: add_eos requested but the vocabulary has no EOS token");
      ids.push_back(eos_id_);
    }
    return ids;
  }

  // The text of `ids`; an id outside [0, vocab_size) is an error, never a silent skip.
  std::string decode(std::span<const std::int32_t> ids) const {
    for (std::int32_t id : ids) check_id(id);
    return decode_checked(ids);
  }

  // The vocabulary's piece for `id`: SentencePiece form for SentencePiece-style vocabularies
  // ("▁Hello", "<0x0A>", "<s>"), the raw bytes for byte-level BPE, the text of a special token.
  std::string token_to_piece(std::int32_t id) const {
    check_id(id);
    return piece_checked(id);
  }

  std::int32_t vocab_size() const { return vocab_size_; }
  std::int32_t bos_id() const { return bos_id_; }  // -1 when the vocabulary has none
  std::int32_t eos_id() const { return eos_id_; }
  std::int32_t pad_id() const { return pad_id_; }

  // The id of the special token spelled `text` ("<|eot_id|>", "</s>"), if there is one.
  std::optional<std::int32_t> special_token_id(std::string_view text) const {
    for (const SpecialToken& s : special_tokens_) {
      if (s.text == text) return s.id;
    }
    return std::nullopt;
  }
  const std::vector<SpecialToken>& special_tokens() const { return special_tokens_; }

 protected:
  // Appends the ids of `text`, which holds no special token to match.
  virtual void encode_ordinary(std::string_view text, std::vector<std::int32_t>& out) const = 0;
  virtual std::string decode_checked(std::span<const std::int32_t> ids) const = 0;
  virtual std::string piece_checked(std::int32_t id) const = 0;

  void set_special_tokens(std::vector<SpecialToken> tokens) {
    for (const SpecialToken& s : tokens) {
      QLORA_CHECK(!s.text.empty(), "tokenizer: special token " + std::to_string(s.id) + " has empty text");
      check_id(s.id);
    }
    // Longest first, so that of two tokens starting at one place the longer one wins.
    std::stable_sort(tokens.begin(), tokens.end(),
                     [](const SpecialToken& a, const SpecialToken& b) { return a.text.size() > b.text.size(); });
    special_tokens_ = std::move(tokens);
    any_always_matched_ = std::any_of(special_tokens_.begin(), special_tokens_.end(),
                                      [](const SpecialToken& s) { return !s.needs_allow; });
    first_bytes_.assign(256, false);
    for (const SpecialToken& s : special_tokens_) first_bytes_[static_cast<unsigned char>(s.text[0])] = true;
  }

  void check_id(std::int32_t id) const {
    QLORA_CHECK(id >= 0 && id < vocab_size_, "tokenizer: token id " + std::to_string(id) +
                                                 " is out of range [0, " + std::to_string(vocab_size_) + ")");
  }

  std::int32_t vocab_size_ = 0;
  std::int32_t bos_id_ = -1;
  std::int32_t eos_id_ = -1;
  std::int32_t pad_id_ = -1;

 private:
  // The leftmost special token at or after `start` (longest at that place), or {size, nullptr}.
  std::pair<std::size_t, const SpecialToken*> find_special(std::string_view text, std::size_t start,
                                                           bool allow_special) const {
    if (special_tokens_.empty() || (!allow_special && !any_always_matched_)) return {text.size(), nullptr};
    for (std::size_t at = start; at < text.size(); ++at) {
      if (!first_bytes_[static_cast<unsigned char>(text[at])]) continue;
      for (const SpecialToken& s : special_tokens_) {
        if ((allow_special || !s.needs_allow) && text.substr(at, s.text.size()) == s.text) return {at, &s};
      }
    }
    return {text.size(), nullptr};
  }

  std::vector<SpecialToken> special_tokens_;
  std::vector<bool> first_bytes_;  // bytes that start some special token
  bool any_always_matched_ = false;
};

namespace detail {

// The whole file as bytes; a missing or unreadable file is an error naming it.
inline std::string read_tokenizer_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  QLORA_CHECK(in.good(), "tokenizer: cannot open '" + path + "'");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  QLORA_CHECK(!in.bad(), "tokenizer: cannot read '" + path + "'");
  return bytes;
}

// Length of the UTF-8 sequence starting with `lead` (1 for a stray continuation or invalid byte, so
// that malformed text still advances one byte at a time).
inline std::size_t utf8_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead >> 5) == 0x6) return 2;
  if ((lead >> 4) == 0xE) return 3;
  if ((lead >> 3) == 0x1E) return 4;
  return 1;
}

// Hash map keyed by std::string that is looked up by std::string_view without a copy.
struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using PieceToId = std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>>;

inline std::optional<std::int32_t> find_piece(const PieceToId& map, std::string_view piece) {
  const auto it = map.find(piece);
  if (it == map.end()) return std::nullopt;
  return it->second;
}

}  // namespace detail
}  // namespace qlora::io
