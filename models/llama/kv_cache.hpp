#pragma once
// KV cache for incremental decoding: per layer, keys and values of every position decoded so far,
// preallocated as (batch, max_len, kv_heads, head_dim) so that decoding never reallocates. Keys are stored
// after RoPE (each at its own absolute position), so a new query attends to them unchanged.

#include <cstdint>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "models/llama/config.hpp"

namespace qlora::models::llama {

class KvCache {
 public:
  KvCache(const Config& c, std::int64_t batch, std::int64_t max_len, DType dtype, Device device)
      : batch_(batch), max_len_(max_len) {
    QLORA_CHECK(batch >= 1 && max_len >= 1, "kv cache: batch and max_len must be positive, got " +
                                                std::to_string(batch) + " and " + std::to_string(max_len));
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
      keys_.push_back(Tensor::empty({batch, max_len, c.num_key_value_heads, c.head_dim}, dtype, device));
      values_.push_back(Tensor::empty({batch, max_len, c.num_key_value_heads, c.head_dim}, dtype, device));
    }
  }

  std::int64_t batch() const { return batch_; }
  std::int64_t max_len() const { return max_len_; }
  // Positions already cached: the absolute position of the next token.
  std::int64_t length() const { return length_; }
  void reset() { length_ = 0; }

  // Appends k, v (batch, t, hkv, d) of layer `layer` at positions [length, length + t). The cache length
  // moves on only through advance(), once every layer has appended.
  void append(std::int64_t layer, const Tensor& k, const Tensor& v) {
    const std::int64_t t = k.dim(1);
    QLORA_CHECK(length_ + t <= max_len_, "kv cache: " + std::to_string(length_) + " cached + " + std::to_string(t) +
                                             " new positions exceed its capacity " + std::to_string(max_len_));
    for (std::int64_t b = 0; b < batch_; ++b) {
      keys_[std::size_t(layer)].select(b).slice(length_, length_ + t).copy_from(k.select(b));
      values_[std::size_t(layer)].select(b).slice(length_, length_ + t).copy_from(v.select(b));
    }
  }
  void advance(std::int64_t t) { length_ += t; }

  // Keys / values of sequence b at positions [0, end), as (1, end, hkv, d) (contiguous: one sequence).
  Tensor keys(std::int64_t layer, std::int64_t b, std::int64_t end) const { return view(keys_, layer, b, end); }
  Tensor values(std::int64_t layer, std::int64_t b, std::int64_t end) const { return view(values_, layer, b, end); }

  std::size_t bytes() const {
    std::size_t n = 0;
    for (const Tensor& t : keys_) n += 2 * t.nbytes();
    return n;
  }

 private:
  static Tensor view(const std::vector<Tensor>& cache, std::int64_t layer, std::int64_t b, std::int64_t end) {
    const Tensor s = cache[std::size_t(layer)].select(b).slice(0, end);
    return s.reshape(Shape{1, s.dim(0), s.dim(1), s.dim(2)});
  }

  std::int64_t batch_, max_len_;
  std::int64_t length_ = 0;
  std::vector<Tensor> keys_, values_;
};

}  // namespace qlora::models::llama
