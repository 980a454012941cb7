// libFuzzer target: tokenizer.model files by content, as load_tokenizer sniffs them (io/tokenizer_load.hpp):
// a SentencePiece protobuf (through SentencePiece's own parser) or a tiktoken rank file (Llama 3).
#include "fuzz_support.hpp"
#include "qlora/io/tokenizer_load.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  const auto path = fuzz::write_input("tokenizer.model", fuzz::as_text(data, size));
  return fuzz::run_reader([&] { fuzz::exercise_tokenizer(*io::load_tokenizer(path)); });
}
