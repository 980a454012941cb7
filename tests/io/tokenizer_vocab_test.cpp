// Tokenizers from GGUF-embedded vocabularies: llama.cpp's Llama 2 vocab-only GGUF ("llama": score merge)
// read by a minimal metadata parser local to this test, and a "gpt2" vocabulary built from the
// Hugging Face fixture (checked against Hugging Face tokenizers' ids).

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "io/tokenizer_test_vectors.hpp"
#include "qlora/io/tokenizer_vocab.hpp"

namespace {

using namespace qlora::io;
using Ids = std::vector<std::int32_t>;

// A GGUF metadata value, reduced to what a vocabulary needs: numbers and strings, scalar or array.
struct MetaValue {
  std::vector<std::string> strings;
  std::vector<double> numbers;
};

// Minimal GGUF v3 metadata reader (header, then key/value pairs; tensors are not needed): an
// independent second reading of the format, so this test does not rest on io/gguf.hpp.
std::map<std::string, MetaValue> read_gguf_metadata(const std::string& bytes) {
  std::size_t at = 0;
  auto take = [&](std::size_t n) {
    REQUIRE(at + n <= bytes.size());
    const char* p = bytes.data() + at;
    at += n;
    return p;
  };
  auto u32 = [&] { std::uint32_t v; std::memcpy(&v, take(4), 4); return v; };
  auto u64 = [&] { std::uint64_t v; std::memcpy(&v, take(8), 8); return v; };
  auto str = [&] { const std::uint64_t n = u64(); return std::string(take(n), n); };
  REQUIRE(std::string(take(4), 4) == "GGUF");
  REQUIRE(u32() == 3);
  u64();  // tensor count
  const std::uint64_t kv_count = u64();
  std::map<std::string, MetaValue> meta;
  // Scalar sizes by GGUF type: u8 i8 u16 i16 u32 i32 f32 bool string array u64 i64 f64.
  auto read_scalar = [&](std::uint32_t type, MetaValue& out) {
    switch (type) {
      case 0: out.numbers.push_back(double(std::uint8_t(*take(1)))); break;
      case 1: out.numbers.push_back(double(std::int8_t(*take(1)))); break;
      case 4: out.numbers.push_back(double(u32())); break;
      case 5: { std::int32_t v; std::memcpy(&v, take(4), 4); out.numbers.push_back(v); break; }
      case 6: { float v; std::memcpy(&v, take(4), 4); out.numbers.push_back(v); break; }
      case 7: out.numbers.push_back(double(*take(1) != 0)); break;
      case 8: out.strings.push_back(str()); break;
      case 10: out.numbers.push_back(double(u64())); break;
      default: FAIL("GGUF type " << type << " not handled by the test reader");
    }
  };
  for (std::uint64_t i = 0; i < kv_count; ++i) {
    const std::string key = str();
    const std::uint32_t type = u32();
    MetaValue value;
    if (type == 9) {
      const std::uint32_t element = u32();
      const std::uint64_t count = u64();
      for (std::uint64_t k = 0; k < count; ++k) read_scalar(element, value);
    } else {
      read_scalar(type, value);
    }
    meta.emplace(key, std::move(value));
  }
  return meta;
}

EmbeddedVocabulary vocabulary_from_gguf(const std::string& path) {
  const auto meta = read_gguf_metadata(detail::read_tokenizer_file(path));
  EmbeddedVocabulary v;
  v.model = meta.at("tokenizer.ggml.model").strings.at(0);
  v.tokens = meta.at("tokenizer.ggml.tokens").strings;
  for (double s : meta.at("tokenizer.ggml.scores").numbers) v.scores.push_back(float(s));
  for (double t : meta.at("tokenizer.ggml.token_type").numbers) v.token_types.push_back(std::int32_t(t));
  v.bos_id = std::int32_t(meta.at("tokenizer.ggml.bos_token_id").numbers.at(0));
  v.eos_id = std::int32_t(meta.at("tokenizer.ggml.eos_token_id").numbers.at(0));
  v.unk_id = std::int32_t(meta.at("tokenizer.ggml.unknown_token_id").numbers.at(0));
  return v;
}

}  // namespace

TEST_CASE("vocab: llama.cpp's Llama 2 vocab-only GGUF reproduces llama.cpp's SPM test vectors") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const std::string path = (data / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-spm.gguf").string();
  const EmbeddedVocabulary vocab = vocabulary_from_gguf(path);
  CHECK(vocab.model == "llama");
  CHECK(vocab.tokens.size() == 32000);
  const auto tokenizer = make_vocabulary_tokenizer(vocab, path);
  CHECK(tokenizer->bos_id() == 1);
  CHECK(tokenizer->eos_id() == 2);
  const auto vectors = qlora::test::read_llamacpp_vectors(data / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-spm.gguf");
  REQUIRE(vectors.size() == 46);
  qlora::test::check_vectors(vectors, [&](const std::string& text) { return tokenizer->encode(text); });
  for (const auto& v : vectors) {
    INFO("text: \"" << v.text << "\"");
    CHECK(tokenizer->decode(v.ids) == v.text);
  }
  CHECK(tokenizer->encode("Hello world", true, true) == Ids{1, 15043, 3186, 2});
  CHECK(tokenizer->encode("</s>", false, false, true) == Ids{2});
  CHECK(tokenizer->token_to_piece(15043) == "\xE2\x96\x81Hello");
}

// The same tokens, merges and special tokens as tests/io/tokenizer_tiny_bpe.json, laid out as a GGUF
// "gpt2" vocabulary (tokens in GPT-2's alphabet, "left right" merges, control types, pre "smollm" =
// Digits + GPT-2 regex as that file's pre-tokenizer). Golden ids: Hugging Face tokenizers 0.23.3 on the
// JSON (see tokenizer_bpe_test.cpp).
TEST_CASE("vocab: a gpt2 vocabulary matches Hugging Face tokenizers") {
  const auto json = nlohmann::json::parse(
      detail::read_tokenizer_file((std::filesystem::path(__FILE__).parent_path() / "tokenizer_tiny_bpe.json").string()));
  EmbeddedVocabulary vocab;
  vocab.model = "gpt2";
  vocab.pre = "smollm";
  const auto& entries = json["model"]["vocab"];
  vocab.tokens.resize(entries.size());
  vocab.token_types.assign(entries.size(), std::int32_t(TokenType::normal));
  for (const auto& [token, id] : entries.items()) vocab.tokens.at(id.get<std::size_t>()) = token;
  for (const auto& added : json["added_tokens"]) vocab.token_types.at(added["id"].get<std::size_t>()) = std::int32_t(TokenType::control);
  for (const auto& merge : json["model"]["merges"]) vocab.merges.push_back(merge[0].get<std::string>() + " " + merge[1].get<std::string>());
  vocab.eos_id = 0;
  const auto tokenizer = make_vocabulary_tokenizer(vocab, "tiny-gpt2");
  CHECK(tokenizer->encode("The tower is 330 metres tall, 2024 .") ==
        Ids{53, 259, 294, 88, 263, 467, 222, 20, 20, 17, 548, 413, 258, 440, 13, 222, 19, 17, 19, 21, 272});
  CHECK(tokenizer->encode("  double  spaces\tand\ttabs\n\nnew lines ") ==
        Ids{222, 296, 298, 67, 301, 222, 268, 81, 311, 279, 199, 399, 199, 85, 511, 84, 200, 200, 79, 468, 303, 473, 222});
  CHECK(tokenizer->encode("<|im_start|>user said <|endoftext|>", false, false, true) == Ids{1, 381, 263, 268, 66, 343, 222, 0});
  CHECK(tokenizer->encode("don't STOP'd we'll") == Ids{69, 264, 8, 85, 329, 53, 48, 49, 8, 69, 527, 8, 353});
  CHECK(tokenizer->decode(Ids{53, 259, 294, 88, 263, 467, 222, 20, 20, 17, 548, 413, 258, 440, 13, 222, 19, 17, 19, 21, 272, 0}) ==
        "The tower is 330 metres tall, 2024 .<|endoftext|>");
}

TEST_CASE("vocab: inconsistent vocabularies are refused with a message") {
  EmbeddedVocabulary v;
  v.model = "llama";
  v.tokens = {"<unk>", "<s>", "</s>", "\xE2\x96\x81" "a"};
  v.scores = {0, 0, 0};
  qlora::test::check_names(qlora::test::error_of([&] { make_vocabulary_tokenizer(v, "bad.gguf"); }),
                           {"bad.gguf", "4 tokens", "3 scores"});
  v.scores = {0, 0, 0, std::numeric_limits<float>::quiet_NaN()};
  qlora::test::check_names(qlora::test::error_of([&] { make_vocabulary_tokenizer(v, "bad.gguf"); }),
                           {"bad.gguf", "non-finite", "token 3"});
  v.scores = {0, 0, 0, -1};
  v.token_types = {2, 3, 3, 9};
  qlora::test::check_names(qlora::test::error_of([&] { make_vocabulary_tokenizer(v, "bad.gguf"); }),
                           {"bad.gguf", "token type 9"});
  v.token_types = {2, 3, 3, 1};
  v.model = "bert";
  qlora::test::check_names(qlora::test::error_of([&] { make_vocabulary_tokenizer(v, "bad.gguf"); }), {"bad.gguf", "bert"});
  v.model = "gpt2";
  v.pre = "qwen2";
  qlora::test::check_names(qlora::test::error_of([&] { make_vocabulary_tokenizer(v, "bad.gguf"); }), {"bad.gguf", "qwen2"});
  v.model = "llama";
  v.bos_id = 7;
  qlora::test::check_names(qlora::test::error_of([&] { make_vocabulary_tokenizer(v, "bad.gguf"); }), {"bad.gguf", "7"});
  v.bos_id = 1;
  const auto ok = make_vocabulary_tokenizer(v, "ok.gguf");
  // "▁" and "b" have no piece and the vocabulary no byte pieces: <unk> (id 0) for each.
  CHECK(ok->encode("a b") == Ids{3, 0, 0});
  CHECK(ok->encode("a a") == Ids{3, 3});
  v.token_types = {1, 3, 3, 1};  // no <unk> either
  qlora::test::check_names(qlora::test::error_of([&] { make_vocabulary_tokenizer(v, "ok.gguf")->encode("a b"); }),
                           {"not in the vocabulary"});
}
