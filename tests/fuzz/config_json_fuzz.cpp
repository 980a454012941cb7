// libFuzzer target: Hugging Face config.json (io/hf_config.hpp): every key LlamaConfig reads, validation,
// and the tensor list a valid configuration implies.
#include "fuzz_support.hpp"
#include "qlora/io/hf_config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  const auto path = fuzz::write_input("config.json", fuzz::as_text(data, size));
  return fuzz::run_reader([&] {
    const io::LlamaConfig config = io::read_hf_config(path);
    (void)io::llama_tensor_specs(config);
    (void)config.to_json().dump();
  });
}
