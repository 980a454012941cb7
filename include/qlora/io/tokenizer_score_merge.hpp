#pragma once
// The score-driven merge of SentencePiece BPE vocabularies, as llama2.c's run.c (`encode`) and
// llama.cpp's SPM tokenizer run it on a plain list of pieces and scores (docs/tokenizers.md):
//   1. prefix the text with one space (SentencePiece's add_dummy_prefix) and spell spaces as "▁";
//   2. start from one symbol per UTF-8 character;
//   3. repeatedly merge the adjacent pair whose concatenation is a piece of highest score (leftmost
//      pair on ties), until no adjacent pair forms a piece;
//   4. a symbol that is not a piece (a character outside the vocabulary) becomes its bytes' <0xXX>
//      pieces (byte fallback), or <unk> when the vocabulary has no byte pieces.
// run.c rescans all pairs after every merge (quadratic); this keeps candidate pairs in a priority queue
// ordered by (score, leftmost), which picks the same pair at every step in O(n log n).

#include <cmath>
#include <cstdint>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/io/tokenizer.hpp"

namespace qlora::io {

// Token types as GGUF's tokenizer.ggml.token_type stores them (SentencePiece's ModelProto types + 1).
enum class TokenType : std::int32_t {
  undefined = 0,
  normal = 1,
  unknown = 2,
  control = 3,
  user_defined = 4,
  unused = 5,
  byte = 6,
};

// The vocabulary the score merge needs; pieces in SentencePiece form ("▁the", "<0x0A>", "<s>").
struct ScoreMergeVocabulary {
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<TokenType> types;  // one per piece
  std::int32_t bos_id = -1;
  std::int32_t eos_id = -1;
  std::int32_t pad_id = -1;
  std::int32_t unk_id = -1;
  bool add_dummy_prefix = true;
};

inline constexpr std::string_view kSentencePieceSpace = "\xE2\x96\x81";  // U+2581 "▁"

// "<0x4A>" -> 0x4A; anything else -> -1.
inline int parse_byte_piece(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(piece[3]), lo = hex(piece[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

class ScoreMergeTokenizer final : public Tokenizer {
 public:
  // `name` (a path) labels error messages.
  ScoreMergeTokenizer(ScoreMergeVocabulary vocab, const std::string& name) : vocab_(std::move(vocab)) {
    const std::size_t n = vocab_.pieces.size();
    QLORA_CHECK(n > 0, "tokenizer: '" + name + "' has an empty vocabulary");
    QLORA_CHECK(n <= std::size_t(INT32_MAX), "tokenizer: '" + name + "' has too many pieces");
    QLORA_CHECK(vocab_.scores.size() == n && vocab_.types.size() == n,
                "tokenizer: '" + name + "' has " + std::to_string(n) + " pieces but " +
                    std::to_string(vocab_.scores.size()) + " scores and " + std::to_string(vocab_.types.size()) +
                    " token types");
    vocab_size_ = std::int32_t(n);
    for (std::int32_t id : {vocab_.bos_id, vocab_.eos_id, vocab_.pad_id, vocab_.unk_id}) {
      QLORA_CHECK(id >= -1 && id < vocab_size_,
                  "tokenizer: '" + name + "' names special token id " + std::to_string(id) + " outside the vocabulary");
    }
    bos_id_ = vocab_.bos_id;
    eos_id_ = vocab_.eos_id;
    pad_id_ = vocab_.pad_id;
    byte_ids_.assign(256, -1);
    std::vector<SpecialToken> specials;
    for (std::int32_t id = 0; id < vocab_size_; ++id) {
      const std::string& piece = vocab_.pieces[std::size_t(id)];
      QLORA_CHECK(std::isfinite(vocab_.scores[std::size_t(id)]),
                  "tokenizer: '" + name + "' has a non-finite score for token " + std::to_string(id));
      switch (vocab_.types[std::size_t(id)]) {
        case TokenType::normal:
        case TokenType::undefined:
          mergeable_.emplace(piece, id);  // keeps the first of duplicate pieces
          break;
        case TokenType::user_defined:
          if (!piece.empty()) specials.push_back({piece, id, false});
          break;
        case TokenType::unknown:
          if (vocab_.unk_id < 0) vocab_.unk_id = id;  // a vocabulary that types <unk> but does not name it
          [[fallthrough]];
        case TokenType::control:
          if (!piece.empty()) specials.push_back({piece, id, true});
          break;
        case TokenType::byte:
          if (const int b = parse_byte_piece(piece); b >= 0 && byte_ids_[std::size_t(b)] < 0) byte_ids_[std::size_t(b)] = id;
          break;
        case TokenType::unused:
          break;
      }
    }
    set_special_tokens(std::move(specials));
  }

  const ScoreMergeVocabulary& vocabulary() const { return vocab_; }

 protected:
  void encode_ordinary(std::string_view raw, std::vector<std::int32_t>& out) const override {
    if (raw.empty()) return;
    // Step 1: dummy prefix, spaces as "▁".
    std::string text;
    text.reserve(raw.size() + raw.size() / 4 + 3);
    if (vocab_.add_dummy_prefix) text += kSentencePieceSpace;
    for (char c : raw) {
      if (c == ' ') text += kSentencePieceSpace;
      else text += c;
    }

    // Step 2: one symbol per UTF-8 character, in a doubly linked list.
    struct Symbol {
      std::int32_t prev, next;
      std::uint32_t start, length;  // length 0: merged into its left neighbour
    };
    std::vector<Symbol> symbols;
    symbols.reserve(text.size());
    for (std::size_t at = 0; at < text.size();) {
      const std::size_t length = std::min(detail::utf8_length(static_cast<unsigned char>(text[at])), text.size() - at);
      const auto index = std::int32_t(symbols.size());
      symbols.push_back({index - 1, index + 1, std::uint32_t(at), std::uint32_t(length)});
      at += length;
    }
    symbols.back().next = -1;

    // Step 3: merge the best-scoring adjacent pair until none forms a piece.
    struct Candidate {
      float score;
      std::int32_t left, right;
      std::uint32_t length;  // the pair's length when queued: a different length means it went stale
    };
    auto lower_priority = [](const Candidate& a, const Candidate& b) {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower_priority)> queue(lower_priority);
    auto try_pair = [&](std::int32_t left, std::int32_t right) {
      if (left < 0 || right < 0) return;
      const std::uint32_t length = symbols[std::size_t(left)].length + symbols[std::size_t(right)].length;
      const auto id = detail::find_piece(mergeable_, std::string_view(text).substr(symbols[std::size_t(left)].start, length));
      if (id) queue.push({vocab_.scores[std::size_t(*id)], left, right, length});
    };
    for (std::size_t i = 1; i < symbols.size(); ++i) try_pair(std::int32_t(i - 1), std::int32_t(i));
    while (!queue.empty()) {
      const Candidate best = queue.top();
      queue.pop();
      Symbol& left = symbols[std::size_t(best.left)];
      Symbol& right = symbols[std::size_t(best.right)];
      if (left.length == 0 || right.length == 0 || left.length + right.length != best.length) continue;
      left.length += right.length;
      right.length = 0;
      left.next = right.next;
      if (right.next >= 0) symbols[std::size_t(right.next)].prev = best.left;
      try_pair(left.prev, best.left);
      try_pair(best.left, left.next);
    }

    // Step 4: pieces, or byte fallback for characters outside the vocabulary.
    for (std::int32_t i = 0; i >= 0; i = symbols[std::size_t(i)].next) {
      const Symbol& s = symbols[std::size_t(i)];
      const std::string_view piece = std::string_view(text).substr(s.start, s.length);
      if (const auto id = detail::find_piece(mergeable_, piece)) {
        out.push_back(*id);
        continue;
      }
      for (char c : piece) {
        const std::int32_t byte_id = byte_ids_[static_cast<unsigned char>(c)];
        if (byte_id >= 0) {
          out.push_back(byte_id);
        } else {
          QLORA_CHECK(vocab_.unk_id >= 0, "tokenizer: character '" + std::string(piece) +
                                              "' is not in the vocabulary, which has no byte pieces nor <unk>");
          out.push_back(vocab_.unk_id);
          break;
        }
      }
    }
  }

  // SentencePiece's decoding: "▁" -> space, byte pieces -> their byte, control tokens -> nothing,
  // <unk> -> " ⁇ ", and the dummy prefix (leading space of the first piece) dropped.
  std::string decode_checked(std::span<const std::int32_t> ids) const override {
    std::string text;
    bool first = true;
    for (std::int32_t id : ids) {
      const std::string& piece = vocab_.pieces[std::size_t(id)];
      switch (vocab_.types[std::size_t(id)]) {
        case TokenType::control:
          continue;
        case TokenType::unknown:
          text += " \xE2\x81\x87 ";
          break;
        case TokenType::byte:
          if (const int b = parse_byte_piece(piece); b >= 0) text += char(b);
          break;
        default: {
          std::string surface;
          for (std::size_t at = 0; at < piece.size();) {
            if (piece.compare(at, kSentencePieceSpace.size(), kSentencePieceSpace) == 0) {
              surface += ' ';
              at += kSentencePieceSpace.size();
            } else {
              surface += piece[at++];
            }
          }
          if (first && vocab_.add_dummy_prefix && !surface.empty() && surface[0] == ' ') surface.erase(0, 1);
          text += surface;
        }
      }
      first = false;
    }
    return text;
  }

  std::string piece_checked(std::int32_t id) const override { return vocab_.pieces[std::size_t(id)]; }

 private:
  ScoreMergeVocabulary vocab_;
  detail::PieceToId mergeable_;        // normal pieces: what merges may produce
  std::vector<std::int32_t> byte_ids_;  // byte -> its <0xXX> piece, or -1
};

}  // namespace qlora::io
