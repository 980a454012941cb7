// Evaluation protocols with stand-in models whose answers are known in closed form: perplexity windows and
// averaging (a uniform model over V tokens has perplexity exactly V), multiple-choice accuracy and its
// length normalisation, the harness's pair encoding, and GSM8K answer extraction on the real test set.

#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "qlora/io/tokenizer_load.hpp"
#include "qlora/train/evaluation.hpp"
#include "support/shared_data.hpp"

using namespace qlora;
using namespace qlora::train;
namespace fs = std::filesystem;

TEST_CASE("evaluation: perplexity of a uniform model is the vocabulary size; windows follow GPTQ's protocol") {
  std::vector<std::int32_t> ids(1000);
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = std::int32_t(i % 50);
  const double vocab = 50;
  std::int64_t calls = 0;
  auto uniform = [&](const Batch& b) {
    ++calls;
    return NllSum{double(b.target_count) * std::log(vocab), b.target_count};
  };
  const PerplexityResult r = perplexity(ids, 128, uniform, 3);
  CHECK(r.windows == 7);                  // 1000 / 128 = 7 windows, the 104-token tail dropped
  CHECK(r.tokens == 7 * 127);             // L - 1 predictions per window
  CHECK(calls == 3);                      // batches of 3, 3, 1
  CHECK(r.ppl == doctest::Approx(vocab).epsilon(1e-12));
  CHECK(r.to_json().at("windows") == 7);
  CHECK_THROWS_WITH_AS(perplexity(std::vector<std::int32_t>(10, 1), 128, uniform), doctest::Contains("fewer than one window"),
                       Error);
  auto broken = [](const Batch&) { return NllSum{NAN, 1}; };
  CHECK_THROWS_AS(perplexity(ids, 128, broken), Error);
}

TEST_CASE("evaluation: multiple choice accuracy and the length-normalised accuracy") {
  if (!test::shared_file_present(test::kStories260KSentencePiece)) return;
  const auto tok = io::load_tokenizer(test::kStories260KSentencePiece);
  // The pair encoding: the context's tokens followed by the continuation's, nothing lost.
  const auto [ctx, cont] = encode_pair(*tok, "Question: Where is the cat?\nAnswer: ", "in the box");
  auto whole = tok->encode("Question: Where is the cat?\nAnswer: in the box", true);
  std::vector<std::int32_t> joined = ctx;
  joined.insert(joined.end(), cont.begin(), cont.end());
  CHECK(joined == whole);
  CHECK(!cont.empty());

  // A stand-in model: every continuation token costs 1 nat, so longer answers have lower log-likelihood;
  // normalising by the answer's length makes them all -1/char-ish and picks differently.
  const std::vector<MultipleChoiceItem> items = {
      {"pick the short one", {"a very long answer", "yes"}, 1},
      {"pick the long one", {"no", "a much longer answer here"}, 1},
  };
  auto loglik = [](const std::vector<std::int32_t>&, const std::vector<std::int32_t>& c) { return -double(c.size()); };
  const MultipleChoiceResult r = multiple_choice(*tok, items, loglik);
  CHECK(r.questions == 2);
  CHECK(r.acc == 0.5);  // the short answer wins both raw comparisons
  CHECK(r.acc_norm >= 0.5);
}

TEST_CASE("evaluation: multiple-choice files, with index or letter answers, and their errors") {
  const fs::path path = fs::temp_directory_path() / ("qlora-mc-" + std::to_string(::getpid()) + ".jsonl");
  std::ofstream(path) << R"({"question": "q1", "choices": ["a", "b"], "answer": 1})" "\n"
                      << R"({"question": "q2", "choices": ["a", "b", "c"], "answer": "C"})" "\n";
  const auto items = read_multiple_choice(path.string());
  REQUIRE(items.size() == 2);
  CHECK(items[1].answer == 2);
  std::ofstream(path) << R"({"question": "q1", "choices": ["a", "b"], "answer": 5})" "\n";
  CHECK_THROWS_WITH_AS(read_multiple_choice(path.string()), doctest::Contains(":1: answer 5 is not one of the 2"), Error);
}

TEST_CASE("evaluation: GSM8K answers are extracted from '####' or the last number") {
  CHECK(gsm8k_extract_answer("so she makes 9 * 2 = $18 every day.\n#### 18") == "18");
  CHECK(gsm8k_extract_answer("The answer is 1,234.") == "1234");
  CHECK(gsm8k_extract_answer("it drops by -5 then 3.5") == "3.5");
  CHECK(gsm8k_extract_answer("no numbers") == "");
  const fs::path gsm8k_test = test::kSharedData / "eval/gsm8k/test.jsonl";
  if (!test::shared_file_present(gsm8k_test)) return;
  // Every reference solution ends in "#### N"; the first test question (Janet's ducks) is 18 and the
  // second (a robe's bolts of fiber) is 3, as published in openai/grade-school-math.
  std::ifstream in(gsm8k_test);
  std::string line;
  std::vector<std::string> answers;
  while (std::getline(in, line)) answers.push_back(gsm8k_extract_answer(nlohmann::json::parse(line).at("answer")));
  CHECK(answers.size() == 1319);
  CHECK(answers[0] == "18");
  CHECK(answers[1] == "3");
  CHECK(std::count(answers.begin(), answers.end(), std::string()) == 0);
}
