// The demo's generated task: every story's arithmetic is right, stories are a pure function of (seed,
// index), and the character tokenizer round-trips the corpus.

#include <doctest/doctest.h>

#include <cctype>
#include <string>
#include <vector>

#include "qlora/train/synthetic_task.hpp"

using namespace qlora::train;

TEST_CASE("synthetic task: the final number of every story is the sum or difference it describes") {
  for (std::uint64_t i = 0; i < 2000; ++i) {
    const ArithmeticStory s = arithmetic_story(3, i);
    std::vector<int> numbers;  // in order: what they had, the change, what they have now
    for (std::size_t k = 0; k < s.text.size();) {
      if (!std::isdigit(static_cast<unsigned char>(s.text[k]))) {
        ++k;
        continue;
      }
      std::size_t end = k;
      while (end < s.text.size() && std::isdigit(static_cast<unsigned char>(s.text[end]))) ++end;
      numbers.push_back(std::stoi(s.text.substr(k, end - k)));
      k = end;
    }
    CAPTURE(s.text);
    REQUIRE(numbers.size() == 3);
    const bool gets = s.text.find(" gets ") != std::string::npos;
    CHECK(numbers[2] == (gets ? numbers[0] + numbers[1] : numbers[0] - numbers[1]));
    CHECK(numbers[2] >= 0);
    CHECK(std::to_string(numbers[2]) == s.answer);
    CHECK(s.text.rfind(s.prompt, 0) == 0);
  }
  CHECK(arithmetic_story(3, 17).text == arithmetic_story(3, 17).text);
  CHECK(arithmetic_corpus(3, 0, 50) != arithmetic_corpus(4, 0, 50));
}

TEST_CASE("synthetic task: the character tokenizer round-trips the corpus and maps unknown characters to 0") {
  const CharTokenizer tok;
  CHECK(tok.vocab_size() == 42);
  const std::string corpus = arithmetic_corpus(1, 0, 100);
  const auto ids = tok.encode(corpus, true, true);
  CHECK(ids.front() == tok.bos_id());
  CHECK(ids.back() == tok.eos_id());
  CHECK(ids.size() == corpus.size() + 2);
  CHECK(tok.decode(ids) == corpus);
  CHECK(tok.encode("A!")[0] == 0);
}
