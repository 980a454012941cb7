// CUDA cross-entropy forward and backward against the CPU twin: ignored rows, a large vocabulary, and the
// in-place backward that turns the logits into their gradient.

#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/cross_entropy.hpp"
#include "qlora/cuda/cross_entropy.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

// Targets in [0, vocab), every fifth row ignored (-100), as prompt tokens are in instruction tuning.
std::vector<std::int32_t> random_targets(std::int64_t rows, std::int64_t vocab, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<std::int32_t> target(0, std::int32_t(vocab - 1));
  std::vector<std::int32_t> targets(rows);
  for (std::int64_t r = 0; r < rows; ++r) targets[r] = r % 5 == 2 ? qlora::cpu::ignore_index : target(gen);
  return targets;
}

}  // namespace

TEST_CASE_TEMPLATE("cuda cross_entropy: forward and backward match the CPU twin", T, float, qlora::bf16) {
  constexpr double tolerance = qlora::test::output_tolerance<T>;
  for (const std::int64_t vocab : {17, 32003}) {
    CAPTURE(vocab);
    const std::int64_t rows = 29;
    const auto logits = random_exact<T>(rows * vocab, 90 + vocab, -8.0, 8.0);
    const auto targets = random_targets(rows, vocab, 91 + vocab);
    DeviceBuffer<T> logits_dev(to_storage<T>(logits));
    DeviceBuffer<std::int32_t> targets_dev(targets);

    std::vector<float> losses(rows), lse(rows);
    qlora::cpu::cross_entropy_forward(logits.data(), targets.data(), losses.data(), lse.data(), rows, vocab);
    DeviceBuffer<float> losses_dev(rows), lse_dev(rows);
    losses_dev.poison();
    lse_dev.poison();
    qlora::cuda::cross_entropy_forward(logits_dev.data(), targets_dev.data(), losses_dev.data(), lse_dev.data(),
                                       rows, vocab, nullptr);
    const auto losses_out = losses_dev.download();
    CHECK(rel_error(losses_out, losses) < 1e-5);  // f32 outputs
    CHECK(rel_error(lse_dev.download(), lse) < 1e-5);
    for (std::int64_t r = 2; r < rows; r += 5) CHECK(losses_out[r] == 0.0f);  // ignored rows

    // Backward from the reference's lse, mean over the counted rows.
    std::int64_t counted = 0;
    for (auto t : targets) counted += t != qlora::cpu::ignore_index;
    const float grad_scale = 1.0f / float(counted);
    DeviceBuffer<float> lse_in_dev(lse);
    std::vector<float> dlogits(rows * vocab);
    qlora::cpu::cross_entropy_backward(logits.data(), targets.data(), lse.data(), grad_scale, dlogits.data(), rows,
                                       vocab);

    DeviceBuffer<T> dlogits_dev(rows * vocab);
    dlogits_dev.poison();
    qlora::cuda::cross_entropy_backward(logits_dev.data(), targets_dev.data(), lse_in_dev.data(), grad_scale,
                                        dlogits_dev.data(), rows, vocab, nullptr);
    CHECK(rel_error(to_floats(dlogits_dev.download()), dlogits) < tolerance);

    // In place: the logits buffer becomes its own gradient.
    qlora::cuda::cross_entropy_backward(logits_dev.data(), targets_dev.data(), lse_in_dev.data(), grad_scale,
                                        logits_dev.data(), rows, vocab, nullptr);
    const auto in_place = to_floats(logits_dev.download());
    CHECK(rel_error(in_place, dlogits) < tolerance);
    bool ignored_row_is_zero = true;  // row 2 is ignored
    for (std::int64_t j = 0; j < vocab; ++j) ignored_row_is_zero = ignored_row_is_zero && in_place[2 * vocab + j] == 0;
    CHECK(ignored_row_is_zero);
  }
}
