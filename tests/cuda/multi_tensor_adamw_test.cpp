// CUDA multi-tensor AdamW (cuda/train/multi_tensor_adamw.cu) against its CPU twin
// (qlora/cpu/multi_tensor_adamw.hpp) on tensors of many sizes, and train::AdamW on CUDA against train::AdamW
// on the CPU.
//
// Tolerance: 1e-6 relative on the moments and 1e-5 on the parameter updates (f32, as tests/cuda/adamw_test):
// the kernel runs the same arithmetic (cpu::adamw_update_moments, cpu::adamw_updated_param) but nvcc contracts multiply-adds into FMAs,
// so results differ in the last bits, not bit-exactly.

#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/multi_tensor_adamw.hpp"
#include "qlora/cuda/multi_tensor_adamw.hpp"
#include "qlora/train/adamw.hpp"

using qlora::cpu::AdamWTensor;
using qlora::cpu::TensorChunk;
using qlora::test::DeviceBuffer;
using qlora::test::random_vector;
using qlora::test::rel_error;

namespace {

// Sizes around the float4 width (4), the block's row of float4s (1024), the chunk (16384) and a LoRA A
// matrix (64 x 4096), packed back to back so that most tensors start at an offset that is not 16-byte
// aligned (the kernel's scalar path) and some at one that is (the vector path).
const std::vector<std::int64_t> kSizes = {1,    3,    4,    5,     7,     1023,  1024,  1025,         4096,
                                          4099, 16383, 16384, 16385, 40000, 49152, 64 * 4096, 64 * 4096 + 3};

std::vector<std::int64_t> offsets_of(const std::vector<std::int64_t>& sizes, std::int64_t first) {
  std::vector<std::int64_t> offsets;
  std::int64_t at = first;
  for (const std::int64_t n : sizes) {
    offsets.push_back(at);
    at += n;
  }
  return offsets;
}

std::vector<AdamWTensor<float>> make_table(float* p, const float* g, float* m, float* v,
                                           const std::vector<std::int64_t>& sizes,
                                           const std::vector<std::int64_t>& offsets, std::int64_t grad_shift) {
  std::vector<AdamWTensor<float>> table;
  for (std::size_t t = 0; t < sizes.size(); ++t)
    table.push_back({p + offsets[t], g + offsets[t] + grad_shift, m + offsets[t], v + offsets[t], sizes[t]});
  return table;
}

}  // namespace

TEST_CASE("cuda multi_tensor_adamw: three steps over 17 tensors of odd sizes match the CPU twin") {
  const auto offsets = offsets_of(kSizes, 0);
  const std::int64_t total = offsets.back() + kSizes.back();
  // Gradients one element later in their buffer: their alignment differs from the other arrays'.
  const std::int64_t grad_shift = 1;
  const auto p0 = random_vector<float>(std::size_t(total), 300);
  std::vector<float> p = p0, m(std::size_t(total), 0.0f), v(std::size_t(total), 0.0f);
  DeviceBuffer<float> p_dev(p), m_dev(m), v_dev(v), g_dev(std::size_t(total + grad_shift));

  const auto chunks = qlora::cpu::make_tensor_chunks(kSizes);
  const auto device_table =
      make_table(p_dev.data(), g_dev.data(), m_dev.data(), v_dev.data(), kSizes, offsets, grad_shift);
  DeviceBuffer<AdamWTensor<float>> table_dev(device_table);
  DeviceBuffer<TensorChunk> chunks_dev(chunks);

  for (std::int64_t step = 1; step <= 3; ++step) {
    CAPTURE(step);
    auto g = random_vector<float>(std::size_t(total + grad_shift), 310 + step, -3.0, 3.0);
    g_dev.upload(g);
    const auto twin_table = make_table(p.data(), g.data(), m.data(), v.data(), kSizes, offsets, grad_shift);
    // Moments, weight decay and a gradient scale all in play; a later lr as a schedule would give.
    const auto factors = qlora::cpu::adamw_factors<float>(1e-2 / double(step), 0.9, 0.999, 1e-8, 0.1, step, 0.7);
    qlora::cpu::multi_tensor_adamw(twin_table.data(), chunks.data(), std::int64_t(chunks.size()), factors);
    qlora::cuda::multi_tensor_adamw(table_dev.data(), chunks_dev.data(), std::int64_t(chunks.size()), factors, nullptr);
    CHECK(rel_error(m_dev.download(), m) < 1e-6);
    CHECK(rel_error(v_dev.download(), v) < 1e-6);
  }
  // Per tensor, so that a tensor the kernel skipped (the 1-element one) cannot hide in the total.
  const auto p_out = p_dev.download();
  for (std::size_t t = 0; t < kSizes.size(); ++t) {
    CAPTURE(kSizes[t]);
    std::vector<double> update, expected;
    for (std::int64_t i = offsets[t]; i < offsets[t] + kSizes[t]; ++i) {
      update.push_back(double(p_out[std::size_t(i)]) - p0[std::size_t(i)]);
      expected.push_back(double(p[std::size_t(i)]) - p0[std::size_t(i)]);
    }
    CHECK(rel_error(update, expected) < 1e-5);
  }
}

TEST_CASE("cuda train::AdamW: one fused step per update matches train::AdamW on the CPU") {
  using qlora::Device;
  using qlora::Tensor;
  using qlora::autograd::Param;
  const std::vector<std::int64_t> sizes = {1, 5, 4096, 40000, 64 * 4096};
  std::vector<std::unique_ptr<Param>> cpu_owned, gpu_owned;
  std::vector<Param*> cpu_params, gpu_params;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    const Tensor value = Tensor::from(random_vector<float>(std::size_t(sizes[i]), 400 + i), {sizes[i]});
    std::string name = "p";  // appended, not "p" + to_string(i): GCC 12 reports a false -Wrestrict on that
    name += std::to_string(i);
    cpu_owned.push_back(std::make_unique<Param>(name, value.clone()));
    gpu_owned.push_back(std::make_unique<Param>(name, value.to(Device::cuda(0))));
    cpu_params.push_back(cpu_owned.back().get());
    gpu_params.push_back(gpu_owned.back().get());
  }
  const qlora::train::AdamWOptions options{.lr = 2e-3, .weight_decay = 0.05};
  qlora::train::AdamW cpu_opt(cpu_params, options), gpu_opt(gpu_params, options);
  for (int step = 1; step <= 3; ++step) {
    CAPTURE(step);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const Tensor g = Tensor::from(random_vector<float>(std::size_t(sizes[i]), 500 * step + i, -2.0, 2.0), {sizes[i]});
      cpu_params[i]->grad = g;
      // A fresh device gradient every step: the optimizer must notice the new pointers and re-upload its table.
      gpu_params[i]->grad = g.to(Device::cuda(0));
    }
    cpu_opt.step(0.5);
    gpu_opt.step(0.5);
  }
  const auto cpu_state = cpu_opt.state_tensors(), gpu_state = gpu_opt.state_tensors();
  REQUIRE(cpu_state.size() == gpu_state.size());
  for (std::size_t i = 0; i < cpu_state.size(); ++i) {
    CAPTURE(cpu_state[i].first);
    CHECK(gpu_state[i].first == cpu_state[i].first);
    CHECK(rel_error(gpu_state[i].second.to_vector<float>(), cpu_state[i].second.to_vector<float>()) < 1e-6);
  }
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    CAPTURE(sizes[i]);
    CHECK(rel_error(gpu_params[i]->value.to_vector<float>(), cpu_params[i]->value.to_vector<float>()) < 1e-6);
  }
}
