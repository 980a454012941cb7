// CUDA AdamW against the CPU twin over several steps (bias corrections change every step), with weight decay
// and a gradient scale.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/adamw.hpp"
#include "qlora/cuda/adamw.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_vector;
using qlora::test::rel_error;

TEST_CASE("cuda adamw: five steps match the CPU twin") {
  constexpr std::int64_t n = 100003;
  constexpr float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.1f, grad_scale = 0.5f;
  const auto param_start = random_vector<float>(n, 120);
  std::vector<float> param = param_start, m(n, 0.0f), v(n, 0.0f);
  DeviceBuffer<float> param_dev(param), m_dev(m), v_dev(v), grad_dev(n);

  for (std::int64_t step = 1; step <= 5; ++step) {
    CAPTURE(step);
    const auto grad = random_vector<float>(n, 121 + step, -3.0, 3.0);
    grad_dev.upload(grad);
    qlora::cpu::adamw_step(param.data(), grad.data(), m.data(), v.data(), n, lr, beta1, beta2, eps, weight_decay,
                           step, grad_scale);
    qlora::cuda::adamw_step(param_dev.data(), grad_dev.data(), m_dev.data(), v_dev.data(), n, lr, beta1, beta2, eps,
                            weight_decay, step, grad_scale, nullptr);
    CHECK(rel_error(m_dev.download(), m) < 1e-6);
    CHECK(rel_error(v_dev.download(), v) < 1e-6);
  }
  // Compare the total update, not the parameters: parameters of size 1 would hide an error in updates of
  // size lr.
  const auto param_out = param_dev.download();
  std::vector<double> update(n), expected_update(n);
  for (std::int64_t i = 0; i < n; ++i) {
    update[i] = double(param_out[i]) - param_start[i];
    expected_update[i] = double(param[i]) - param_start[i];
  }
  CHECK(rel_error(update, expected_update) < 1e-5);
}
