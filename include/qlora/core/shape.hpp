#pragma once
// Shape: up to four dimensions, row-major. Rank 0 is a scalar (one element).

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "qlora/core/error.hpp"

namespace qlora {

class Shape {
 public:
  static constexpr int kMaxRank = 4;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) {
    QLORA_CHECK(dims.size() <= kMaxRank, "shape of rank " + std::to_string(dims.size()) + " exceeds the maximum rank 4");
    for (std::int64_t d : dims) {
      QLORA_CHECK(d >= 0, "negative dimension " + std::to_string(d) + " in a shape");
      dims_[rank_++] = d;
    }
  }

  int rank() const { return rank_; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[i];
    return n;
  }
  // Dimension i; negative i counts from the end (-1 is the last).
  std::int64_t operator[](int i) const {
    const int j = i < 0 ? i + rank_ : i;
    QLORA_CHECK(j >= 0 && j < rank_, "dimension " + std::to_string(i) + " out of range for shape " + str());
    return dims_[j];
  }
  // Product of all dimensions but the last: the "rows" of a last-axis op.
  std::int64_t rows() const { return rank_ == 0 ? 1 : numel() / (dims_[rank_ - 1] ? dims_[rank_ - 1] : 1); }
  std::int64_t last() const { return rank_ == 0 ? 1 : dims_[rank_ - 1]; }

  // This shape without its last dimension (a scalar shape stays a scalar): per-row statistics.
  Shape without_last() const {
    Shape s = *this;
    if (s.rank_ > 0) s.rank_ -= 1;
    return s;
  }
  // This shape without its first dimension: an element of the leading axis.
  Shape without_first() const {
    QLORA_CHECK(rank_ > 0, "a scalar shape has no first dimension");
    Shape s;
    for (int i = 1; i < rank_; ++i) s.dims_[s.rank_++] = dims_[i];
    return s;
  }
  // This shape with one more trailing dimension d.
  Shape appended(std::int64_t d) const {
    QLORA_CHECK(rank_ < kMaxRank, "appending a dimension to " + str() + " exceeds the maximum rank 4");
    Shape s = *this;
    s.dims_[s.rank_++] = d;
    return s;
  }

  Shape with_dim(int i, std::int64_t value) const {
    Shape s = *this;
    s.dims_[i < 0 ? i + rank_ : i] = value;
    return s;
  }

  bool operator==(const Shape& o) const {
    if (rank_ != o.rank_) return false;
    for (int i = 0; i < rank_; ++i)
      if (dims_[i] != o.dims_[i]) return false;
    return true;
  }

  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(dims_[i]);
    return s + ")";
  }

 private:
  std::array<std::int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

}  // namespace qlora
