// Damaged training inputs (docs/reliability.md): a checkpoint whose state.json counters are not non-negative
// integers is refused naming the file and the key (a float such as 1e300 used to be converted to int64 with
// undefined behaviour), while a valid one still loads; data files with a number beyond a double are "not valid
// JSON" (nlohmann throws out_of_range there, which used to escape the readers), including the fuzz_dataset
// input committed in tests/fuzz/regressions/dataset/.

#include <doctest/doctest.h>

#include <filesystem>
#include <string>

#include "qlora/train/adamw.hpp"
#include "qlora/train/checkpoint.hpp"
#include "qlora/train/instruction_data.hpp"
#include "support/files.hpp"

using namespace qlora;

TEST_CASE("checkpoint: state.json counters must be non-negative integers") {
  test::TempDir dir;
  autograd::Param a{"lora_A", Tensor::zeros({2, 3})};
  std::vector<autograd::Param*> params{&a};
  train::AdamW optimizer(params);
  train::TrainerState state;
  state.step = 3;
  state.data = {1, 7};
  train::save_checkpoint(dir.path(), params, optimizer, state);
  const auto ckpt = train::checkpoint_dir(dir.path(), 3);
  const std::string good = test::read_raw(ckpt / "state.json");
  CHECK(train::load_checkpoint(ckpt, params, optimizer).data == train::DataPosition{1, 7});

  const auto damaged = [&](const std::string& from, const std::string& to) {
    std::string text = good;
    const auto at = text.find(from);
    REQUIRE(at != std::string::npos);
    test::write_raw(ckpt / "state.json", text.replace(at, from.size(), to));
    return test::error_of([&] { (void)train::load_checkpoint(ckpt, params, optimizer); });
  };
  std::string msg = damaged("\"step\": 3", "\"step\": 1e300");
  CHECK(msg.find("state.json: step is 1e+300, not a non-negative integer") != std::string::npos);
  msg = damaged("\"index\": 7", "\"index\": -7");
  CHECK(msg.find("data.index is -7") != std::string::npos);
  msg = damaged("\"epoch\": 1", "\"epoch\": 18446744073709551615");
  CHECK(msg.find("data.epoch is 18446744073709551615") != std::string::npos);
}

TEST_CASE("data files: a number beyond a double is not valid JSON, in an array, in JSONL and in the fuzz regression") {
  test::TempDir dir;
  const auto p = (dir / "data.json").string();
  test::write_raw(p, R"([{"instruction": "a", "output": "b", "n": 1e99999}])");
  std::string msg = test::error_of([&] { (void)train::read_instruction_file(p, "alpaca"); });
  CHECK(msg.find("data.json: not valid JSON") != std::string::npos);
  test::write_raw(p, "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 1e99999}\n");
  msg = test::error_of([&] { (void)train::read_instruction_file(p, "jsonl"); });
  CHECK(msg.find("data.json:2: not valid JSON") != std::string::npos);
  CHECK(test::error_of([&] { (void)train::read_json_file(p); }).find("not valid JSON") != std::string::npos);

  // The fuzz target's first byte picks the format (even: alpaca); the rest is the file.
  const auto regressions = std::filesystem::path(__FILE__).parent_path().parent_path() / "fuzz/regressions/dataset";
  int inputs = 0;
  for (const auto& entry : std::filesystem::directory_iterator(regressions)) {
    const std::string bytes = test::read_raw(entry.path());
    REQUIRE(!bytes.empty());
    test::write_raw(p, bytes.substr(1));
    CAPTURE(entry.path());
    CHECK(!test::error_of([&] { (void)train::read_instruction_file(p, bytes[0] % 2 == 0 ? "alpaca" : "jsonl"); }).empty());
    ++inputs;
  }
  CHECK(inputs > 0);
}
