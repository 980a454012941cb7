// libFuzzer target: llama2.c checkpoints (io/llama2c.hpp): the 7-field header against the file size, then
// every tensor (the q/k rows permuted to HF order) and the RoPE tables.
#include "fuzz_support.hpp"
#include "qlora/io/llama2c.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  const auto path = fuzz::write_input("model.bin", fuzz::as_text(data, size));
  return fuzz::run_reader([&] {
    const io::Llama2cCheckpoint ckpt(path);
    for (const auto& name : ckpt.names()) (void)ckpt.load(name);
    (void)ckpt.freq_cis_real();
    (void)ckpt.freq_cis_imag();
  });
}
