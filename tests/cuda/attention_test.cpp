// CUDA causal attention (plain path) against the CPU twin: multi-head, grouped-query, multi-query decode,
// KV cache (tk > tq), odd head sizes, and long key rows (8192 keys, and 20000 keys, which needs more than the
// default 48 KiB of shared memory).

#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "support/attention_shape.hpp"
#include "device_buffer.hpp"
#include "qlora/core/error.hpp"
#include "qlora/cpu/attention.hpp"
#include "qlora/cuda/attention.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::random_exact;
using qlora::test::rel_error;
using qlora::test::to_floats;
using qlora::test::to_storage;

namespace {

using qlora::test::AttentionShape;

const AttentionShape kShapes[] = {
    {"multi-head", 2, 37, 37, 4, 4, 64},
    {"grouped-query", 1, 50, 50, 8, 2, 128},
    {"KV cache, odd head size", 2, 5, 77, 6, 3, 80},
    {"multi-query decode, head size 256", 1, 1, 300, 4, 1, 256},
    {"8192 keys", 1, 3, 8192, 2, 1, 64},
    {"20000 keys (shared memory opt-in)", 1, 2, 20000, 2, 2, 64},
};

// f32 gradients are sums over keys of products of sums: a little more f32 rounding than one reduction.
constexpr double kGradientTolerance = 2e-5;

template <class T>
void check_attention(const AttentionShape& s, std::uint64_t seed) {
  CAPTURE(std::string(s.name));
  const auto q = random_exact<T>(s.q_size(), seed, -2.0, 2.0);
  const auto k = random_exact<T>(s.kv_size(), seed + 1, -2.0, 2.0);
  const auto v = random_exact<T>(s.kv_size(), seed + 2);
  DeviceBuffer<T> q_dev(to_storage<T>(q)), k_dev(to_storage<T>(k)), v_dev(to_storage<T>(v));

  // Forward.
  std::vector<float> out(s.q_size()), lse(s.lse_size());
  qlora::cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq,
                                s.hkv, s.d);
  DeviceBuffer<T> out_dev(s.q_size());
  DeviceBuffer<float> lse_dev(s.lse_size());
  out_dev.poison();
  lse_dev.poison();
  qlora::cuda::attention_forward(q_dev.data(), k_dev.data(), v_dev.data(), out_dev.data(), lse_dev.data(), s.batch,
                                 s.tq, s.tk, s.hq, s.hkv, s.d, nullptr);
  CHECK(rel_error(to_floats(out_dev.download()), out) < qlora::test::output_tolerance<T>);
  CHECK(rel_error(lse_dev.download(), lse) < 1e-5);  // f32 output

  // Backward, on both sides from the reference's out (rounded to T) and lse. dk and dv start non-zero: they
  // accumulate (over the query heads of a group, and across calls).
  const auto out_in = to_floats(to_storage<T>(out));
  const auto dout = random_exact<T>(s.q_size(), seed + 3);
  const auto dk_start = qlora::test::random_vector<float>(s.kv_size(), seed + 4);
  const auto dv_start = qlora::test::random_vector<float>(s.kv_size(), seed + 5);
  std::vector<float> dq(s.q_size()), dk = dk_start, dv = dv_start;
  qlora::cpu::attention_backward(q.data(), k.data(), v.data(), out_in.data(), lse.data(), dout.data(), dq.data(),
                                 dk.data(), dv.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);

  DeviceBuffer<T> out_in_dev(to_storage<T>(out_in)), dout_dev(to_storage<T>(dout)), dq_dev(s.q_size());
  DeviceBuffer<float> lse_in_dev(lse), dk_dev(dk_start), dv_dev(dv_start);
  dq_dev.poison();
  qlora::cuda::attention_backward(q_dev.data(), k_dev.data(), v_dev.data(), out_in_dev.data(), lse_in_dev.data(),
                                  dout_dev.data(), dq_dev.data(), dk_dev.data(), dv_dev.data(), s.batch, s.tq, s.tk,
                                  s.hq, s.hkv, s.d, nullptr);
  const double dq_tolerance = std::is_same_v<T, float> ? kGradientTolerance : qlora::test::output_tolerance<T>;
  CHECK(rel_error(to_floats(dq_dev.download()), dq) < dq_tolerance);
  CHECK(rel_error(dk_dev.download(), dk) < kGradientTolerance);  // f32 accumulators
  CHECK(rel_error(dv_dev.download(), dv) < kGradientTolerance);
}

}  // namespace

TEST_CASE_TEMPLATE("cuda attention: forward and backward match the CPU twin", T, float, qlora::bf16) {
  std::uint64_t seed = 100;
  for (const auto& shape : kShapes) {
    check_attention<T>(shape, seed);
    seed += 10;
  }
}

TEST_CASE("cuda attention: a head size beyond the plain path's 256 is an error") {
  DeviceBuffer<float> buffer(1);
  CHECK_THROWS_AS(qlora::cuda::attention_forward(buffer.data(), buffer.data(), buffer.data(), buffer.data(),
                                                 buffer.data(), 1, 1, 1, 1, 1, 512, nullptr),
                  qlora::Error);
}
