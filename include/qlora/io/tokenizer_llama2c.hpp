#pragma once
// llama2.c's `tokenizer.bin` (written by llama2.c's tokenizer.py `export`):
//   int32 max_token_length; then per token: float32 score, int32 byte length, the bytes.
// The file has no token count (run.c takes it from the checkpoint), so the pieces run to the end of
// the file; pass the checkpoint's vocab_size to have it checked. Pieces are stored with "▁" written as
// a space and BOS/EOS as "\n<s>\n" / "\n</s>\n"; they are turned back into SentencePiece form and run
// through the score merge of tokenizer_score_merge.hpp, which is run.c's `encode` algorithm
// (BOS = 1, EOS = 2, as run.c assumes).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "qlora/io/tokenizer.hpp"
#include "qlora/io/tokenizer_score_merge.hpp"

namespace qlora::io {

// The vocabulary of a tokenizer.bin held in `bytes`; `name` labels error messages.
inline ScoreMergeVocabulary parse_llama2c_tokenizer(std::string_view bytes, const std::string& name,
                                                    std::optional<std::int32_t> expected_vocab_size = std::nullopt) {
  std::size_t at = 0;
  auto read_i32 = [&](std::int32_t& value) {
    if (bytes.size() - at < 4) return false;
    std::memcpy(&value, bytes.data() + at, 4);
    at += 4;
    return true;
  };
  std::int32_t max_token_length = 0;
  QLORA_CHECK(read_i32(max_token_length), "tokenizer: '" + name + "' is too short for a llama2.c tokenizer.bin");
  QLORA_CHECK(max_token_length > 0 && max_token_length <= 4096,
              "tokenizer: '" + name + "' is not a llama2.c tokenizer.bin (max_token_length " +
                  std::to_string(max_token_length) + ")");
  ScoreMergeVocabulary vocab;
  while (at < bytes.size()) {
    const std::string token = "tokenizer: '" + name + "' token " + std::to_string(vocab.pieces.size());
    float score = 0;
    std::int32_t length = 0;
    QLORA_CHECK(bytes.size() - at >= 8, token + " is truncated (file ends inside its header)");
    std::memcpy(&score, bytes.data() + at, 4);
    at += 4;
    read_i32(length);
    QLORA_CHECK(length >= 0 && length <= max_token_length,
                token + " has length " + std::to_string(length) + " outside [0, max_token_length " +
                    std::to_string(max_token_length) + "]: the file is corrupted");
    QLORA_CHECK(bytes.size() - at >= std::size_t(length), token + " is truncated (file ends inside its bytes)");
    QLORA_CHECK(std::isfinite(score), token + " has a non-finite score");
    std::string stored(bytes.substr(at, std::size_t(length)));
    at += std::size_t(length);

    const auto id = std::int32_t(vocab.pieces.size());
    TokenType type = TokenType::normal;
    std::string piece;
    if (id == 1 && stored == "\n<s>\n") {
      piece = "<s>", type = TokenType::control;
    } else if (id == 2 && stored == "\n</s>\n") {
      piece = "</s>", type = TokenType::control;
    } else if (id == 0 && stored == "<unk>") {
      piece = stored, type = TokenType::unknown;
    } else if (parse_byte_piece(stored) >= 0) {
      piece = stored, type = TokenType::byte;
    } else {
      for (char c : stored) {
        if (c == ' ') piece += kSentencePieceSpace;
        else piece += c;
      }
    }
    vocab.pieces.push_back(std::move(piece));
    vocab.scores.push_back(score);
    vocab.types.push_back(type);
  }
  const auto n = std::int32_t(vocab.pieces.size());
  QLORA_CHECK(n >= 3, "tokenizer: '" + name + "' holds " + std::to_string(n) + " tokens, fewer than <unk>, <s>, </s>");
  if (expected_vocab_size) {
    QLORA_CHECK(n == *expected_vocab_size, "tokenizer: '" + name + "' holds " + std::to_string(n) +
                                               " tokens but the checkpoint's vocab_size is " +
                                               std::to_string(*expected_vocab_size));
  }
  vocab.unk_id = vocab.types[0] == TokenType::unknown ? 0 : -1;
  vocab.bos_id = 1;
  vocab.eos_id = 2;
  vocab.add_dummy_prefix = true;
  return vocab;
}

inline std::unique_ptr<ScoreMergeTokenizer> load_llama2c_tokenizer(
    const std::string& path, std::optional<std::int32_t> expected_vocab_size = std::nullopt) {
  return std::make_unique<ScoreMergeTokenizer>(
      parse_llama2c_tokenizer(detail::read_tokenizer_file(path), path, expected_vocab_size), path);
}

}  // namespace qlora::io
