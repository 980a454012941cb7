// Cross-entropy one vocabulary chunk at a time (cpu/cross_entropy.hpp): the running logsumexp over any
// chunking equals the whole-row cross-entropy, and the chunked backward is the whole-row backward's columns.

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "qlora/cpu/cross_entropy.hpp"
#include "support/random.hpp"

using qlora::test::random_vector;

namespace {

// Every fourth row ignored (-100); the others spread over the vocabulary.
std::vector<std::int32_t> targets_for(std::int64_t rows, std::int64_t vocab) {
  std::vector<std::int32_t> t(rows);
  for (std::int64_t r = 0; r < rows; ++r) t[r] = r % 4 == 1 ? qlora::cpu::ignore_index : std::int32_t((r * 37 + 5) % vocab);
  return t;
}

// The (rows, chunk) block of columns [c0, c1) of (rows, vocab) logits, contiguous as a chunk GEMM writes it.
std::vector<double> columns(const std::vector<double>& logits, std::int64_t rows, std::int64_t vocab, std::int64_t c0,
                            std::int64_t c1) {
  std::vector<double> out;
  for (std::int64_t r = 0; r < rows; ++r)
    out.insert(out.end(), logits.begin() + r * vocab + c0, logits.begin() + r * vocab + c1);
  return out;
}

}  // namespace

TEST_CASE("cross_entropy chunks: running logsumexp over vocabulary chunks equals the whole-row forward and backward") {
  const std::int64_t rows = 9, vocab = 103;
  // Wide logits, and one row whose maximum sits in the last chunk, so the merge rescales the running sum.
  auto logits = random_vector<double>(rows * vocab, 51, -30.0, 30.0);
  logits[3 * vocab + vocab - 1] = 80.0;
  const auto targets = targets_for(rows, vocab);
  std::vector<double> losses(rows), lse(rows), dlogits(rows * vocab);
  qlora::cpu::cross_entropy_forward(logits.data(), targets.data(), losses.data(), lse.data(), rows, vocab);
  qlora::cpu::cross_entropy_backward(logits.data(), targets.data(), lse.data(), 0.25f, dlogits.data(), rows, vocab);

  for (const std::int64_t chunk : {1, 10, 50, 103}) {
    CAPTURE(chunk);
    std::vector<double> running_max(rows), running_sum(rows), target_logit(rows);
    qlora::cpu::cross_entropy_chunk_start(running_max.data(), running_sum.data(), target_logit.data(), rows);
    for (std::int64_t c0 = 0; c0 < vocab; c0 += chunk) {
      const std::int64_t c1 = std::min(vocab, c0 + chunk);
      const auto block = columns(logits, rows, vocab, c0, c1);
      qlora::cpu::cross_entropy_chunk_forward(block.data(), targets.data(), running_max.data(), running_sum.data(),
                                              target_logit.data(), rows, c1 - c0, c0);
    }
    std::vector<double> chunk_losses(rows), chunk_lse(rows);
    qlora::cpu::cross_entropy_chunk_finish(running_max.data(), running_sum.data(), target_logit.data(), targets.data(),
                                           chunk_losses.data(), chunk_lse.data(), rows);
    CHECK(qlora::test::rel_error(chunk_lse, lse) < 1e-14);
    CHECK(qlora::test::rel_error(chunk_losses, losses) < 1e-13);
    CHECK(chunk_losses[1] == 0.0);  // an ignored row

    for (std::int64_t c0 = 0; c0 < vocab; c0 += chunk) {
      const std::int64_t c1 = std::min(vocab, c0 + chunk);
      auto block = columns(logits, rows, vocab, c0, c1);
      qlora::cpu::cross_entropy_chunk_backward(block.data(), targets.data(), chunk_lse.data(), 0.25f, block.data(),
                                               rows, c1 - c0, c0);  // in place
      CHECK(qlora::test::rel_error(block, columns(dlogits, rows, vocab, c0, c1)) < 1e-13);
    }
  }
}
