// CUDA elementwise kernels against the CPU twin, in f32 and bf16, including in-place (aliased) calls.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/elementwise.hpp"
#include "qlora/cuda/elementwise.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

constexpr std::int64_t kN = 100003;  // not a multiple of the block size; more than one grid-stride pass

template <class T>
std::vector<float> device_result(const DeviceBuffer<T>& y) {
  return to_floats(y.download());
}

}  // namespace

TEST_CASE_TEMPLATE("cuda elementwise: add, mul, scale, axpy match the CPU twin", T, float, qlora::bf16) {
  const auto a = random_exact<T>(kN, 1), b = random_exact<T>(kN, 2, -3.0, 3.0);
  DeviceBuffer<T> a_dev(to_storage<T>(a)), b_dev(to_storage<T>(b)), y_dev(kN);
  std::vector<float> expected(kN);
  // f32 sums, products and scalings round identically on both sides: exact. bf16 adds its final rounding.
  const double exact = std::is_same_v<T, float> ? 0.0 : qlora::test::output_tolerance<T>;

  y_dev.poison();
  qlora::cuda::add(a_dev.data(), b_dev.data(), y_dev.data(), kN, nullptr);
  qlora::cpu::add(a.data(), b.data(), expected.data(), kN);
  CHECK(rel_error(device_result(y_dev), expected) <= exact);

  y_dev.poison();
  qlora::cuda::mul(a_dev.data(), b_dev.data(), y_dev.data(), kN, nullptr);
  qlora::cpu::mul(a.data(), b.data(), expected.data(), kN);
  CHECK(rel_error(device_result(y_dev), expected) <= exact);

  y_dev.poison();
  qlora::cuda::scale(a_dev.data(), -0.37f, y_dev.data(), kN, nullptr);
  qlora::cpu::scale(a.data(), -0.37f, expected.data(), kN);
  CHECK(rel_error(device_result(y_dev), expected) <= exact);

  // axpy accumulates into y (no poison: y is an input). The device may fuse the multiply-add: not exact.
  expected = b;
  y_dev.upload(to_storage<T>(b));
  qlora::cuda::axpy(0.61f, a_dev.data(), y_dev.data(), kN, nullptr);
  qlora::cpu::axpy(0.61f, a.data(), expected.data(), kN);
  CHECK(rel_error(device_result(y_dev), expected) < qlora::test::output_tolerance<T>);
}

TEST_CASE_TEMPLATE("cuda elementwise: silu forward and backward match the CPU twin", T, float, qlora::bf16) {
  const auto x = random_exact<T>(kN, 3, -8.0, 8.0), dy = random_exact<T>(kN, 4);
  DeviceBuffer<T> x_dev(to_storage<T>(x)), dy_dev(to_storage<T>(dy)), y_dev(kN);
  std::vector<float> expected(kN);

  y_dev.poison();
  qlora::cuda::silu_forward(x_dev.data(), y_dev.data(), kN, nullptr);
  qlora::cpu::silu_forward(x.data(), expected.data(), kN);
  CHECK(rel_error(device_result(y_dev), expected) < qlora::test::output_tolerance<T>);

  y_dev.poison();
  qlora::cuda::silu_backward(x_dev.data(), dy_dev.data(), y_dev.data(), kN, nullptr);
  qlora::cpu::silu_backward(x.data(), dy.data(), expected.data(), kN);
  CHECK(rel_error(device_result(y_dev), expected) < qlora::test::output_tolerance<T>);

  // In place: dx overwrites dy.
  qlora::cuda::silu_backward(x_dev.data(), dy_dev.data(), dy_dev.data(), kN, nullptr);
  CHECK(rel_error(device_result(dy_dev), expected) < qlora::test::output_tolerance<T>);
}

TEST_CASE_TEMPLATE("cuda elementwise: swiglu forward and backward match the CPU twin", T, float, qlora::bf16) {
  const auto gate = random_exact<T>(kN, 5, -6.0, 6.0), up = random_exact<T>(kN, 6, -2.0, 2.0);
  const auto dy = random_exact<T>(kN, 7);
  DeviceBuffer<T> gate_dev(to_storage<T>(gate)), up_dev(to_storage<T>(up)), dy_dev(to_storage<T>(dy));
  DeviceBuffer<T> y_dev(kN), dgate_dev(kN), dup_dev(kN);
  std::vector<float> expected(kN), expected_dgate(kN), expected_dup(kN);

  y_dev.poison();
  qlora::cuda::swiglu_forward(gate_dev.data(), up_dev.data(), y_dev.data(), kN, nullptr);
  qlora::cpu::swiglu_forward(gate.data(), up.data(), expected.data(), kN);
  CHECK(rel_error(device_result(y_dev), expected) < qlora::test::output_tolerance<T>);

  dgate_dev.poison();
  dup_dev.poison();
  qlora::cuda::swiglu_backward(gate_dev.data(), up_dev.data(), dy_dev.data(), dgate_dev.data(), dup_dev.data(), kN,
                               nullptr);
  qlora::cpu::swiglu_backward(gate.data(), up.data(), dy.data(), expected_dgate.data(), expected_dup.data(), kN);
  CHECK(rel_error(device_result(dgate_dev), expected_dgate) < qlora::test::output_tolerance<T>);
  CHECK(rel_error(device_result(dup_dev), expected_dup) < qlora::test::output_tolerance<T>);

  // In place: the gradients overwrite gate and up, as the MLP backward does to save memory.
  qlora::cuda::swiglu_backward(gate_dev.data(), up_dev.data(), dy_dev.data(), gate_dev.data(), up_dev.data(), kN,
                               nullptr);
  CHECK(rel_error(device_result(gate_dev), expected_dgate) < qlora::test::output_tolerance<T>);
  CHECK(rel_error(device_result(up_dev), expected_dup) < qlora::test::output_tolerance<T>);
}
