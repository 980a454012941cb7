// llama2.c tokenizer.bin: the score merge of run.c against SentencePiece (the library on the same
// vocabulary's .model) and llama.cpp's vectors; truncated and corrupted files.

#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "io/tokenizer_test_vectors.hpp"
#include "qlora/io/tokenizer_llama2c.hpp"
#include "qlora/io/tokenizer_sentencepiece.hpp"

namespace {

using qlora::io::load_llama2c_tokenizer;
using qlora::io::SentencePieceTokenizer;
using Ids = std::vector<std::int32_t>;

// Lines of a text file without their CR LF / LF endings.
std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(line);
  }
  return lines;
}

}  // namespace

// llama2.c's algorithm (greedy merge of the highest-scoring adjacent pair, byte fallback, dummy-prefix
// space) agrees with SentencePiece on every one of llama.cpp's 46 Llama 2 vectors: no exception to
// document (docs/tokenizers.md lists where it could differ in principle).
TEST_CASE("llama2.c: Llama 2 tokenizer.bin reproduces llama.cpp's SPM test vectors") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto tokenizer = load_llama2c_tokenizer((data / "tokenizers/llama2/tokenizer.bin").string(), 32000);
  CHECK(tokenizer->vocab_size() == 32000);
  CHECK(tokenizer->bos_id() == 1);
  CHECK(tokenizer->eos_id() == 2);
  const auto vectors = qlora::test::read_llamacpp_vectors(data / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-spm.gguf");
  REQUIRE(vectors.size() == 46);
  qlora::test::check_vectors(vectors, [&](const std::string& text) { return tokenizer->encode(text); });
  for (const auto& v : vectors) {
    INFO("text: \"" << v.text << "\"");
    CHECK(tokenizer->decode(v.ids) == v.text);
  }
}

TEST_CASE("llama2.c: Llama 2 tokenizer.bin agrees with SentencePiece on WikiText-2 and on tricky strings") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto ours = load_llama2c_tokenizer((data / "tokenizers/llama2/tokenizer.bin").string());
  const auto reference = SentencePieceTokenizer::from_file((data / "tokenizers/llama2/tokenizer.model").string());
  // The first 200 KB of the WikiText-2 test split, as one text (headers, numbers, " @-@ " runs).
  const std::string wiki =
      qlora::io::detail::read_tokenizer_file((data / "text/wikitext-2-raw/wiki.test.raw").string()).substr(0, 200000);
  const Ids ids = ours->encode(wiki);
  CHECK(ids.size() > 40000);
  CHECK(ids == reference->encode(wiki));
  CHECK(ours->decode(ids) == wiki);
  for (const std::string text : {"  two leading spaces", "tab\tnew\nline\r\n", "\xF0\x9F\xA6\x99 llama emoji",
                                  "\xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C", "1234567890",
                                  "trailing spaces   ", " "}) {
    INFO("text: \"" << text << "\"");
    CHECK(ours->encode(text, true, true) == reference->encode(text, true, true));
  }
  CHECK(ours->token_to_piece(15043) == reference->token_to_piece(15043));  // "▁Hello"
  CHECK(ours->token_to_piece(1) == "<s>");
}

TEST_CASE("llama2.c: stories260K tok512.bin agrees with SentencePiece on tok512.model over TinyStories") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const auto ours = load_llama2c_tokenizer((data / "models/stories260K/tok512.bin").string(), 512);
  const auto reference = SentencePieceTokenizer::from_file((data / "models/stories260K/tok512.model").string());
  const std::string text =
      qlora::io::detail::read_tokenizer_file((data / "text/tinystories/TinyStories-valid-subset.txt").string());
  std::size_t checked = 0;
  for (const std::string& line : lines_of(text)) {
    INFO("line: \"" << line << "\"");
    const Ids ids = ours->encode(line);
    CHECK(ids == reference->encode(line));
    CHECK(ours->decode(ids) == line);
    CHECK(reference->decode(ids) == line);
    checked += line.empty() ? 0 : 1;
  }
  CHECK(checked >= 10);
  // The whole file at once (CR LF line ends go through byte fallback).
  const Ids all = ours->encode(text, true, false);
  CHECK(all == reference->encode(text, true, false));
  CHECK(ours->decode(all) == text);
}

TEST_CASE("llama2.c: truncated or corrupted tokenizer.bin is refused with a message naming it") {
  qlora::test::TempDir dir;
  const std::string missing = (dir / "missing.bin").string();
  qlora::test::check_names(qlora::test::error_of([&] { load_llama2c_tokenizer(missing); }), {missing, "cannot open"});

  // A hand-made file: max_token_length 8, then <unk>, "\n<s>\n", "\n</s>\n", " a", "b".
  std::string good;
  qlora::test::append_value(good, std::int32_t(8));
  for (const auto& [score, piece] : std::vector<std::pair<float, std::string>>{
           {0.f, "<unk>"}, {0.f, "\n<s>\n"}, {0.f, "\n</s>\n"}, {-1.f, " a"}, {-2.f, "b"}, {-3.f, " "}, {-4.f, "a"}}) {
    qlora::test::append_value(good, score);
    qlora::test::append_value(good, std::int32_t(piece.size()));
    good += piece;
  }
  const std::string good_path = (dir / "tiny.bin").string();
  qlora::test::write_raw(good_path, good);
  const auto tiny = load_llama2c_tokenizer(good_path, 7);
  CHECK(tiny->encode("ab a") == Ids{3, 4, 3});  // " a" (score -1) beats " " + "a"; "b" alone
  qlora::test::check_names(qlora::test::error_of([&] { load_llama2c_tokenizer(good_path, 32000); }),
                           {good_path, "7 tokens", "32000"});

  const std::string truncated = (dir / "truncated.bin").string();
  qlora::test::write_raw(truncated, good.substr(0, good.size() - 1));
  qlora::test::check_names(qlora::test::error_of([&] { load_llama2c_tokenizer(truncated); }),
                           {truncated, "token 6", "truncated"});
  qlora::test::write_raw(truncated, good.substr(0, 4 + 8 + 5 + 6));  // inside the header of token 1
  qlora::test::check_names(qlora::test::error_of([&] { load_llama2c_tokenizer(truncated); }),
                           {truncated, "token 1", "truncated"});

  std::string corrupted = good;
  const std::int32_t huge = 1 << 20;
  std::memcpy(corrupted.data() + 4 + 4, &huge, 4);  // token 0's length
  const std::string corrupted_path = (dir / "corrupted.bin").string();
  qlora::test::write_raw(corrupted_path, corrupted);
  qlora::test::check_names(qlora::test::error_of([&] { load_llama2c_tokenizer(corrupted_path); }),
                           {corrupted_path, "token 0", "corrupted"});

  std::string nan_score = good;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(nan_score.data() + 4, &nan, 4);  // token 0's score
  qlora::test::write_raw(corrupted_path, nan_score);
  qlora::test::check_names(qlora::test::error_of([&] { load_llama2c_tokenizer(corrupted_path); }),
                           {corrupted_path, "token 0", "non-finite"});

  const std::string text_file = (dir / "text.bin").string();
  qlora::test::write_raw(text_file, "hello, this is not a tokenizer");
  qlora::test::check_names(qlora::test::error_of([&] { load_llama2c_tokenizer(text_file); }), {text_file});

  qlora::test::check_names(qlora::test::error_of([&] { tiny->decode(Ids{7}); }), {"7", "out of range"});
}
