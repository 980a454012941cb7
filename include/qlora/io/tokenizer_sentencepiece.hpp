#pragma once
// SentencePiece models (`tokenizer.model` of Llama 1/2, TinyLlama, llama2.c's tok512.model) through
// libsentencepiece itself: normalization, the dummy prefix and byte fallback are the library's own.

#include <sentencepiece_processor.h>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/io/tokenizer.hpp"

namespace qlora::io {

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // From a `.model` file (a serialized ModelProto).
  static std::unique_ptr<SentencePieceTokenizer> from_file(const std::string& path) {
    return from_serialized(detail::read_tokenizer_file(path), path);
  }

  // From the bytes of a `.model` file; `name` only labels error messages.
  static std::unique_ptr<SentencePieceTokenizer> from_serialized(std::string_view bytes,
                                                                 const std::string& name = "<memory>") {
    auto tokenizer = std::unique_ptr<SentencePieceTokenizer>(new SentencePieceTokenizer());
    const auto status = tokenizer->processor_.LoadFromSerializedProto(bytes);
    QLORA_CHECK(status.ok(), "tokenizer: '" + name + "' is not a SentencePiece model (" + status.ToString() + ")");
    tokenizer->init();
    return tokenizer;
  }

  const sentencepiece::SentencePieceProcessor& processor() const { return processor_; }

 protected:
  void encode_ordinary(std::string_view text, std::vector<std::int32_t>& out) const override {
    std::vector<int> ids;
    const auto status = processor_.Encode(text, &ids);
    QLORA_CHECK(status.ok(), "tokenizer: SentencePiece failed to encode text (" + status.ToString() + ")");
    out.insert(out.end(), ids.begin(), ids.end());
  }

  std::string decode_checked(std::span<const std::int32_t> ids) const override {
    std::string text;
    const auto status = processor_.Decode(std::vector<int>(ids.begin(), ids.end()), &text);
    QLORA_CHECK(status.ok(), "tokenizer: SentencePiece failed to decode ids (" + status.ToString() + ")");
    return text;
  }

  std::string piece_checked(std::int32_t id) const override { return processor_.IdToPiece(id); }

 private:
  SentencePieceTokenizer() = default;

  void init() {
    vocab_size_ = processor_.GetPieceSize();
    bos_id_ = processor_.bos_id();
    eos_id_ = processor_.eos_id();
    pad_id_ = processor_.pad_id();
    // Control pieces (<s>, </s>) and <unk> are matched in text only when allowed, as Hugging Face's
    // LlamaTokenizer does; SentencePiece itself never produces them from text.
    std::vector<SpecialToken> specials;
    for (int id = 0; id < vocab_size_; ++id) {
      if (processor_.IsControl(id) || processor_.IsUnknown(id)) {
        specials.push_back({processor_.IdToPiece(id), id, true});
      }
    }
    set_special_tokens(std::move(specials));
  }

  sentencepiece::SentencePieceProcessor processor_;
};

}  // namespace qlora::io
