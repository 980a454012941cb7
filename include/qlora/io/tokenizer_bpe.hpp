#pragma once
// Byte-level BPE (GPT-2, Llama 3, SmolLM): docs/tokenizers.md.
//   1. special tokens are matched first (Tokenizer::encode);
//   2. the pre-tokenizer splits the text with one or more regexes (PCRE2 with UTF + UCP, so \p{L},
//      \p{N} and \s are Unicode classes); each regex splits every piece of the previous one, and both
//      its matches and the text between them become pieces (Hugging Face's "Isolated" split);
//   3. each piece is taken as bytes: with ignore_merges a piece that is a token is that token
//      (tiktoken, Llama 3); otherwise from single bytes the adjacent pair of lowest merge rank is merged
//      (leftmost on ties) until no pair has a merge: tiktoken's byte_pair_merge and Hugging Face's BPE
//      model, with a priority queue instead of rescans.
// Tokens are held as raw bytes; tokenizer.json and GGUF spell them in GPT-2's byte-to-unicode alphabet,
// which byte_level_to_bytes undoes on loading.

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qlora/io/tokenizer.hpp"

namespace qlora::io {

// Meta's Llama 3 pre-tokenizer: `pat_str` of meta-llama/llama3, llama/tokenizer.py (also tiktoken's
// cl100k_base).
inline constexpr std::string_view kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// GPT-2's pre-tokenizer (openai/gpt-2 src/encoder.py; Hugging Face ByteLevel with use_regex).
inline constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// One merge rule: tokens `left` and `right` next to each other become their concatenation; lower
// rank merges first.
struct BpeMerge {
  std::int32_t left = -1;
  std::int32_t right = -1;
  std::int32_t rank = 0;
};

struct BpeVocabulary {
  std::vector<std::string> tokens;  // id -> raw bytes ("" for an id only a special token uses)
  std::vector<BpeMerge> merges;
  std::vector<std::string> pre_tokenizer_patterns;  // applied in order; empty: no split
  bool ignore_merges = false;
  std::vector<SpecialToken> special_tokens;
  std::int32_t bos_id = -1;
  std::int32_t eos_id = -1;
  std::int32_t pad_id = -1;
};

// GPT-2's reversible map of the 256 bytes onto printable code points (openai/gpt-2 encoder.py
// bytes_to_unicode): printable Latin-1 bytes map to themselves, the others to 256, 257, ...
inline const std::array<char32_t, 256>& gpt2_byte_to_unicode() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      t[std::size_t(b)] = printable ? char32_t(b) : next++;
    }
    return t;
  }();
  return table;
}

// A token spelled in GPT-2's alphabet ("Ġthe") -> its bytes (" the"); nullopt when a character is
// outside the alphabet (added tokens such as "<|begin_of_text|>" are stored as plain text).
inline std::optional<std::string> byte_level_to_bytes(std::string_view text) {
  static const std::unordered_map<char32_t, unsigned char> to_byte = [] {
    std::unordered_map<char32_t, unsigned char> m;
    const auto& t = gpt2_byte_to_unicode();
    for (int b = 0; b < 256; ++b) m.emplace(t[std::size_t(b)], static_cast<unsigned char>(b));
    return m;
  }();
  std::string bytes;
  for (std::size_t at = 0; at < text.size();) {
    const auto lead = static_cast<unsigned char>(text[at]);
    const std::size_t length = detail::utf8_length(lead);
    if (at + length > text.size()) return std::nullopt;
    char32_t cp = length == 1 ? lead : length == 2 ? (lead & 0x1F) : length == 3 ? (lead & 0x0F) : (lead & 0x07);
    for (std::size_t k = 1; k < length; ++k) cp = (cp << 6) | (static_cast<unsigned char>(text[at + k]) & 0x3F);
    const auto it = to_byte.find(cp);
    if (it == to_byte.end()) return std::nullopt;
    bytes += char(it->second);
    at += length;
  }
  return bytes;
}

namespace detail {
// A token of a GPT-2 alphabet vocabulary -> its bytes; plain text (added tokens) stays as it is.
inline std::string vocab_token_bytes(const std::string& token) {
  auto bytes = byte_level_to_bytes(token);
  return bytes ? std::move(*bytes) : token;
}
}  // namespace detail

class BpeTokenizer final : public Tokenizer {
 public:
  // `name` (a path) labels error messages.
  BpeTokenizer(BpeVocabulary vocab, const std::string& name) : vocab_(std::move(vocab)) {
    std::int32_t size = std::int32_t(vocab_.tokens.size());
    // Special tokens extend the vocabulary by at most their number: a file claiming id 2^31 - 1 would
    // otherwise make us allocate 2^31 strings (and overflow size).
    const std::size_t id_limit = vocab_.tokens.size() + vocab_.special_tokens.size();
    for (const SpecialToken& s : vocab_.special_tokens) {
      QLORA_CHECK(s.id >= 0, "tokenizer: '" + name + "' has special token '" + s.text + "' with a negative id");
      QLORA_CHECK(std::size_t(s.id) < id_limit, "tokenizer: '" + name + "' has special token '" + s.text + "' with id " +
                                                    std::to_string(s.id) + ", beyond its " + std::to_string(id_limit) +
                                                    " tokens and special tokens");
      size = std::max(size, s.id + 1);
    }
    QLORA_CHECK(size > 0, "tokenizer: '" + name + "' has an empty vocabulary");
    vocab_size_ = size;
    vocab_.tokens.resize(std::size_t(size));
    for (std::int32_t id : {vocab_.bos_id, vocab_.eos_id, vocab_.pad_id}) {
      QLORA_CHECK(id >= -1 && id < vocab_size_,
                  "tokenizer: '" + name + "' names special token id " + std::to_string(id) + " outside the vocabulary");
    }
    bos_id_ = vocab_.bos_id;
    eos_id_ = vocab_.eos_id;
    pad_id_ = vocab_.pad_id;

    byte_ids_.fill(-1);
    for (std::int32_t id = 0; id < vocab_size_; ++id) {
      const std::string& bytes = vocab_.tokens[std::size_t(id)];
      if (bytes.empty()) continue;
      token_ids_.emplace(bytes, id);  // keeps the first of duplicates
      if (bytes.size() == 1 && byte_ids_[static_cast<unsigned char>(bytes[0])] < 0) {
        byte_ids_[static_cast<unsigned char>(bytes[0])] = id;
      }
    }
    for (const BpeMerge& m : vocab_.merges) {
      QLORA_CHECK(m.left >= 0 && m.left < vocab_size_ && m.right >= 0 && m.right < vocab_size_,
                  "tokenizer: '" + name + "' has a merge of token ids outside the vocabulary");
      const std::string joined = vocab_.tokens[std::size_t(m.left)] + vocab_.tokens[std::size_t(m.right)];
      const auto merged = detail::find_piece(token_ids_, joined);
      QLORA_CHECK(merged.has_value(), "tokenizer: '" + name + "' has merge rank " + std::to_string(m.rank) +
                                          " whose result is not a token (ids " + std::to_string(m.left) + " + " +
                                          std::to_string(m.right) + ")");
      merges_.emplace(pair_key(m.left, m.right), MergeResult{m.rank, *merged});  // first rule of a pair wins
    }
    for (const std::string& pattern : vocab_.pre_tokenizer_patterns) patterns_.push_back(compile(pattern, name));
    set_special_tokens(vocab_.special_tokens);
    for (const SpecialToken& s : vocab_.special_tokens) special_text_.emplace(s.id, s.text);
  }

  const BpeVocabulary& vocabulary() const { return vocab_; }

 protected:
  void encode_ordinary(std::string_view text, std::vector<std::int32_t>& out) const override {
    std::vector<std::string_view> pieces{text};
    for (const auto& pattern : patterns_) pieces = split(pattern.get(), pieces);
    for (std::string_view piece : pieces) encode_piece(piece, out);
  }

  std::string decode_checked(std::span<const std::int32_t> ids) const override {
    std::string text;
    for (std::int32_t id : ids) text += piece_checked(id);
    return text;
  }

  std::string piece_checked(std::int32_t id) const override {
    if (const auto it = special_text_.find(id); it != special_text_.end()) return it->second;
    return vocab_.tokens[std::size_t(id)];
  }

 private:
  struct MergeResult {
    std::int32_t rank;
    std::int32_t id;
  };
  struct CodeDeleter {
    void operator()(pcre2_code* code) const { pcre2_code_free(code); }
  };
  struct MatchDataDeleter {
    void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
  };
  using Regex = std::unique_ptr<pcre2_code, CodeDeleter>;

  static std::uint64_t pair_key(std::int32_t left, std::int32_t right) {
    return (std::uint64_t(std::uint32_t(left)) << 32) | std::uint32_t(right);
  }

  static Regex compile(const std::string& pattern, const std::string& name) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      throw Error("tokenizer: '" + name + "' has a pre-tokenizer regex that PCRE2 rejects at offset " +
                  std::to_string(offset) + " (" + reinterpret_cast<const char*>(message.data()) + "): " + pattern);
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional speed-up: the interpreter is used without JIT
    return Regex(code);
  }

  // Every piece split into the regex's matches and the text between them, in order.
  static std::vector<std::string_view> split(const pcre2_code* regex, const std::vector<std::string_view>& pieces) {
    std::unique_ptr<pcre2_match_data, MatchDataDeleter> match(pcre2_match_data_create_from_pattern(regex, nullptr));
    std::vector<std::string_view> result;
    for (std::string_view piece : pieces) {
      std::size_t at = 0, kept = 0;
      std::uint32_t options = 0;  // the first match of a piece checks its UTF-8, later ones need not
      while (at < piece.size()) {
        const int rc = pcre2_match(regex, reinterpret_cast<PCRE2_SPTR>(piece.data()), piece.size(), at, options,
                                   match.get(), nullptr);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
          const bool bad_utf8 = rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21;
          QLORA_CHECK(!bad_utf8, "tokenizer: the text is not valid UTF-8 (at byte " +
                                     std::to_string(pcre2_get_startchar(match.get())) + " of a piece)");
          throw Error("tokenizer: PCRE2 failed on the pre-tokenizer regex (error " + std::to_string(rc) + ")");
        }
        options = PCRE2_NO_UTF_CHECK;
        const PCRE2_SIZE* span = pcre2_get_ovector_pointer(match.get());
        const std::size_t begin = span[0], end = span[1];
        if (begin > kept) result.push_back(piece.substr(kept, begin - kept));
        if (end > begin) {
          result.push_back(piece.substr(begin, end - begin));
          kept = at = end;
        } else {  // an empty match: step over one character
          at = begin + std::min(detail::utf8_length(static_cast<unsigned char>(piece[begin])), piece.size() - begin);
        }
      }
      if (kept < piece.size()) result.push_back(piece.substr(kept));
    }
    return result;
  }

  void encode_piece(std::string_view piece, std::vector<std::int32_t>& out) const {
    if (piece.empty()) return;
    if (vocab_.ignore_merges) {
      if (const auto id = detail::find_piece(token_ids_, piece)) {
        out.push_back(*id);
        return;
      }
    }
    struct Symbol {
      std::int32_t id, prev, next;  // id -1: merged into its left neighbour
    };
    std::vector<Symbol> symbols(piece.size());
    for (std::size_t i = 0; i < piece.size(); ++i) {
      const std::int32_t id = byte_ids_[static_cast<unsigned char>(piece[i])];
      QLORA_CHECK(id >= 0, "tokenizer: byte " + std::to_string(static_cast<unsigned char>(piece[i])) +
                               " has no token in this byte-level vocabulary");
      symbols[i] = {id, std::int32_t(i) - 1, std::int32_t(i + 1)};
    }
    symbols.back().next = -1;

    struct Candidate {
      std::int32_t rank, left, right, left_id, right_id;  // ids when queued: different ids mean stale
    };
    auto lower_priority = [](const Candidate& a, const Candidate& b) {
      return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower_priority)> queue(lower_priority);
    auto try_pair = [&](std::int32_t left, std::int32_t right) {
      if (left < 0 || right < 0) return;
      const std::int32_t a = symbols[std::size_t(left)].id, b = symbols[std::size_t(right)].id;
      if (const auto it = merges_.find(pair_key(a, b)); it != merges_.end()) {
        queue.push({it->second.rank, left, right, a, b});
      }
    };
    for (std::size_t i = 1; i < symbols.size(); ++i) try_pair(std::int32_t(i - 1), std::int32_t(i));
    while (!queue.empty()) {
      const Candidate best = queue.top();
      queue.pop();
      Symbol& left = symbols[std::size_t(best.left)];
      Symbol& right = symbols[std::size_t(best.right)];
      if (left.id != best.left_id || right.id != best.right_id || left.next != best.right) continue;
      left.id = merges_.at(pair_key(best.left_id, best.right_id)).id;
      right.id = -1;
      left.next = right.next;
      if (right.next >= 0) symbols[std::size_t(right.next)].prev = best.left;
      try_pair(left.prev, best.left);
      try_pair(best.left, left.next);
    }
    for (std::int32_t i = 0; i >= 0; i = symbols[std::size_t(i)].next) out.push_back(symbols[std::size_t(i)].id);
  }

  BpeVocabulary vocab_;
  detail::PieceToId token_ids_;                          // bytes -> id
  std::array<std::int32_t, 256> byte_ids_{};             // single byte -> id, or -1
  std::unordered_map<std::uint64_t, MergeResult> merges_;  // (left, right) -> rank, merged id
  std::vector<Regex> patterns_;
  std::unordered_map<std::int32_t, std::string> special_text_;
};

}  // namespace qlora::io
