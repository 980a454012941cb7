// libFuzzer target: the GGUF reader (io/gguf.hpp): header counts, metadata values and nested arrays, tensor
// infos (rank, dimensions, types, offsets), alignment; every tensor loaded; the llama config, the llama tensor
// set and the embedded tokenizer (tokenizer_load.hpp) built from whatever metadata is there.
#include "fuzz_support.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/tokenizer_load.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  const auto path = fuzz::write_input("model.gguf", fuzz::as_text(data, size));
  return fuzz::run_reader([&] {
    const io::GgufFile file(path);
    for (const auto& t : file.tensors()) fuzz::run_reader([&] { (void)file.load(t.name); });
    fuzz::run_reader([&] { (void)io::GgufLlama(path); });
    fuzz::run_reader([&] { fuzz::exercise_tokenizer(*io::make_vocabulary_tokenizer(io::embedded_vocabulary(file), "fuzz")); });
  });
}
