// load_tokenizer: the right tokenizer for each kind of file and for a model directory.

#include <doctest/doctest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "io/tokenizer_test_vectors.hpp"
#include "qlora/io/tokenizer_load.hpp"

namespace {

using namespace qlora::io;
using Ids = std::vector<std::int32_t>;
namespace fs = std::filesystem;

}  // namespace

TEST_CASE("load_tokenizer: each file kind gives its tokenizer") {
  QLORA_REQUIRE_SHARED_DATA(data);
  const fs::path spm = data / "tokenizers/llama2/tokenizer.model";
  const fs::path bin = data / "tokenizers/llama2/tokenizer.bin";
  const fs::path gguf = data / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-spm.gguf";
  const fs::path tiktoken = data / "tokenizers/llama3/tokenizer.model";
  CHECK(tokenizer_file_kind(spm) == TokenizerFileKind::sentencepiece);
  CHECK(tokenizer_file_kind(bin) == TokenizerFileKind::llama2c);
  CHECK(tokenizer_file_kind(gguf) == TokenizerFileKind::gguf);
  CHECK(tokenizer_file_kind(tiktoken) == TokenizerFileKind::tiktoken);

  // "Hello world" -> 15043 3186 (Llama 2) and 9906 1917 (Llama 3): llama.cpp's vectors.
  for (const fs::path& path : {spm, bin, gguf}) {
    INFO("path: " << path);
    const auto tokenizer = load_tokenizer(path);
    CHECK(tokenizer->vocab_size() == 32000);
    CHECK(tokenizer->encode("Hello world", true) == Ids{1, 15043, 3186});
  }
  CHECK(dynamic_cast<SentencePieceTokenizer*>(load_tokenizer(spm).get()) != nullptr);
  CHECK(dynamic_cast<ScoreMergeTokenizer*>(load_tokenizer(bin).get()) != nullptr);

  // Llama 3: special tokens from the tokenizer_config.json beside it.
  const auto llama3 = load_tokenizer(tiktoken);
  CHECK(llama3->vocab_size() == 128256);
  CHECK(llama3->encode("Hello world", true) == Ids{128000, 9906, 1917});
  CHECK(llama3->special_token_id("<|eot_id|>") == 128009);

  // Without tokenizer_config.json beside it: Meta's own list, the same ids (golden ids from tiktoken
  // 0.14.0 with Meta's pat_str, as in tokenizer_bpe_test.cpp).
  qlora::test::TempDir dir;
  fs::create_symlink(tiktoken, dir / "tokenizer.model");
  const auto bare = load_tokenizer(dir.path());
  CHECK(bare->vocab_size() == 128256);
  CHECK(bare->bos_id() == 128000);
  CHECK(bare->eos_id() == 128001);
  CHECK(bare->encode("<|start_header_id|>user<|end_header_id|>", false, false, true) == Ids{128006, 882, 128007});
}

TEST_CASE("load_tokenizer: a model directory prefers a SentencePiece tokenizer.model, then tokenizer.json") {
  QLORA_REQUIRE_SHARED_DATA(data);
  qlora::test::TempDir dir;
  const fs::path tiny_json = fs::path(__FILE__).parent_path() / "tokenizer_tiny_bpe.json";
  fs::create_symlink(tiny_json, dir / "tokenizer.json");
  CHECK(load_tokenizer(dir.path())->vocab_size() == 600);
  fs::create_symlink(data / "models/stories260K/tok512.model", dir / "tokenizer.model");
  CHECK(load_tokenizer(dir.path())->vocab_size() == 512);

  qlora::test::TempDir llama2c;
  fs::create_symlink(data / "models/stories260K/tok512.bin", llama2c / "tokenizer.bin");
  CHECK(load_tokenizer(llama2c.path())->vocab_size() == 512);
}

TEST_CASE("load_tokenizer: missing and unreadable inputs name the path") {
  qlora::test::TempDir dir;
  const fs::path missing = dir / "nothing-here.model";
  qlora::test::check_names(qlora::test::error_of([&] { load_tokenizer(missing); }), {missing.string()});
  qlora::test::check_names(qlora::test::error_of([&] { load_tokenizer(dir.path()); }),
                           {dir.path().string(), "no tokenizer.model"});
  const fs::path garbage = dir / "tokenizer.model";
  qlora::test::write_raw(garbage, std::string("\x0a\xff\xff\xff\x01garbage", 12));
  qlora::test::check_names(qlora::test::error_of([&] { load_tokenizer(garbage); }), {garbage.string()});
  const fs::path bad_gguf = dir / "model.gguf";
  qlora::test::write_raw(bad_gguf, "GGUF\x03");
  qlora::test::check_names(qlora::test::error_of([&] { load_tokenizer(bad_gguf); }), {bad_gguf.string()});
}
