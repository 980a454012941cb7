#pragma once
// Work split across ranks with results identical to one process: evaluation (perplexity windows, multiple-
// choice questions, held-out batches) is a list of items whose per-item results are then summed.
//
// Item i belongs to rank i % size (round robin: shares differ by at most one item). Each rank fills the
// rows of its own items in an (items x width) table of doubles and leaves the others zero; one all-reduce
// sum then gives every rank every row EXACTLY (x + 0 = x in floating point: each row has one non-zero
// contributor). The caller sums the rows in item order, as one process does, so a result computed on N
// ranks is bit-for-bit the one-process result, as long as each item is computed the same way (the same
// batch of windows, the same question).

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/dist/communicator.hpp"

namespace qlora::dist {

class ShardedRows {
 public:
  ShardedRows(Communicator& comm, std::int64_t items, std::int64_t width)
      : comm_(comm), items_(items), width_(width), table_(std::size_t(items * width), 0.0) {
    if (items < 0 || width < 1)
      throw Error("sharded rows: need items >= 0 and width >= 1, got " + std::to_string(items) + " x " + std::to_string(width));
  }

  std::int64_t items() const { return items_; }
  // The rank that computes item i, and whether that is this one.
  int owner(std::int64_t item) const { return int(item % comm_.size()); }
  bool mine(std::int64_t item) const { return owner(item) == comm_.rank(); }
  // This rank's items in item order (rank, rank + size, ...): where the i-th of its local results goes.
  std::vector<std::int64_t> my_items() const {
    std::vector<std::int64_t> out;
    for (std::int64_t i = comm_.rank(); i < items_; i += comm_.size()) out.push_back(i);
    return out;
  }

  // The row of one of this rank's items, to fill.
  double* row(std::int64_t item) {
    if (item < 0 || item >= items_ || !mine(item))
      throw Error("sharded rows: item " + std::to_string(item) + " is not one of rank " + std::to_string(comm_.rank()) +
                  "'s (of " + std::to_string(items_) + " items)");
    return table_.data() + item * width_;
  }

  // Collective: afterwards every rank holds every item's row.
  void exchange() { table_ = comm_.all_reduce_sums(std::move(table_)); }

  // Row `item` after exchange().
  const double* at(std::int64_t item) const { return table_.data() + item * width_; }

  // Per column, the sum of the rows in item order (what one process accumulating item by item gets).
  std::vector<double> column_sums() const {
    std::vector<double> sums(std::size_t(width_), 0.0);
    for (std::int64_t i = 0; i < items_; ++i)
      for (std::int64_t c = 0; c < width_; ++c) sums[std::size_t(c)] += table_[std::size_t(i * width_ + c)];
    return sums;
  }

 private:
  Communicator& comm_;
  std::int64_t items_, width_;
  std::vector<double> table_;
};

}  // namespace qlora::dist
