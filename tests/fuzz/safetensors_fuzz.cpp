// libFuzzer target: the safetensors reader (io/safetensors.hpp): header length, JSON header, dtypes, shapes,
// data_offsets against the data section, overlaps; then every tensor loaded as stored and as f32.
#include "fuzz_support.hpp"
#include "qlora/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = qlora::fuzz::write_input("model.safetensors", qlora::fuzz::as_text(data, size));
  return qlora::fuzz::run_reader([&] {
    const qlora::io::SafetensorsFile file(path);
    for (const auto& e : file.entries()) {
      (void)file.bytes(e.name);
      qlora::fuzz::run_reader([&] { (void)file.load(e.name); });
      qlora::fuzz::run_reader([&] { (void)file.load(e.name, qlora::DType::f32); });
    }
  });
}
