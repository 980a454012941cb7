#pragma once
// Example: one tokenized training sequence. labels[t] is the token the model should produce AT position t
// (Hugging Face's convention: labels == input ids where trained, -100 where masked); the batcher shifts them
// into next-token targets. Prompt tokens of instruction data carry -100, so the loss covers the response only.

#include <cstdint>
#include <vector>

namespace qlora::train {

inline constexpr std::int32_t kIgnoreLabel = -100;  // the same value as ops::kIgnoreIndex

struct Example {
  std::vector<std::int32_t> input_ids;
  std::vector<std::int32_t> labels;  // same length as input_ids

  std::size_t size() const { return input_ids.size(); }
  std::int64_t trained_tokens() const {
    std::int64_t n = 0;
    for (std::size_t t = 1; t < labels.size(); ++t) n += labels[t] != kIgnoreLabel;  // position 0 predicts nothing
    return n;
  }
};

}  // namespace qlora::train
