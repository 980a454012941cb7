// libFuzzer target: llama2.c tokenizer.bin (io/tokenizer_llama2c.hpp), through its in-memory parser; a
// vocabulary that parses is made into a tokenizer and used.
#include "fuzz_support.hpp"
#include "qlora/io/tokenizer_llama2c.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  return fuzz::run_reader([&] {
    auto vocab = io::parse_llama2c_tokenizer(fuzz::as_text(data, size), "tokenizer.bin");
    fuzz::exercise_tokenizer(io::ScoreMergeTokenizer(std::move(vocab), "tokenizer.bin"));
  });
}
