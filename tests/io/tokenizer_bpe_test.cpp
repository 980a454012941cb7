// Byte-level BPE: Meta's Llama 3 tiktoken file against llama.cpp's vectors and tiktoken itself, special
// tokens, and Hugging Face tokenizer.json against Hugging Face tokenizers on a small trained model.

#include <doctest/doctest.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "io/tokenizer_test_vectors.hpp"
#include "qlora/io/tokenizer_bpe.hpp"
#include "qlora/io/tokenizer_hf_json.hpp"
#include "qlora/io/tokenizer_tiktoken.hpp"

namespace {

using namespace qlora::io;
using Ids = std::vector<std::int32_t>;

std::unique_ptr<BpeTokenizer> llama3(const std::filesystem::path& data) {
  HfSpecialTokens config = read_hf_tokenizer_config((data / "tokenizers/llama3/tokenizer_config.json").string());
  TiktokenOptions options;
  options.special_tokens = std::move(config.tokens);
  options.bos_id = config.bos_id, options.eos_id = config.eos_id, options.pad_id = config.pad_id;
  return load_tiktoken_tokenizer((data / "tokenizers/llama3/tokenizer.model").string(), std::move(options));
}

// tests/io/tokenizer_tiny_bpe.json: a 600-token byte-level BPE trained with Hugging Face tokenizers
// 0.23.3 on the first 400 lines of WikiText-2 test (pre-tokenizer Digits(individual) + ByteLevel(regex),
// as SmolLM's), special tokens <|endoftext|> = 0 and <|im_start|> = 1; script in docs/tokenizers.md.
std::filesystem::path tiny_bpe_json() { return std::filesystem::path(__FILE__).parent_path() / "tokenizer_tiny_bpe.json"; }

struct Tricky {
  std::string text;
  Ids ids;          // special tokens encoded as text
  Ids ids_special;  // special tokens allowed
};

}  // namespace

TEST_CASE("BPE: Llama 3 tiktoken tokenizer.model reproduces llama.cpp's BPE test vectors") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = llama3(data);
  CHECK(tokenizer->vocab_size() == 128256);
  const auto vectors = qlora::test::read_llamacpp_vectors(data / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-bpe.gguf");
  REQUIRE(vectors.size() == 46);
  qlora::test::check_vectors(vectors, [&](const std::string& text) { return tokenizer->encode(text); });
  for (const auto& v : vectors) {
    INFO("text: \"" << v.text << "\"");
    CHECK(tokenizer->decode(v.ids) == v.text);
  }
}

// Golden ids from tiktoken 0.14.0 with Meta's pat_str, this tokenizer.model and the special tokens of
// tokenizer_config.json: enc.encode(text, disallowed_special=()) and enc.encode(text, allowed_special="all").
TEST_CASE("BPE: Llama 3 tricky strings and special tokens match tiktoken") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = llama3(data);
  const std::vector<Tricky> cases = {
      {"<|begin_of_text|>Hello<|eot_id|>",
       {27, 91, 7413, 3659, 4424, 91, 29, 9906, 27, 91, 68, 354, 851, 91, 29},
       {128000, 9906, 128009}},
      {"Numbers: 1234567 and 3.14159, 2024-01-01",
       {28336, 25, 220, 4513, 10961, 22, 323, 220, 18, 13, 9335, 2946, 11, 220, 2366, 19, 12, 1721, 12, 1721}, {}},
      {"Tabs\tand\r\nCRLF\n\n\nthree newlines", {38085, 53577, 319, 34, 81758, 1432, 28956, 502, 8128}, {}},
      {"\xC3\x89moji \xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7 flags \xF0\x9F\x87\xAB\xF0\x9F\x87\xB7 and "
       "\xE2\x80\x98quotes\xE2\x80\x99 \xE2\x80\x94 dash",
       {27887, 6489, 7910, 62904, 102, 102470, 9468, 239, 102, 102470, 9468, 239, 100, 8202, 11410, 229, 104, 9468, 229, 115,
        323, 3451, 54382, 529, 2001, 24858},
       {}},
      {"\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9\xE3\x83\x88\xE3\x81\xA8\xED\x95\x9C"
       "\xEA\xB5\xAD\xEC\x96\xB4 and \xCE\x95\xCE\xBB\xCE\xBB\xCE\xB7\xCE\xBD\xCE\xB9\xCE\xBA\xCE\xAC",
       {102433, 102158, 16144, 57933, 62903, 71634, 19732, 112699, 32179, 323, 121029, 102434}, {}},
      {"     leading spaces and trailing   ", {257, 6522, 12908, 323, 28848, 262}, {}},
      {"don't I'LL we'Re", {15357, 956, 358, 6, 4178, 584, 50527}, {}},
      {"e\xCC\x81 a\xCC\x80", {68, 54939, 264, 97649}, {}},  // combining accents
  };
  for (const Tricky& t : cases) {
    INFO("text: \"" << t.text << "\"");
    CHECK(tokenizer->encode(t.text) == t.ids);
    CHECK(tokenizer->encode(t.text, false, false, true) == (t.ids_special.empty() ? t.ids : t.ids_special));
    CHECK(tokenizer->decode(t.ids) == t.text);
  }
  CHECK(tokenizer->decode(Ids{128000, 9906, 128009}) == "<|begin_of_text|>Hello<|eot_id|>");
  CHECK(tokenizer->encode("Hello", true, true) == Ids{128000, 9906, 128001});
  CHECK(tokenizer->bos_id() == 128000);
  CHECK(tokenizer->eos_id() == 128001);
  CHECK(tokenizer->pad_id() == 128001);  // tokenizer_config.json: pad_token <|end_of_text|>
  CHECK(tokenizer->special_token_id("<|eot_id|>") == 128009);
  CHECK(tokenizer->special_token_id("<|start_header_id|>") == 128006);
  CHECK(tokenizer->token_to_piece(9906) == "Hello");
}

TEST_CASE("BPE: Meta's Llama 3 special token list equals tokenizer_config.json") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const HfSpecialTokens config = read_hf_tokenizer_config((data / "tokenizers/llama3/tokenizer_config.json").string());
  const std::vector<SpecialToken> meta = llama3_special_tokens(128000);
  REQUIRE(config.tokens.size() == 256);
  REQUIRE(meta.size() == 256);
  for (std::size_t i = 0; i < meta.size(); ++i) {
    INFO("id " << meta[i].id);
    CHECK(config.tokens[i].id == meta[i].id);
    CHECK(config.tokens[i].text == meta[i].text);
  }
}

TEST_CASE("BPE: Llama 3 round-trips the WikiText-2 test split") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = llama3(data);
  const std::string wiki = qlora::io::detail::read_tokenizer_file((data / "text/wikitext-2-raw/wiki.test.raw").string());
  const Ids ids = tokenizer->encode(wiki);
  CHECK(ids.size() > 250000);  // about 4.5 bytes per token on English text
  CHECK(ids.size() < 330000);
  CHECK(tokenizer->decode(ids) == wiki);
}

// Golden ids from Hugging Face tokenizers 0.23.3: Tokenizer.from_file(...).encode(text,
// add_special_tokens=False).ids, and with tok.encode_special_tokens = True for "as text".
TEST_CASE("BPE: tokenizer.json matches Hugging Face tokenizers on a trained byte-level model") {
  HfSpecialTokens config;
  config.eos_id = 0;
  const auto tokenizer = load_hf_tokenizer_json(tiny_bpe_json().string(), &config);
  CHECK(tokenizer->vocab_size() == 600);
  const std::vector<Tricky> cases = {
      {"The tower is 330 metres tall, 2024 .",
       {53, 259, 294, 88, 263, 467, 222, 20, 20, 17, 548, 413, 258, 440, 13, 222, 19, 17, 19, 21, 272}, {}},
      {"  double  spaces\tand\ttabs\n\nnew lines ",
       {222, 296, 298, 67, 301, 222, 268, 81, 311, 279, 199, 399, 199, 85, 511, 84, 200, 200, 79, 468, 303, 473, 222}, {}},
      {"Caf\xC3\xA9 na\xC3\xAFve \xE2\x80\x94 \xE6\x97\xA5\xE6\x9C\xAC \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD!",
       {36, 66, 71, 129, 104, 321, 66, 129, 109, 87, 70, 564, 244, 222, 164, 247, 100, 164, 252, 107, 222, 174, 255, 241, 237,
        174, 255, 239, 123, 2},
       {}},
      {"<|im_start|>user said <|endoftext|>",
       {29, 93, 336, 64, 325, 520, 93, 31, 381, 263, 268, 66, 343, 222, 29, 93, 70, 274, 80, 71, 537, 89, 85, 93, 31},
       {1, 381, 263, 268, 66, 343, 222, 0}},
      {"don't STOP'd we'll", {69, 264, 8, 85, 329, 53, 48, 49, 8, 69, 527, 8, 353}, {}},
  };
  for (const Tricky& t : cases) {
    INFO("text: \"" << t.text << "\"");
    CHECK(tokenizer->encode(t.text) == t.ids);
    CHECK(tokenizer->encode(t.text, false, false, true) == (t.ids_special.empty() ? t.ids : t.ids_special));
    CHECK(tokenizer->decode(t.ids) == t.text);
  }
  CHECK(tokenizer->encode("a", false, true).back() == 0);
  CHECK(tokenizer->special_token_id("<|im_start|>") == 1);

  // Merges written as "left right" strings (the older tokenizer.json layout) give the same tokenizer.
  nlohmann::json json = nlohmann::json::parse(qlora::io::detail::read_tokenizer_file(tiny_bpe_json().string()));
  for (auto& merge : json["model"]["merges"]) merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  qlora::test::TempDir dir;
  const std::string old_layout = (dir / "tokenizer.json").string();
  qlora::test::write_raw(old_layout, json.dump());
  const auto same = load_hf_tokenizer_json(old_layout);
  for (const Tricky& t : cases) CHECK(same->encode(t.text) == t.ids);
}

TEST_CASE("BPE: bad tokenizer files and text are refused with a message naming them") {
  qlora::test::TempDir dir;
  const std::string missing = (dir / "tokenizer.json").string();
  qlora::test::check_names(qlora::test::error_of([&] { load_hf_tokenizer_json(missing); }), {missing, "cannot open"});
  const std::string broken = (dir / "broken.json").string();
  qlora::test::write_raw(broken, "{\"model\": {\"type\": \"BPE\", \"vocab\": ");
  qlora::test::check_names(qlora::test::error_of([&] { load_hf_tokenizer_json(broken); }), {broken, "not valid JSON"});
  qlora::test::write_raw(broken, R"({"model": {"type": "Unigram", "vocab": []}})");
  qlora::test::check_names(qlora::test::error_of([&] { load_hf_tokenizer_json(broken); }), {broken, "Unigram"});
  qlora::test::write_raw(broken, R"({"pre_tokenizer": {"type": "Metaspace"}, "model": {"type": "BPE", "vocab": {}, "merges": []}})");
  qlora::test::check_names(qlora::test::error_of([&] { load_hf_tokenizer_json(broken); }), {broken, "Metaspace"});
  qlora::test::write_raw(broken, R"({"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})");
  qlora::test::check_names(qlora::test::error_of([&] { load_hf_tokenizer_json(broken); }), {broken, "a b"});

  const std::string ranks = (dir / "tokenizer.model").string();
  qlora::test::write_raw(ranks, "IQ== 0\nIg== 1\n!!notbase64 2\n");
  qlora::test::check_names(qlora::test::error_of([&] { load_tiktoken_tokenizer(ranks, {}); }), {ranks, "line 3", "base64"});
  qlora::test::write_raw(ranks, "IQ== 0\nIg== 2\n");
  qlora::test::check_names(qlora::test::error_of([&] { load_tiktoken_tokenizer(ranks, {}); }), {ranks, "rank 1"});
  qlora::test::write_raw(ranks, "IQ== 0\nIg== 99999999\n");  // fuzz smoke: once sized a table of 10^8 tokens
  qlora::test::check_names(qlora::test::error_of([&] { load_tiktoken_tokenizer(ranks, {}); }),
                           {ranks, "line 2", "rank 99999999", "only 3 lines"});
  qlora::test::write_raw(ranks, "IQ== 0\n" + std::string(5464, 'Q') + " 1\n");  // 4098 bytes: over the cap
  qlora::test::check_names(qlora::test::error_of([&] { load_tiktoken_tokenizer(ranks, {}); }),
                           {ranks, "line 2", "token of 4098 bytes"});
  qlora::test::write_raw(ranks, "IQ== 0\nIg== 0\n");
  qlora::test::check_names(qlora::test::error_of([&] { load_tiktoken_tokenizer(ranks, {}); }), {ranks, "repeats rank 0"});

  const auto tiny = load_hf_tokenizer_json(tiny_bpe_json().string());
  qlora::test::check_names(qlora::test::error_of([&] { tiny->decode(Ids{3, 600}); }), {"600", "out of range"});
  qlora::test::check_names(qlora::test::error_of([&] { tiny->encode("ok \xC3\x28 broken"); }), {"not valid UTF-8"});
  qlora::test::check_names(qlora::test::error_of([&] { tiny->encode("x", true); }), {"BOS"});
}

TEST_CASE("BPE: base64 decoding of tiktoken tokens") {
  CHECK(decode_base64("IQ==") == std::string("!"));
  CHECK(decode_base64("SGVsbG8=") == std::string("Hello"));
  CHECK(decode_base64("SGVsbG8h") == std::string("Hello!"));
  CHECK_FALSE(decode_base64("SGVsbG8").has_value());
  CHECK_FALSE(decode_base64("SG=sbG8h").has_value());
}

TEST_CASE("BPE: GPT-2 byte alphabet round-trips all 256 bytes") {
  const auto& table = gpt2_byte_to_unicode();
  CHECK(table[' '] == U'\u0120');  // "Ġ"
  CHECK(table['\n'] == U'\u010A');  // "Ċ"
  CHECK(table['A'] == U'A');
  for (int b = 0; b < 256; ++b) {
    const char32_t cp = table[std::size_t(b)];
    std::string utf8;
    if (cp < 0x80) {
      utf8 += char(cp);
    } else {
      utf8 += char(0xC0 | (cp >> 6));
      utf8 += char(0x80 | (cp & 0x3F));
    }
    CHECK(byte_level_to_bytes(utf8) == std::string(1, char(b)));
  }
  CHECK_FALSE(byte_level_to_bytes("<|\xE2\x96\x81|>").has_value());  // "▁" is outside the alphabet
}
