// SentencePiece models through libsentencepiece: llama.cpp's Llama 2 vectors, tricky strings, BOS/EOS,
// special tokens, decode, and bad files.

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "io/tokenizer_test_vectors.hpp"
#include "qlora/io/tokenizer_sentencepiece.hpp"

namespace {

using qlora::io::SentencePieceTokenizer;
using Ids = std::vector<std::int32_t>;

// Golden ids of Meta's Llama 2 tokenizer.model, from the Python sentencepiece package 0.2.3
// (`SentencePieceProcessor(model_file=...).encode(text)`), a different build and version than the
// libsentencepiece 0.1.97 this test links; script in docs/tokenizers.md ("Reference ids").
struct Tricky {
  std::string text;
  Ids ids;
};
const std::vector<Tricky>& llama2_tricky() {
  static const std::vector<Tricky> cases = {
      {"Numbers: 1234567 and 3.14159, 2024-01-01",
       {11848, 2596, 29901, 29871, 29896, 29906, 29941, 29946, 29945, 29953, 29955, 322, 29871, 29941, 29889, 29896,
        29946, 29896, 29945, 29929, 29892, 29871, 29906, 29900, 29906, 29946, 29899, 29900, 29896, 29899, 29900, 29896}},
      {"Tabs\tand\r\nCRLF\n\n\nthree newlines", {323, 6897, 12, 392, 30004, 13, 29907, 2241, 29943, 13, 13, 13, 17536, 716, 9012}},
      {"\xC3\x89moji \xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7 flags \xF0\x9F\x87\xAB\xF0\x9F\x87\xB7 and "
       "\xE2\x80\x98quotes\xE2\x80\x99 \xE2\x80\x94 dash",
       {3067, 4346, 2397, 29871, 243, 162, 148, 172, 30722, 243, 162, 148, 172, 30722, 243, 162, 148, 170, 13449, 29871,
        243, 162, 138, 174, 243, 162, 138, 186, 322, 5129, 339, 4769, 30010, 813, 12569}},
      {"\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9\xE3\x83\x88\xE3\x81\xA8\xED\x95\x9C"
       "\xEA\xB5\xAD\xEC\x96\xB4 and \xCE\x95\xCE\xBB\xCE\xBB\xCE\xB7\xCE\xBD\xCE\xB9\xCE\xBA\xCE\xAC",
       {29871, 30325, 30346, 30968, 30199, 30572, 30454, 30255, 30279, 30364, 30877, 31293, 31129, 322, 29871, 30311, 30142,
        30142, 30183, 30133, 30136, 30173, 30216}},
      {"     leading spaces and trailing   ", {418, 8236, 8162, 322, 25053, 1678}},
      {"don't I'LL we'Re", {1016, 29915, 29873, 306, 29915, 2208, 591, 29915, 1123}},
      {"e\xCC\x81 a\xCC\x80", {321, 30103, 263, 30712}},  // combining accents
      {"<|begin_of_text|>Hello<|eot_id|>",
       {529, 29989, 463, 29918, 974, 29918, 726, 29989, 29958, 10994, 29966, 29989, 29872, 327, 29918, 333, 29989, 29958}},
  };
  return cases;
}

}  // namespace

TEST_CASE("SentencePiece: Llama 2 tokenizer.model reproduces llama.cpp's SPM test vectors") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = SentencePieceTokenizer::from_file((data / "tokenizers/llama2/tokenizer.model").string());
  const auto vectors = qlora::test::read_llamacpp_vectors(data / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-spm.gguf");
  REQUIRE(vectors.size() == 46);
  qlora::test::check_vectors(vectors, [&](const std::string& text) { return tokenizer->encode(text); });
  for (const auto& v : vectors) {
    INFO("text: \"" << v.text << "\"");
    CHECK(tokenizer->decode(v.ids) == v.text);
  }
}

TEST_CASE("SentencePiece: tricky strings match the Python sentencepiece package") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = SentencePieceTokenizer::from_file((data / "tokenizers/llama2/tokenizer.model").string());
  for (const Tricky& t : llama2_tricky()) {
    INFO("text: \"" << t.text << "\"");
    CHECK(tokenizer->encode(t.text) == t.ids);
    CHECK(tokenizer->decode(t.ids) == t.text);
  }
}

TEST_CASE("SentencePiece: BOS, EOS, special tokens and pieces of Llama 2") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = SentencePieceTokenizer::from_file((data / "tokenizers/llama2/tokenizer.model").string());
  CHECK(tokenizer->vocab_size() == 32000);
  CHECK(tokenizer->bos_id() == 1);
  CHECK(tokenizer->eos_id() == 2);
  CHECK(tokenizer->pad_id() == -1);
  CHECK(tokenizer->special_token_id("<s>") == 1);
  CHECK(tokenizer->special_token_id("</s>") == 2);
  CHECK_FALSE(tokenizer->special_token_id("<|eot_id|>").has_value());
  // "Hello world" -> 15043 3186 (llama.cpp's vectors); BOS/EOS around it.
  CHECK(tokenizer->encode("Hello world", true, true) == Ids{1, 15043, 3186, 2});
  CHECK(tokenizer->decode(Ids{1, 15043, 3186, 2}) == "Hello world");
  CHECK(tokenizer->token_to_piece(15043) == "\xE2\x96\x81Hello");
  CHECK(tokenizer->token_to_piece(13) == "<0x0A>");
  // "<s>" is text unless special tokens are allowed; allowed, it is BOS and the rest is encoded alone.
  const Ids as_text = tokenizer->encode("<s>Hello");
  CHECK(as_text.front() != 1);
  Ids expected{1};
  for (auto id : tokenizer->encode("Hello")) expected.push_back(id);
  CHECK(tokenizer->encode("<s>Hello", false, false, true) == expected);
}

TEST_CASE("SentencePiece: bad files and ids are refused with a message naming them") {
  qlora::test::TempDir dir;
  const std::string missing = (dir / "no-such-tokenizer.model").string();
  qlora::test::check_names(qlora::test::error_of([&] { SentencePieceTokenizer::from_file(missing); }), {missing});
  const std::string garbage = (dir / "garbage.model").string();
  qlora::test::write_raw(garbage, "this is not a protobuf \x01\x02\x03\xff\xfe");
  qlora::test::check_names(qlora::test::error_of([&] { SentencePieceTokenizer::from_file(garbage); }),
                           {garbage, "not a SentencePiece model"});

  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = SentencePieceTokenizer::from_file((data / "models/stories260K/tok512.model").string());
  CHECK(tokenizer->vocab_size() == 512);
  qlora::test::check_names(qlora::test::error_of([&] { tokenizer->decode(Ids{5, 512}); }), {"512", "out of range"});
  qlora::test::check_names(qlora::test::error_of([&] { tokenizer->decode(Ids{-1}); }), {"-1", "out of range"});
  qlora::test::check_names(qlora::test::error_of([&] { tokenizer->token_to_piece(600); }), {"600"});
}

TEST_CASE("SentencePiece: a model loads from its serialized bytes as from its file") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const std::string path = (data / "models/stories260K/tok512.model").string();
  const auto from_file = SentencePieceTokenizer::from_file(path);
  const auto from_bytes = SentencePieceTokenizer::from_serialized(qlora::io::detail::read_tokenizer_file(path));
  const std::string text = "Once upon a time, there was a little girl named Lily.";
  const Ids ids = from_file->encode(text);
  CHECK(ids.size() > 5);
  CHECK(from_bytes->encode(text) == ids);
  CHECK(from_bytes->decode(ids) == text);
}
