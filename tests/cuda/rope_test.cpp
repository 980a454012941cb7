// CUDA rotary embedding (forward and backward, in place) against the CPU twin, with and without a position
// offset (the KV-cache case).

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/rope.hpp"
#include "qlora/cuda/rope.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

// Llama's inverse frequencies theta^(-2i/d), computed in f32 like Hugging Face's float inv_freq.
std::vector<float> llama_inv_freq(std::int64_t head_dim, float theta = 10000.0f) {
  std::vector<float> inv_freq(head_dim / 2);
  for (std::int64_t i = 0; i < head_dim / 2; ++i)
    inv_freq[i] = 1.0f / std::pow(theta, float(2 * i) / float(head_dim));
  return inv_freq;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda rope: forward and backward match the CPU twin", T, float, qlora::bf16) {
  constexpr double tolerance = qlora::test::output_tolerance<T>;
  const std::int64_t batch = 2, seq = 13, heads = 3;
  for (const std::int64_t head_dim : {64, 128}) {
    for (const std::int64_t pos_offset : {0, 517}) {
      CAPTURE(head_dim);
      CAPTURE(pos_offset);
      const std::int64_t n = batch * seq * heads * head_dim;
      const auto inv_freq = llama_inv_freq(head_dim);
      DeviceBuffer<float> inv_freq_dev(inv_freq);
      const auto x = random_exact<T>(n, 70 + head_dim + pos_offset);

      std::vector<float> expected = x;
      qlora::cpu::rope_forward(expected.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
      DeviceBuffer<T> x_dev(to_storage<T>(x));
      qlora::cuda::rope_forward(x_dev.data(), inv_freq_dev.data(), batch, seq, heads, head_dim, pos_offset, nullptr);
      CHECK(rel_error(to_floats(x_dev.download()), expected) < tolerance);

      expected = x;
      qlora::cpu::rope_backward(expected.data(), inv_freq.data(), batch, seq, heads, head_dim, pos_offset);
      x_dev.upload(to_storage<T>(x));
      qlora::cuda::rope_backward(x_dev.data(), inv_freq_dev.data(), batch, seq, heads, head_dim, pos_offset,
                                 nullptr);
      CHECK(rel_error(to_floats(x_dev.download()), expected) < tolerance);
    }
  }
}
