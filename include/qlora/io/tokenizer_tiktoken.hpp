#pragma once
// tiktoken rank files (Meta's Llama 3 `tokenizer.model`): one line "base64(token bytes) SPACE rank" per
// token, as tiktoken/load.py `load_tiktoken_bpe` reads them; the rank is the token id and doubles as
// the merge priority. Special tokens are not in the file: they come from tokenizer_config.json
// (tokenizer_hf_json.hpp) or, for Meta's Llama 3 layout, from llama3_special_tokens().

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/io/tokenizer.hpp"
#include "qlora/io/tokenizer_bpe.hpp"

namespace qlora::io {

// Standard base64 (RFC 4648 with '=' padding); nullopt on any other character or a bad length.
inline std::optional<std::string> decode_base64(std::string_view text) {
  auto value = [](char c) -> int {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
  };
  if (text.size() % 4 != 0) return std::nullopt;
  std::string bytes;
  for (std::size_t at = 0; at < text.size(); at += 4) {
    const bool last = at + 4 == text.size();
    const int pad = last ? int(text[at + 3] == '=') + int(text[at + 2] == '=' && text[at + 3] == '=') : 0;
    std::uint32_t group = 0;
    for (int k = 0; k < 4; ++k) {
      const int v = k >= 4 - pad ? 0 : value(text[at + std::size_t(k)]);
      if (v < 0) return std::nullopt;
      group = (group << 6) | std::uint32_t(v);
    }
    bytes += char((group >> 16) & 0xFF);
    if (pad < 2) bytes += char((group >> 8) & 0xFF);
    if (pad < 1) bytes += char(group & 0xFF);
  }
  return bytes;
}

// Real rank files hold tokens of at most a few hundred bytes; merges_from_ranks costs the square of a token's
// length, so a longer one is refused as corrupt (fuzz smoke: a 48 KB token took seconds under ASan).
inline constexpr std::size_t kMaxTiktokenTokenBytes = 4096;

// Tokens indexed by rank; a malformed line, a repeated rank or a gap in the ranks is an error.
inline std::vector<std::string> parse_tiktoken_ranks(std::string_view text, const std::string& name) {
  std::vector<std::string> tokens;
  std::vector<bool> seen;
  // Ranks are 0 .. n-1 with one line each, so no rank reaches the line count: a larger one is refused before
  // the token table is sized by it (fuzz smoke: rank 99999999 asked for gigabytes).
  const std::size_t lines = std::size_t(std::count(text.begin(), text.end(), '\n')) + 1;
  std::size_t line_number = 0;
  for (std::size_t at = 0; at < text.size();) {
    std::size_t end = text.find('\n', at);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(at, end - at);
    at = end + 1;
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    const std::string where = "tokenizer: '" + name + "' line " + std::to_string(line_number);
    const std::size_t space = line.find(' ');
    QLORA_CHECK(space != std::string_view::npos, where + " is not 'base64 rank'");
    const auto bytes = decode_base64(line.substr(0, space));
    QLORA_CHECK(bytes.has_value() && !bytes->empty(), where + " has an invalid base64 token");
    QLORA_CHECK(bytes->size() <= kMaxTiktokenTokenBytes, where + " has a token of " + std::to_string(bytes->size()) +
                                                              " bytes (at most " + std::to_string(kMaxTiktokenTokenBytes) + ")");
    const std::string_view digits = line.substr(space + 1);
    QLORA_CHECK(!digits.empty() && digits.size() <= 9 &&
                    digits.find_first_not_of("0123456789") == std::string_view::npos,
                where + " has an invalid rank '" + std::string(digits) + "'");
    const auto rank = std::size_t(std::stoul(std::string(digits)));
    QLORA_CHECK(rank < lines, where + " has rank " + std::string(digits) + ", but the file has only " +
                                  std::to_string(lines) + " lines (ranks run 0 .. n-1)");
    if (rank >= tokens.size()) {
      tokens.resize(rank + 1);
      seen.resize(rank + 1, false);
    }
    QLORA_CHECK(!seen[rank], where + " repeats rank " + std::to_string(rank));
    seen[rank] = true;
    tokens[rank] = std::move(*bytes);
  }
  QLORA_CHECK(!tokens.empty(), "tokenizer: '" + name + "' holds no tiktoken ranks");
  for (std::size_t rank = 0; rank < tokens.size(); ++rank) {
    QLORA_CHECK(seen[rank], "tokenizer: '" + name + "' has no token of rank " + std::to_string(rank));
  }
  return tokens;
}

// tiktoken merges the adjacent pair whose concatenation has the lowest rank; as merge rules that is
// every split (a, b) of a token t into two tokens, with t's rank.
inline std::vector<BpeMerge> merges_from_ranks(const std::vector<std::string>& tokens) {
  detail::PieceToId ids;
  for (std::size_t id = 0; id < tokens.size(); ++id) ids.emplace(tokens[id], std::int32_t(id));
  std::vector<BpeMerge> merges;
  for (std::size_t id = 0; id < tokens.size(); ++id) {
    const std::string_view t = tokens[id];
    for (std::size_t k = 1; k < t.size(); ++k) {
      const auto left = detail::find_piece(ids, t.substr(0, k));
      const auto right = detail::find_piece(ids, t.substr(k));
      if (left && right) merges.push_back({*left, *right, std::int32_t(id)});
    }
  }
  return merges;
}

// Meta's Llama 3 special tokens (meta-llama/llama3, llama/tokenizer.py): 256 ids after the ranks.
inline std::vector<SpecialToken> llama3_special_tokens(std::int32_t num_base_tokens) {
  std::vector<std::string> names = {"<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                                    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                                    "<|reserved_special_token_4|>", "<|eot_id|>"};
  for (int i = 5; i < 256 - 5; ++i) names.push_back("<|reserved_special_token_" + std::to_string(i) + "|>");
  std::vector<SpecialToken> specials;
  for (std::size_t i = 0; i < names.size(); ++i) specials.push_back({names[i], num_base_tokens + std::int32_t(i), true});
  return specials;
}

struct TiktokenOptions {
  std::vector<std::string> pre_tokenizer_patterns = {std::string(kLlama3Pattern)};
  std::vector<SpecialToken> special_tokens;  // ids at or after the ranks
  std::int32_t bos_id = -1;
  std::int32_t eos_id = -1;
  std::int32_t pad_id = -1;
};

inline BpeVocabulary tiktoken_vocabulary(const std::string& path, TiktokenOptions options) {
  BpeVocabulary vocab;
  vocab.tokens = parse_tiktoken_ranks(detail::read_tokenizer_file(path), path);
  vocab.merges = merges_from_ranks(vocab.tokens);
  vocab.pre_tokenizer_patterns = std::move(options.pre_tokenizer_patterns);
  vocab.ignore_merges = true;  // tiktoken takes a piece that is a token whole
  vocab.special_tokens = std::move(options.special_tokens);
  vocab.bos_id = options.bos_id;
  vocab.eos_id = options.eos_id;
  vocab.pad_id = options.pad_id;
  return vocab;
}

inline std::unique_ptr<BpeTokenizer> load_tiktoken_tokenizer(const std::string& path, TiktokenOptions options) {
  return std::make_unique<BpeTokenizer>(tiktoken_vocabulary(path, std::move(options)), path);
}

}  // namespace qlora::io
