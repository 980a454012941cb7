#pragma once
// Helpers of the tokenizer tests: where ../shared/data is, and llama.cpp's tokenizer test vectors.
//
// The vectors (shared/data/tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-{spm,bpe}.gguf.inp/.out,
// from llama.cpp's models/ folder) were written by llama.cpp's convert_hf_to_gguf_update.py: every
// text followed by the line "__ggml_vocab_test__" in .inp, and on the matching line of .out the ids
// of Hugging Face's `tokenizer.encode(text, add_special_tokens=False)` (so: no BOS; for Llama 2 the
// SentencePiece dummy-prefix space is still added). llama.cpp's tests/test-tokenizer-0.cpp splits .inp
// on "\n__ggml_vocab_test__\n" and tokenizes each text without special tokens, as done here.

#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/io/tokenizer.hpp"
#include "support/shared_data.hpp"

namespace qlora::test {

// ../shared/data when it is present; tests MESSAGE and return when not.
inline std::optional<std::filesystem::path> shared_data() {
  if (!kSharedData.empty() && std::filesystem::is_directory(kSharedData / "tokenizers")) return kSharedData;
  return std::nullopt;
}

#define QLORA_REQUIRE_SHARED_DATA(var)                                          \
  const auto var##_opt = ::qlora::test::shared_data();                          \
  if (!var##_opt) {                                                             \
    MESSAGE("skipped: ../shared/data (QLORA_SHARED_DATA) is absent");           \
    return;                                                                     \
  }                                                                             \
  const std::filesystem::path& var = *var##_opt

struct TokenizerVector {
  std::string text;
  std::vector<std::int32_t> ids;
};

// `stem`: e.g. ".../ggml-vocab-llama-spm.gguf" (reads stem + ".inp" and stem + ".out").
inline std::vector<TokenizerVector> read_llamacpp_vectors(const std::filesystem::path& stem) {
  const std::string inp = io::detail::read_tokenizer_file(stem.string() + ".inp");
  const std::string out = io::detail::read_tokenizer_file(stem.string() + ".out");
  const std::string separator = "\n__ggml_vocab_test__\n";
  std::vector<TokenizerVector> vectors;
  for (std::size_t at = 0; at < inp.size();) {
    const std::size_t end = inp.find(separator, at);
    REQUIRE(end != std::string::npos);  // every text is followed by a separator
    vectors.push_back({inp.substr(at, end - at), {}});
    at = end + separator.size();
  }
  std::istringstream lines(out);
  std::string line;
  std::size_t index = 0;
  while (std::getline(lines, line)) {
    REQUIRE(index < vectors.size());
    std::istringstream numbers(line);
    for (std::int32_t id; numbers >> id;) vectors[index].ids.push_back(id);
    ++index;
  }
  REQUIRE(index == vectors.size());
  return vectors;
}

// Checks every vector, naming the failing text.
template <class Encode>
void check_vectors(const std::vector<TokenizerVector>& vectors, Encode encode) {
  for (const TokenizerVector& v : vectors) {
    INFO("text: \"" << v.text << "\"");
    CHECK(encode(v.text) == v.ids);
  }
}

}  // namespace qlora::test
