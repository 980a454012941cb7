// The fused memory-bound CUDA kernels against their CPU twins (relative error; f32 1e-5, bf16 1e-2 as in
// device_buffer.hpp): RMSNorm with the residual add, RoPE on q and k in one launch, and the cross-entropy
// over vocabulary chunks. Outputs are poisoned (NaN) before each launch.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/cross_entropy.hpp"
#include "qlora/cpu/rmsnorm.hpp"
#include "qlora/cpu/rope.hpp"
#include "qlora/cuda/cross_entropy.hpp"
#include "qlora/cuda/rmsnorm.hpp"
#include "qlora/cuda/rope.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

TEST_CASE_TEMPLATE("cuda add_rmsnorm: forward and backward match the CPU twin", T, float, qlora::bf16) {
  constexpr double tolerance = qlora::test::output_tolerance<T>;
  constexpr float eps = 1e-5f;
  for (const std::int64_t cols : {7, 1031, 4096}) {
    CAPTURE(cols);
    const std::int64_t rows = 300;
    const auto x = random_exact<T>(rows * cols, 100 + cols, -2.0, 2.0);
    const auto residual = random_exact<T>(rows * cols, 101 + cols, -2.0, 2.0);
    const auto w = random_exact<T>(cols, 102 + cols, 0.5, 1.5);
    // The CPU twin sees the sum as the device stores it (rounded to T), then normalises that.
    std::vector<float> sum(rows * cols), y(rows * cols), rstd(rows);
    qlora::cpu::add_rmsnorm_forward(x.data(), residual.data(), w.data(), sum.data(), y.data(), rstd.data(), rows, cols,
                                    eps);
    const auto sum_rounded = to_floats(to_storage<T>(sum));
    qlora::cpu::rmsnorm_forward(sum_rounded.data(), w.data(), y.data(), rstd.data(), rows, cols, eps);

    DeviceBuffer<T> x_dev(to_storage<T>(x)), r_dev(to_storage<T>(residual)), w_dev(to_storage<T>(w));
    DeviceBuffer<T> sum_dev(rows * cols), y_dev(rows * cols);
    DeviceBuffer<float> rstd_dev(rows);
    sum_dev.poison();
    y_dev.poison();
    rstd_dev.poison();
    qlora::cuda::add_rmsnorm_forward(x_dev.data(), r_dev.data(), w_dev.data(), sum_dev.data(), y_dev.data(),
                                     rstd_dev.data(), rows, cols, eps, nullptr);
    CHECK(rel_error(to_floats(sum_dev.download()), sum_rounded) == 0.0);  // one rounding of an exact f32 sum
    CHECK(rel_error(to_floats(y_dev.download()), y) < tolerance);
    CHECK(rel_error(rstd_dev.download(), rstd) < 1e-5);

    // Backward: the norm's gradient plus the residual's; dw accumulates onto a non-zero start.
    const auto dy = random_exact<T>(rows * cols, 103 + cols);
    const auto dsum = random_exact<T>(rows * cols, 104 + cols);
    const auto dw_start = qlora::test::random_vector<float>(cols, 105 + cols);
    std::vector<float> dx(rows * cols), dw = dw_start;
    qlora::cpu::add_rmsnorm_backward(sum_rounded.data(), w.data(), rstd.data(), dy.data(), dsum.data(), dx.data(),
                                     dw.data(), rows, cols);
    DeviceBuffer<T> sum_in_dev(to_storage<T>(sum_rounded)), dy_dev(to_storage<T>(dy)), dsum_dev(to_storage<T>(dsum));
    DeviceBuffer<T> dx_dev(rows * cols);
    DeviceBuffer<float> rstd_in_dev(rstd), dw_dev(dw_start);
    dx_dev.poison();
    qlora::cuda::add_rmsnorm_backward(sum_in_dev.data(), w_dev.data(), rstd_in_dev.data(), dy_dev.data(),
                                      dsum_dev.data(), dx_dev.data(), dw_dev.data(), rows, cols, nullptr);
    CHECK(rel_error(to_floats(dx_dev.download()), dx) < tolerance);
    CHECK(rel_error(dw_dev.download(), dw) < 1e-5);
  }
}

TEST_CASE_TEMPLATE("cuda rope_qk: q and k in one launch match the CPU twin", T, float, qlora::bf16) {
  constexpr double tolerance = qlora::test::output_tolerance<T>;
  const std::int64_t batch = 2, seq = 11, q_heads = 8, k_heads = 2;
  for (const std::int64_t head_dim : {64, 128}) {
    CAPTURE(head_dim);
    std::vector<float> inv_freq(head_dim / 2);
    for (std::int64_t i = 0; i < head_dim / 2; ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / double(head_dim)));
    const auto q = random_exact<T>(batch * seq * q_heads * head_dim, 110 + head_dim);
    const auto k = random_exact<T>(batch * seq * k_heads * head_dim, 111 + head_dim);
    DeviceBuffer<float> inv_freq_dev(inv_freq);
    for (const bool backward : {false, true}) {
      CAPTURE(backward);
      std::vector<float> q_cpu = q, k_cpu = k;
      DeviceBuffer<T> q_dev(to_storage<T>(q)), k_dev(to_storage<T>(k));
      if (backward) {
        qlora::cpu::rope_qk_backward(q_cpu.data(), k_cpu.data(), inv_freq.data(), batch, seq, q_heads, k_heads, head_dim, 9);
        qlora::cuda::rope_qk_backward(q_dev.data(), k_dev.data(), inv_freq_dev.data(), batch, seq, q_heads, k_heads,
                                      head_dim, 9, nullptr);
      } else {
        qlora::cpu::rope_qk_forward(q_cpu.data(), k_cpu.data(), inv_freq.data(), batch, seq, q_heads, k_heads, head_dim, 9);
        qlora::cuda::rope_qk_forward(q_dev.data(), k_dev.data(), inv_freq_dev.data(), batch, seq, q_heads, k_heads,
                                     head_dim, 9, nullptr);
      }
      CHECK(rel_error(to_floats(q_dev.download()), q_cpu) < tolerance);
      CHECK(rel_error(to_floats(k_dev.download()), k_cpu) < tolerance);
    }
  }
}

TEST_CASE_TEMPLATE("cuda cross_entropy chunks: running logsumexp and chunk backward match the CPU twin", T, float,
                   qlora::bf16) {
  constexpr double tolerance = qlora::test::output_tolerance<T>;
  const std::int64_t rows = 37, vocab = 32003, chunk = 4096;
  const auto logits = random_exact<T>(rows * vocab, 120, -8.0, 8.0);
  std::vector<std::int32_t> targets(rows);
  for (std::int64_t r = 0; r < rows; ++r) targets[r] = r % 5 == 2 ? qlora::cpu::ignore_index : std::int32_t((r * 7919) % vocab);
  DeviceBuffer<std::int32_t> targets_dev(targets);
  std::vector<float> running_max(rows), running_sum(rows), target_logit(rows);
  qlora::cpu::cross_entropy_chunk_start(running_max.data(), running_sum.data(), target_logit.data(), rows);
  DeviceBuffer<float> max_dev(rows), sum_dev(rows), target_dev(rows);
  max_dev.poison();
  sum_dev.poison();
  target_dev.poison();
  qlora::cuda::cross_entropy_chunk_start(max_dev.data(), sum_dev.data(), target_dev.data(), rows, nullptr);

  const auto chunk_of = [&](std::int64_t c0, std::int64_t c1) {
    std::vector<float> out;
    for (std::int64_t r = 0; r < rows; ++r)
      out.insert(out.end(), logits.begin() + r * vocab + c0, logits.begin() + r * vocab + c1);
    return out;
  };
  for (std::int64_t c0 = 0; c0 < vocab; c0 += chunk) {
    const std::int64_t c1 = std::min(vocab, c0 + chunk);
    const auto block = chunk_of(c0, c1);
    qlora::cpu::cross_entropy_chunk_forward(block.data(), targets.data(), running_max.data(), running_sum.data(),
                                            target_logit.data(), rows, c1 - c0, c0);
    DeviceBuffer<T> block_dev(to_storage<T>(block));
    qlora::cuda::cross_entropy_chunk_forward(block_dev.data(), targets_dev.data(), max_dev.data(), sum_dev.data(),
                                             target_dev.data(), rows, c1 - c0, c0, vocab, nullptr);
    (void)max_dev.download();  // synchronise before block_dev is freed
  }
  std::vector<float> losses(rows), lse(rows);
  qlora::cpu::cross_entropy_chunk_finish(running_max.data(), running_sum.data(), target_logit.data(), targets.data(),
                                         losses.data(), lse.data(), rows);
  DeviceBuffer<float> losses_dev(rows), lse_dev(rows);
  losses_dev.poison();
  lse_dev.poison();
  qlora::cuda::cross_entropy_chunk_finish(max_dev.data(), sum_dev.data(), target_dev.data(), targets_dev.data(),
                                          losses_dev.data(), lse_dev.data(), rows, vocab, nullptr);
  CHECK(rel_error(lse_dev.download(), lse) < 1e-5);  // f32 statistics
  CHECK(rel_error(losses_dev.download(), losses) < 1e-5);

  // The whole-row (single-pass) forward agrees too.
  std::vector<float> whole_losses(rows), whole_lse(rows);
  qlora::cpu::cross_entropy_forward(logits.data(), targets.data(), whole_losses.data(), whole_lse.data(), rows, vocab);
  CHECK(rel_error(lse, whole_lse) < 1e-6);

  // Backward of one middle chunk, in place, from the CPU's lse.
  const std::int64_t c0 = chunk, c1 = 2 * chunk;
  auto block = chunk_of(c0, c1);
  DeviceBuffer<T> block_dev(to_storage<T>(block));
  DeviceBuffer<float> lse_in_dev(lse);
  qlora::cpu::cross_entropy_chunk_backward(block.data(), targets.data(), lse.data(), 0.5f, block.data(), rows, c1 - c0, c0);
  qlora::cuda::cross_entropy_chunk_backward(block_dev.data(), targets_dev.data(), lse_in_dev.data(), 0.5f,
                                            block_dev.data(), rows, c1 - c0, c0, vocab, nullptr);
  CHECK(rel_error(to_floats(block_dev.download()), block) < tolerance);
}
