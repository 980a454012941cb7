// CUDA flash attention (cuda/ops/flash_attention.cu) against its CPU twin (qlora/cpu/flash_attention.hpp, run in
// f32 on the same bf16-exact inputs), forward and backward: multi-head and grouped-query, head dims 64 and 128,
// KV cache (tq < tk), single-token decode, sequences that are not a multiple of the tiles, several tiles.
// Then through ops::attention, flash against the plain CUDA kernel, and the refusals.
//
// Tolerances (relative error over the whole tensor):
//  * out, dq (bf16 outputs): 1e-2, bf16's rounding of the output (2^-9) plus the kernel's bf16 rounding of P
//    before P V (and of dS before dS K): each a 2^-9 relative error per term of an f32 sum.
//  * lse (f32): 1e-5. S is an f32 sum of exact bf16 products, as on the CPU; only summation order differs.
//  * dk, dv (f32, their increments compared): dv 1e-2 (P rounded to bf16 once); dk 2e-2, since dS = P (dP - D)
//    is rounded to bf16 after a cancellation and dk sums dS over queries of both signs.

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "support/attention_shape.hpp"
#include "device_buffer.hpp"
#include "qlora/core/error.hpp"
#include "qlora/cpu/flash_attention.hpp"
#include "qlora/cuda/flash_attention.hpp"
#include "qlora/ops/attention.hpp"
#include "qlora/ops/random.hpp"

using qlora::bf16;
using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

using qlora::test::AttentionShape;

const AttentionShape kShapes[] = {
    {"multi-head, d 64, one partial tile", 2, 37, 37, 4, 4, 64},
    {"grouped-query 8/2, d 128, three tiles", 1, 130, 130, 8, 2, 128},
    {"KV cache tq < tk, grouped-query, d 64", 2, 5, 77, 6, 3, 64},
    {"KV cache, several query and key tiles, d 128", 1, 100, 300, 4, 2, 128},
    {"single-token decode, one kv head, d 128", 1, 1, 300, 4, 1, 128},
    {"1000 tokens, d 64", 1, 1000, 1000, 2, 1, 64},
};

constexpr double kOutputTolerance = 1e-2, kLseTolerance = 1e-5, kDvTolerance = 1e-2, kDkTolerance = 2e-2;

void check_flash_attention(const AttentionShape& s, std::uint64_t seed) {
  CAPTURE(std::string(s.name));
  const auto q = random_exact<bf16>(s.q_size(), seed, -2.0, 2.0);
  const auto k = random_exact<bf16>(s.kv_size(), seed + 1, -2.0, 2.0);
  const auto v = random_exact<bf16>(s.kv_size(), seed + 2);
  DeviceBuffer<bf16> q_dev(to_storage<bf16>(q)), k_dev(to_storage<bf16>(k)), v_dev(to_storage<bf16>(v));

  // Forward.
  std::vector<float> out(s.q_size()), lse(s.lse_size());
  qlora::cpu::flash_attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq,
                                      s.hkv, s.d);
  DeviceBuffer<bf16> out_dev(s.q_size());
  DeviceBuffer<float> lse_dev(s.lse_size());
  out_dev.poison();
  lse_dev.poison();
  qlora::cuda::flash_attention_forward(q_dev.data(), k_dev.data(), v_dev.data(), out_dev.data(), lse_dev.data(),
                                       s.batch, s.tq, s.tk, s.hq, s.hkv, s.d, nullptr);
  CHECK(rel_error(to_floats(out_dev.download()), out) < kOutputTolerance);
  CHECK(rel_error(lse_dev.download(), lse) < kLseTolerance);

  // Backward, both sides from the CPU's out (rounded to bf16) and lse; dk and dv start non-zero (they
  // accumulate), the workspace and dq start as NaN.
  const auto out_in = to_floats(to_storage<bf16>(out));
  const auto dout = random_exact<bf16>(s.q_size(), seed + 3);
  const auto dk_start = qlora::test::random_vector<float>(s.kv_size(), seed + 4);
  const auto dv_start = qlora::test::random_vector<float>(s.kv_size(), seed + 5);
  std::vector<float> dq(s.q_size()), dk = dk_start, dv = dv_start;
  qlora::cpu::flash_attention_backward(q.data(), k.data(), v.data(), out_in.data(), lse.data(), dout.data(), dq.data(),
                                       dk.data(), dv.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);

  DeviceBuffer<bf16> out_in_dev(to_storage<bf16>(out_in)), dout_dev(to_storage<bf16>(dout)), dq_dev(s.q_size());
  DeviceBuffer<float> lse_in_dev(lse), dk_dev(dk_start), dv_dev(dv_start);
  DeviceBuffer<float> workspace(qlora::cuda::flash_attention_backward_workspace(s.batch, s.tq, s.hq, s.d));
  dq_dev.poison();
  workspace.poison();
  qlora::cuda::flash_attention_backward(q_dev.data(), k_dev.data(), v_dev.data(), out_in_dev.data(),
                                        lse_in_dev.data(), dout_dev.data(), dq_dev.data(), dk_dev.data(),
                                        dv_dev.data(), workspace.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d,
                                        nullptr);
  CHECK(rel_error(to_floats(dq_dev.download()), dq) < kOutputTolerance);
  auto increment = [](std::vector<float> total, const std::vector<float>& start) {
    for (std::size_t i = 0; i < total.size(); ++i) total[i] -= start[i];
    return total;
  };
  CHECK(rel_error(increment(dk_dev.download(), dk_start), increment(dk, dk_start)) < kDkTolerance);
  CHECK(rel_error(increment(dv_dev.download(), dv_start), increment(dv, dv_start)) < kDvTolerance);
}

double rel(const qlora::Tensor& a, const qlora::Tensor& b) {
  return rel_error(a.to(qlora::Device::cpu()).to(qlora::DType::f32).to_vector<float>(),
                   b.to(qlora::Device::cpu()).to(qlora::DType::f32).to_vector<float>());
}

}  // namespace

TEST_CASE("cuda flash attention: forward and backward match the CPU twin (bf16)") {
  std::uint64_t seed = 500;
  for (const auto& shape : kShapes) {
    check_flash_attention(shape, seed);
    seed += 10;
  }
}

TEST_CASE("cuda flash attention: ops::attention, flash against the plain kernel on the same bf16 tensors") {
  namespace ops = qlora::ops;
  using qlora::DType;
  const qlora::Device gpu = qlora::Device::cuda(0);
  const auto to_gpu_bf16 = [&](const qlora::Tensor& t) { return t.to(DType::bf16).to(gpu); };
  const qlora::Tensor q = to_gpu_bf16(ops::randn({2, 70, 8, 128}, 1)), k = to_gpu_bf16(ops::randn({2, 90, 2, 128}, 2)),
                      v = to_gpu_bf16(ops::randn({2, 90, 2, 128}, 3)), dout = to_gpu_bf16(ops::randn(q.shape(), 4));
  const ops::AttentionResult plain = ops::attention(q, k, v, ops::AttentionKernel::plain);
  const ops::AttentionResult flash = ops::attention(q, k, v, ops::AttentionKernel::flash);
  CHECK(rel(flash.out, plain.out) < kOutputTolerance);
  CHECK(rel(flash.lse, plain.lse) < kLseTolerance);
  const ops::AttentionGrads gp = ops::attention_backward(q, k, v, plain, dout, ops::AttentionKernel::plain);
  const ops::AttentionGrads gf = ops::attention_backward(q, k, v, plain, dout, ops::AttentionKernel::flash);
  CHECK(rel(gf.dq, gp.dq) < kOutputTolerance);
  CHECK(rel(gf.dk, gp.dk) < kDkTolerance);
  CHECK(rel(gf.dv, gp.dv) < kDvTolerance);

  // f32 tensors are not the flash kernel's: an error when forced, the plain kernel when automatic.
  const qlora::Tensor qf = q.to(DType::f32), kf = k.to(DType::f32), vf = v.to(DType::f32);
  CHECK_THROWS_AS(ops::attention(qf, kf, vf, ops::AttentionKernel::flash), qlora::Error);
  CHECK(rel(ops::attention(qf, kf, vf).out, ops::attention(qf, kf, vf, ops::AttentionKernel::plain).out) == 0.0);
}

TEST_CASE("cuda flash attention: head dims other than 64 and 128 are an error") {
  DeviceBuffer<bf16> buffer(4096);
  DeviceBuffer<float> lse(16);
  CHECK_THROWS_AS(qlora::cuda::flash_attention_forward(buffer.data(), buffer.data(), buffer.data(), buffer.data(),
                                                       lse.data(), 1, 1, 1, 1, 1, 80, nullptr),
                  qlora::Error);
}
