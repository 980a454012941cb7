// libFuzzer target: the quantized model directory `qlora quantize` writes (io/quantized_model.hpp,
// io/model_files.hpp): config.json with its quantization_config block, and model.safetensors with the packed
// members of every block linear. Input: a u32 (little-endian) length N, N bytes of config.json, then the
// bytes of model.safetensors. The directory is opened as the tools open a MODEL and every tensor is loaded
// (the quantized linears dequantized).
#include <cstring>

#include "fuzz_support.hpp"
#include "qlora/io/model_files.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  if (size < 4) return 0;
  std::uint32_t config_bytes = 0;
  std::memcpy(&config_bytes, data, 4);
  const std::string_view rest = fuzz::as_text(data + 4, size - 4);
  const std::size_t n = std::min<std::size_t>(config_bytes, rest.size());
  const auto dir = fuzz::scratch_dir() / "quantized";
  std::filesystem::create_directories(dir);
  (void)fuzz::write_input("quantized/config.json", rest.substr(0, n));
  (void)fuzz::write_input("quantized/model.safetensors", rest.substr(n));
  return fuzz::run_reader([&] {
    const auto files = io::open_model_files(dir);
    for (const auto& spec : io::llama_tensor_specs(files->config())) (void)files->load(spec.name);
  });
}
