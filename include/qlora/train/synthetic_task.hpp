#pragma once
// The task `qlora demo` generates: short arithmetic stories in a 40-character alphabet,
//   "ann has 7 coins. she gets 5 more. now she has 12 coins.\n"
//   "bob has 9 pears. he gives away 4. now he has 5 pears.\n"
// Most of a line follows from the grammar once its first words are chosen; the final number needs the sum
// or difference (prompt and answer are kept apart for tasks that score it).
// Stories are a pure function of (seed, index): the same on every machine.

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/philox.hpp"
#include "qlora/io/tokenizer.hpp"

namespace qlora::train {

struct ArithmeticStory {
  std::string text;    // the whole line, ending in '\n'
  std::string prompt;  // the line up to and including "now <pronoun> has "
  std::string answer;  // the number that follows
};

inline ArithmeticStory arithmetic_story(std::uint64_t seed, std::uint64_t index) {
  static const char* const names[] = {"ann", "bob", "sue", "tom", "eva", "max", "liz", "sam"};
  static const bool female[] = {true, false, true, false, true, false, true, false};
  static const char* const things[] = {"apples", "pears", "coins", "cards", "books", "shells"};
  const PhiloxBlock r = philox_block(seed, index, 7u);
  const int who = int(r.x[0] % 8), what = int(r.x[1] % 6);
  const int have = int(r.x[2] % 9) + 1;  // 1..9, changes 1..5: 90 sums and differences to learn
  const bool gets = (r.x[3] & 1u) != 0;
  const int change = int((r.x[3] >> 1) % unsigned(gets ? 5 : std::min(have, 5))) + 1;
  const int now = gets ? have + change : have - change;
  const std::string pronoun = female[who] ? "she" : "he";
  ArithmeticStory s;
  s.prompt = std::string(names[who]) + " has " + std::to_string(have) + " " + things[what] + ". " + pronoun +
             (gets ? " gets " + std::to_string(change) + " more. " : " gives away " + std::to_string(change) + ". ") +
             "now " + pronoun + " has ";
  s.answer = std::to_string(now);
  s.text = s.prompt + s.answer + " " + things[what] + ".\n";
  return s;
}

inline std::string arithmetic_corpus(std::uint64_t seed, std::uint64_t first, std::uint64_t count) {
  std::string text;
  for (std::uint64_t i = first; i < first + count; ++i) text += arithmetic_story(seed, i).text;
  return text;
}

// One token per character of a fixed alphabet, plus <unk>, <s>, </s>: the demo's tokenizer.
class CharTokenizer final : public io::Tokenizer {
 public:
  static constexpr const char* kAlphabet = "\n .abcdefghijklmnopqrstuvwxyz0123456789";
  CharTokenizer() {
    vocab_size_ = 3 + std::int32_t(std::string(kAlphabet).size());
    bos_id_ = 1;
    eos_id_ = 2;
    set_special_tokens({{"<s>", 1, true}, {"</s>", 2, true}});
  }

 protected:
  void encode_ordinary(std::string_view text, std::vector<std::int32_t>& out) const override {
    const std::string_view alphabet = kAlphabet;
    for (char ch : text) {
      const std::size_t at = alphabet.find(ch);
      out.push_back(at == std::string_view::npos ? 0 : std::int32_t(3 + at));
    }
  }
  std::string decode_checked(std::span<const std::int32_t> ids) const override {
    std::string text;
    for (std::int32_t id : ids)
      if (id >= 3) text += kAlphabet[id - 3];
    return text;
  }
  std::string piece_checked(std::int32_t id) const override {
    if (id == 0) return "<unk>";
    if (id == 1) return "<s>";
    if (id == 2) return "</s>";
    return std::string(1, kAlphabet[id - 3]);
  }
};

}  // namespace qlora::train
