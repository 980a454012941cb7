// libFuzzer target: the training data readers (train/instruction_data.hpp, train/json_files.hpp): a JSON
// array or JSONL of alpaca records or of prompt/completion records. The first byte picks the format.
#include "fuzz_support.hpp"
#include "qlora/train/instruction_data.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace qlora;
  if (size == 0) return 0;
  const std::string format = data[0] % 2 == 0 ? "alpaca" : "jsonl";
  const auto path = fuzz::write_input("data.json", fuzz::as_text(data + 1, size - 1));
  return fuzz::run_reader([&] { (void)train::read_instruction_file(path.string(), format); });
}
