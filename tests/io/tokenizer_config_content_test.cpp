// Regression (fuzz smoke, tokenizer_json target, 2026-11-24): a tokenizer_config.json whose bos/eos token is
// an object with a non-string "content" made nlohmann throw type_error out of read_hf_tokenizer_config
// (std::terminate under the fuzzer). It must be one qlora::Error naming what is wrong.

#include <doctest/doctest.h>

#include <string>

#include "qlora/io/tokenizer_hf_json.hpp"
#include "support/files.hpp"

TEST_CASE("tokenizer_config.json: a special token whose content is not a string is refused with a message") {
  qlora::test::TempDir dir;
  const auto path = dir.path() / "tokenizer_config.json";
  qlora::test::write_raw(path, R"({"added_tokens_decoder": {"0": {"content": "<s>"}}, "bos_token": {"content": true}})");
  const std::string message = qlora::test::error_of([&] { (void)qlora::io::read_hf_tokenizer_config(path.string()); });
  CHECK(message.find("\"content\" must be a string") != std::string::npos);
}
