// Training data: instruction files (Alpaca JSON/JSONL, prompt/completion JSONL) with their errors, prompt
// masking and truncation, text windows, padded next-token batches, the seeded epoch order with length
// grouping, resumable positions, and the held-out split.

#include <doctest/doctest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "qlora/io/tokenizer_load.hpp"
#include "qlora/train/data_loader.hpp"
#include "qlora/train/instruction_data.hpp"
#include "qlora/train/text_data.hpp"
#include "support/files.hpp"
#include "support/shared_data.hpp"

using namespace qlora;
using namespace qlora::train;
using qlora::test::error_of;
namespace fs = std::filesystem;

namespace {

// Every file of this suite's tests, removed when the program ends.
const qlora::test::TempDir& temp_dir() {
  static const qlora::test::TempDir dir;
  return dir;
}

fs::path write_temp(const std::string& name, const std::string& content) {
  const fs::path path = temp_dir() / name;
  qlora::test::write_raw(path, content);
  return path;
}

Example example_of_length(std::size_t n, std::int32_t first) {
  Example ex;
  for (std::size_t i = 0; i < n; ++i) ex.input_ids.push_back(first + std::int32_t(i));
  ex.labels = ex.input_ids;
  return ex;
}

}  // namespace

TEST_CASE("data: QLoRA's Alpaca prompt template, with and without input") {
  // Text of artidoro/qlora qlora.py ALPACA_PROMPT_DICT.
  CHECK(alpaca_prompt("Add 2 and 3.", "") ==
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd 2 and 3.\n\n### Response: ");
  CHECK(alpaca_prompt("Translate.", "bonjour") ==
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\nbonjour"
        "\n\n### Response: ");
}

TEST_CASE("data: instruction files as JSON arrays and JSONL, and their errors with line numbers") {
  const auto array = write_temp("a.json", R"([{"instruction": "i1", "input": "", "output": "o1"},
                                              {"instruction": "i2", "input": "x", "output": "o2"}])");
  const auto records = read_instruction_file(array.string(), "alpaca");
  REQUIRE(records.size() == 2);
  CHECK(records[0].prompt == alpaca_prompt("i1", ""));
  CHECK(records[1].completion == "o2");

  const auto jsonl = write_temp("b.jsonl", "{\"prompt\": \"p\", \"completion\": \"c\"}\n\n{\"prompt\": \"q\", \"completion\": \"d\"}\n");
  CHECK(read_instruction_file(jsonl.string(), "jsonl").size() == 2);

  const auto broken = write_temp("c.jsonl", "{\"prompt\": \"p\", \"completion\": \"c\"}\n{\"prompt\": \"p\", \n");
  CHECK(error_of([&] { read_instruction_file(broken.string(), "jsonl"); }).find("c.jsonl:2: not valid JSON") !=
        std::string::npos);
  const auto missing = write_temp("d.jsonl", "{\"instruction\": \"i\"}\n");
  CHECK(error_of([&] { read_instruction_file(missing.string(), "alpaca"); }).find("d.jsonl:1: missing field \"output\"") !=
        std::string::npos);
  const auto empty = write_temp("e.jsonl", "\n  \n");
  CHECK(error_of([&] { read_instruction_file(empty.string(), "jsonl"); }).find("has no records") != std::string::npos);
  CHECK(error_of([&] { read_instruction_file("/nonexistent/x.json", "alpaca"); }).find("cannot open") != std::string::npos);
  CHECK(error_of([&] { read_instruction_file(jsonl.string(), "sharegpt"); }).find("unknown instruction data format") !=
        std::string::npos);
}

TEST_CASE("data: prompt tokens are masked, the response is trained, lengths are truncated") {
  if (!qlora::test::shared_file_present(qlora::test::kStories260KSentencePiece)) return;
  const auto tok = io::load_tokenizer(qlora::test::kStories260KSentencePiece);
  const InstructionRecord rec{"Once upon a time there was a cat.", "The cat was happy."};
  const Example ex = tokenize_instruction(*tok, rec);
  const auto source = tok->encode(rec.prompt, true), target = tok->encode(rec.completion, false, true);
  REQUIRE(ex.size() == source.size() + target.size());
  CHECK(ex.input_ids.front() == tok->bos_id());
  CHECK(ex.input_ids.back() == tok->eos_id());
  CHECK(std::count(ex.labels.begin(), ex.labels.end(), kIgnoreLabel) == std::ptrdiff_t(source.size()));
  CHECK(std::equal(target.begin(), target.end(), ex.labels.begin() + std::ptrdiff_t(source.size())));
  CHECK(ex.trained_tokens() == std::int64_t(target.size()));

  const Example cut = tokenize_instruction(*tok, rec, {3, 2, false});
  CHECK(cut.size() == 5);
  CHECK(std::vector<std::int32_t>(cut.labels.begin(), cut.labels.begin() + 3) ==
        std::vector<std::int32_t>(3, kIgnoreLabel));
  const Example all = tokenize_instruction(*tok, rec, {384, 128, true});
  CHECK(all.labels == all.input_ids);
}

TEST_CASE("data: text windows are non-overlapping and drop the short tail") {
  std::vector<std::int32_t> ids(23);
  for (int i = 0; i < 23; ++i) ids[std::size_t(i)] = i;
  const auto windows = chunk_tokens(ids, 5);
  REQUIRE(windows.size() == 4);
  CHECK(windows[3].input_ids == std::vector<std::int32_t>{15, 16, 17, 18, 19});
  CHECK(windows[1].labels == windows[1].input_ids);
  CHECK_THROWS_AS(chunk_tokens(ids, 1), Error);
}

TEST_CASE("data: batches are right-padded and targets are the next labels") {
  Example a = example_of_length(4, 10), b = example_of_length(2, 20);
  a.labels[1] = kIgnoreLabel;  // a masked prompt token
  const Batch batch = make_batch({&a, &b}, 0);
  CHECK(batch.tokens.shape() == Shape{2, 4});
  CHECK(batch.tokens.to_vector<std::int32_t>() == std::vector<std::int32_t>{10, 11, 12, 13, 20, 21, 0, 0});
  CHECK(batch.targets.to_vector<std::int32_t>() ==
        std::vector<std::int32_t>{kIgnoreLabel, 12, 13, kIgnoreLabel, 21, kIgnoreLabel, kIgnoreLabel, kIgnoreLabel});
  CHECK(batch.target_count == 3);
}

TEST_CASE("data: every epoch serves each example once, in a seeded order, and positions resume exactly") {
  std::vector<Example> examples;
  for (int i = 0; i < 23; ++i) examples.push_back(example_of_length(2 + std::size_t(i % 7), 100 * i));
  DataLoader loader(examples, 4, 42, false, 0);
  std::multiset<std::int32_t> firsts;
  for (int b = 0; b < 6; ++b) {  // 23 examples = 5 full batches of 4 + one of 3
    const Batch batch = loader.next();
    const auto tokens = batch.tokens.to_vector<std::int32_t>();
    for (std::int64_t r = 0; r < batch.tokens.dim(0); ++r) firsts.insert(tokens[std::size_t(r * batch.tokens.dim(1))]);
  }
  CHECK(firsts.size() == 23);
  CHECK(std::set<std::int32_t>(firsts.begin(), firsts.end()).size() == 23);
  CHECK(loader.position() == DataPosition{0, 23});

  const auto epoch0 = seeded_permutation(23, 42, 0), epoch1 = seeded_permutation(23, 42, 1);
  CHECK(epoch0 != epoch1);
  CHECK(epoch0 == seeded_permutation(23, 42, 0));
  CHECK(epoch0 != seeded_permutation(23, 43, 0));

  // Resume: a loader set to a saved position continues with identical batches.
  loader.next();
  const DataPosition saved = loader.position();
  const auto expected = loader.next().tokens.to_vector<std::int32_t>();
  DataLoader resumed(examples, 4, 42, false, 0);
  resumed.set_position(saved);
  CHECK(resumed.next().tokens.to_vector<std::int32_t>() == expected);
  CHECK_THROWS_AS(resumed.set_position({0, 99}), Error);
}

TEST_CASE("data: grouping by length sorts mega-batches and puts the longest example first") {
  std::vector<Example> examples;
  for (int i = 0; i < 300; ++i) examples.push_back(example_of_length(2 + std::size_t((i * 37) % 101), i));
  DataLoader loader(examples, 2, 7, true, 0);  // mega-batches of 100
  const auto& order = loader.order();
  REQUIRE(order.size() == 300);
  CHECK(std::set<std::int64_t>(order.begin(), order.end()).size() == 300);
  for (std::size_t m = 0; m < 3; ++m)
    for (std::size_t i = m * 100 + 1; i < (m + 1) * 100; ++i)
      CHECK(examples[std::size_t(order[i - 1])].size() >= examples[std::size_t(order[i])].size());
  CHECK(examples[std::size_t(order[0])].size() == 102);  // the longest overall
}

TEST_CASE("data: the held-out split is disjoint, seeded, and refuses to leave nothing to train on") {
  std::vector<Example> examples;
  for (int i = 0; i < 50; ++i) examples.push_back(example_of_length(3, 10 * i));
  const auto [train_set, eval_set] = split_holdout(examples, 5, 1);
  CHECK(train_set.size() == 45);
  CHECK(eval_set.size() == 5);
  std::set<std::int32_t> seen;
  for (const auto& ex : train_set) seen.insert(ex.input_ids[0]);
  for (const auto& ex : eval_set) CHECK(seen.count(ex.input_ids[0]) == 0);
  CHECK_THROWS_AS(split_holdout(examples, 50, 1), Error);
  CHECK_THROWS_WITH_AS(DataLoader({}, 4, 1, false, 0), doctest::Contains("no examples"), Error);
}
