// libFuzzer target: Hugging Face tokenizer.json (io/tokenizer_hf_json.hpp): model.vocab, merges, added tokens,
// pre-tokenizer regexes; and the same bytes read as a tokenizer_config.json (added_tokens_decoder).
#include "fuzz_support.hpp"
#include "qlora/io/tokenizer_hf_json.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  const auto path = fuzz::write_input("tokenizer.json", fuzz::as_text(data, size));
  fuzz::run_reader([&] { fuzz::exercise_tokenizer(*io::load_hf_tokenizer_json(path.string())); });
  return fuzz::run_reader([&] { (void)io::read_hf_tokenizer_config(path.string()); });
}
