#pragma once
// DataLoader: examples -> padded micro-batches of next-token targets, in a seeded order that a checkpoint can
// resume exactly (the position is (epoch, index into that epoch's order)).
//
// Order: each epoch is a Fisher-Yates shuffle driven by Philox(seed, epoch), so it is the same on every
// platform and standard library. With group_by_length, Hugging Face's LengthGroupedSampler is applied on top:
// the shuffled order is cut into mega-batches of 50 micro-batches, each sorted by length (longest first), and
// the mega-batch holding the longest example goes first (an early out-of-memory, not a late one).
// Batches: right padding to the longest example of the micro-batch with pad_id; targets[t] = labels[t + 1]
// (-100 where masked, padded, or at the last position).

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "qlora/core/philox.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/train/example.hpp"

namespace qlora::train {

struct Batch {
  Tensor tokens;   // i32 (batch, time)
  Tensor targets;  // i32 (batch, time), kIgnoreLabel where no loss
  std::int64_t target_count = 0;
};

// Tokens and next-token targets of examples, right-padded to the longest one.
inline Batch make_batch(const std::vector<const Example*>& examples, std::int32_t pad_id) {
  std::size_t time = 0;
  for (const Example* ex : examples) time = std::max(time, ex->size());
  Batch b;
  const std::int64_t rows = std::int64_t(examples.size());
  b.tokens = Tensor::empty(Shape{rows, std::int64_t(time)}, DType::i32);
  b.targets = Tensor::empty(Shape{rows, std::int64_t(time)}, DType::i32);
  std::int32_t* tok = b.tokens.data<std::int32_t>();
  std::int32_t* tgt = b.targets.data<std::int32_t>();
  for (std::int64_t r = 0; r < rows; ++r) {
    const Example& ex = *examples[std::size_t(r)];
    for (std::size_t t = 0; t < time; ++t) {
      tok[r * std::int64_t(time) + std::int64_t(t)] = t < ex.size() ? ex.input_ids[t] : pad_id;
      const std::int32_t target = t + 1 < ex.size() ? ex.labels[t + 1] : kIgnoreLabel;
      tgt[r * std::int64_t(time) + std::int64_t(t)] = target;
      b.target_count += target != kIgnoreLabel;
    }
  }
  return b;
}

// A permutation of 0..n-1 from Philox(seed, stream): the same on every platform.
inline std::vector<std::int64_t> seeded_permutation(std::int64_t n, std::uint64_t seed, std::uint64_t stream) {
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), std::int64_t(0));
  for (std::int64_t i = n - 1; i > 0; --i) {
    const PhiloxBlock block = philox_block(seed, std::uint64_t(i), std::uint32_t(stream) + 2u);
    const std::uint64_t draw = (std::uint64_t(block.x[0]) << 32) | block.x[1];
    std::swap(order[std::size_t(i)], order[std::size_t(draw % std::uint64_t(i + 1))]);
  }
  return order;
}

struct DataPosition {
  std::int64_t epoch = 0;
  std::int64_t index = 0;  // examples of this epoch's order already served
  bool operator==(const DataPosition&) const = default;
};

class DataLoader {
 public:
  static constexpr std::int64_t kMegaBatchMultiplier = 50;  // transformers' LengthGroupedSampler default

  DataLoader(std::vector<Example> examples, std::int64_t micro_batch, std::uint64_t seed, bool group_by_length,
             std::int32_t pad_id)
      : examples_(std::move(examples)), micro_batch_(micro_batch), seed_(seed), group_by_length_(group_by_length),
        pad_id_(pad_id) {
    if (examples_.empty()) throw Error("the training data has no examples (is the data file empty?)");
    if (micro_batch_ < 1) throw Error("micro-batch size must be >= 1, got " + std::to_string(micro_batch_));
    for (std::size_t i = 0; i < examples_.size(); ++i)
      if (examples_[i].size() < 2 || examples_[i].labels.size() != examples_[i].size())
        throw Error("example " + std::to_string(i) + " has " + std::to_string(examples_[i].size()) +
                    " tokens: at least 2 are needed, with one label each");
    build_order();
  }

  std::int64_t size() const { return std::int64_t(examples_.size()); }
  const std::vector<Example>& examples() const { return examples_; }
  DataPosition position() const { return pos_; }

  void set_position(const DataPosition& pos) {
    if (pos.epoch < 0 || pos.index < 0 || pos.index > size())
      throw Error("data position (epoch " + std::to_string(pos.epoch) + ", index " + std::to_string(pos.index) +
                  ") is outside a dataset of " + std::to_string(size()) + " examples");
    pos_ = pos;
    build_order();
  }

  // The next micro-batch; an epoch's last micro-batch may be smaller, then the next epoch starts.
  Batch next() {
    if (pos_.index >= size()) {
      ++pos_.epoch;
      pos_.index = 0;
      build_order();
    }
    const std::int64_t end = std::min(size(), pos_.index + micro_batch_);
    std::vector<const Example*> chosen;
    for (std::int64_t i = pos_.index; i < end; ++i) chosen.push_back(&examples_[std::size_t(order_[std::size_t(i)])]);
    pos_.index = end;
    return make_batch(chosen, pad_id_);
  }

  // The order of the current epoch (indices into examples()).
  const std::vector<std::int64_t>& order() const { return order_; }

 private:
  void build_order() {
    order_ = seeded_permutation(size(), seed_, std::uint64_t(pos_.epoch));
    if (!group_by_length_) return;
    const std::int64_t mega = micro_batch_ * kMegaBatchMultiplier;
    auto longer = [&](std::int64_t a, std::int64_t b) {
      return examples_[std::size_t(a)].size() > examples_[std::size_t(b)].size();
    };
    std::vector<std::vector<std::int64_t>> megabatches;
    for (std::int64_t start = 0; start < size(); start += mega) {
      std::vector<std::int64_t> m(order_.begin() + start, order_.begin() + std::min(size(), start + mega));
      std::stable_sort(m.begin(), m.end(), longer);
      megabatches.push_back(std::move(m));
    }
    std::size_t longest = 0;
    for (std::size_t i = 1; i < megabatches.size(); ++i)
      if (longer(megabatches[i][0], megabatches[longest][0])) longest = i;
    std::swap(megabatches[0], megabatches[longest]);
    order_.clear();
    for (const auto& m : megabatches) order_.insert(order_.end(), m.begin(), m.end());
  }

  std::vector<Example> examples_;
  std::int64_t micro_batch_;
  std::uint64_t seed_;
  bool group_by_length_;
  std::int32_t pad_id_;
  DataPosition pos_;
  std::vector<std::int64_t> order_;
};

// Splits off a held-out evaluation set: `count` examples chosen by a seeded permutation (stream 1000, apart
// from the epochs' streams). Returns {train, eval}.
inline std::pair<std::vector<Example>, std::vector<Example>> split_holdout(std::vector<Example> examples,
                                                                           std::int64_t count, std::uint64_t seed) {
  if (count < 0 || count >= std::int64_t(examples.size()))
    throw Error("held-out split of " + std::to_string(count) + " examples from " + std::to_string(examples.size()) +
                " leaves no training data");
  const auto order = seeded_permutation(std::int64_t(examples.size()), seed, 1000);
  std::vector<bool> held(examples.size(), false);
  for (std::int64_t i = 0; i < count; ++i) held[std::size_t(order[std::size_t(i)])] = true;
  std::vector<Example> train, eval;
  for (std::size_t i = 0; i < examples.size(); ++i) (held[i] ? eval : train).push_back(std::move(examples[i]));
  return {std::move(train), std::move(eval)};
}

}  // namespace qlora::train
