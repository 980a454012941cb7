// The Tensor-level ops on CUDA against the same ops on the CPU (which run the CPU twins), through the
// public API a model uses: dispatch, dtypes of results, device transfers. Also the device allocator's
// statistics and the Philox streams being bit-identical on both sides.

#include <doctest/doctest.h>

#include "qlora/cuda/runtime.hpp"
#include "qlora/ops/ops.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {
const Device gpu = Device::cuda(0);

double rel(const Tensor& got, const Tensor& want) {
  return test::rel_error(got.to(Device::cpu()).to(DType::f32).to_vector<float>(), want.to(DType::f32).to_vector<float>());
}
}  // namespace

TEST_CASE("ops on cuda: Philox uniform and normal streams are bit-identical to the CPU's") {
  const Tensor cpu_n = ops::randn({1 << 20}, 1234), gpu_n = ops::randn({1 << 20}, 1234, gpu);
  const Tensor cpu_u = ops::rand({1 << 20}, 99, Device::cpu(), -1.f, 1.f), gpu_u = ops::rand({1 << 20}, 99, gpu, -1.f, 1.f);
  CHECK(gpu_n.to_vector<float>() == cpu_n.to_vector<float>());
  CHECK(gpu_u.to_vector<float>() == cpu_u.to_vector<float>());
}

TEST_CASE("ops on cuda: the caching allocator reuses blocks and reports current and peak bytes") {
  cuda::release_cached_memory(0);
  cuda::reset_peak_memory(0);
  const MemoryStats before = cuda::memory_stats(0);
  void* first = nullptr;
  {
    Tensor a = Tensor::empty({1 << 20}, DType::f32, gpu);  // 4 MiB
    first = a.data();
    CHECK(cuda::memory_stats(0).allocated_bytes == before.allocated_bytes + (4u << 20));
  }
  CHECK(cuda::memory_stats(0).allocated_bytes == before.allocated_bytes);
  Tensor b = Tensor::empty({1 << 20}, DType::f32, gpu);
  CHECK(b.data() == first);  // served from the cache, same stream
  const MemoryStats after = cuda::memory_stats(0);
  CHECK(after.peak_allocated_bytes == before.allocated_bytes + (4u << 20));
  CHECK(after.system_allocations == before.system_allocations + 1);
}

TEST_CASE("ops on cuda: elementwise, reductions, softmax and rmsnorm match the CPU (f32 1e-5, bf16 1e-2)") {
  for (DType dt : {DType::f32, DType::bf16}) {
    const double tol = dt == DType::f32 ? 1e-5 : 1e-2;
    INFO(dtype_name(dt));
    const Tensor x = ops::randn({64, 256}, 1).to(dt).to(DType::f32), y = ops::randn({64, 256}, 2).to(dt).to(DType::f32);
    const Tensor xg = x.to(gpu).to(dt), yg = y.to(gpu).to(dt);
    CHECK(rel(ops::add(xg, yg), ops::add(x, y)) < tol);
    CHECK(rel(ops::swiglu(xg, yg), ops::swiglu(x, y)) < tol);
    CHECK(rel(ops::sum_last(xg), ops::sum_last(x)) < 1e-5);  // f32 results from either input dtype
    CHECK(rel(ops::softmax(xg), ops::softmax(x)) < tol);
    const Tensor w = ops::rand({256}, 3, Device::cpu(), 0.5f, 1.5f).to(dt).to(DType::f32);
    const ops::RmsNormResult rc = ops::rmsnorm(x, w, 1e-5f), rg = ops::rmsnorm(xg, w.to(gpu).to(dt), 1e-5f);
    CHECK(rg.rstd.dtype() == DType::f32);
    CHECK(rel(rg.y, rc.y) < tol);
    CHECK(rel(rg.rstd, rc.rstd) < 1e-5);
  }
}

TEST_CASE("ops on cuda: matmul through cuBLASLt matches the CPU for f32 and bf16, batched and transposed") {
  const Tensor a = ops::randn({3, 64, 96}, 1), b = ops::randn({128, 96}, 2);
  const Tensor c = ops::matmul(a, b, false, true);
  CHECK(rel(ops::matmul(a.to(gpu), b.to(gpu), false, true), c) < 1e-5);
  const Tensor ab = a.to(DType::bf16).to(DType::f32), bb = b.to(DType::bf16).to(DType::f32);
  const Tensor cb = ops::matmul(a.to(gpu).to(DType::bf16), b.to(gpu).to(DType::bf16), false, true, 1.f, DType::f32);
  CHECK(cb.dtype() == DType::f32);
  CHECK(rel(cb, ops::matmul(ab, bb, false, true)) < 1e-5);  // exact products of bf16 values, f32 sums
}

TEST_CASE("ops on cuda: chunked LM-head cross-entropy and attention match the CPU") {
  const Tensor hidden = ops::randn({33, 64}, 1), weight = ops::randn({500, 64}, 2, Device::cpu(), 0.f, 0.1f);
  std::vector<std::int32_t> t(33);
  for (int i = 0; i < 33; ++i) t[std::size_t(i)] = i % 5 == 0 ? -100 : (i * 37) % 500;
  const Tensor targets = Tensor::from(t, {33});
  Tensor dh_c, dh_g, dw_c = Tensor::zeros({500, 64}), dw_g = Tensor::zeros({500, 64}, DType::f32, gpu);
  const auto rc = ops::linear_cross_entropy(hidden, weight, targets, 8, &dh_c, &dw_c);
  const auto rg = ops::linear_cross_entropy(hidden.to(gpu), weight.to(gpu), targets.to(gpu), 8, &dh_g, &dw_g);
  CHECK(rg.loss == doctest::Approx(rc.loss).epsilon(1e-5));
  CHECK(rel(dh_g, dh_c) < 1e-5);
  CHECK(rel(dw_g, dw_c) < 1e-5);

  const Tensor q = ops::randn({2, 16, 4, 64}, 3), k = ops::randn({2, 20, 2, 64}, 4), v = ops::randn({2, 20, 2, 64}, 5);
  const ops::AttentionResult fc = ops::attention(q, k, v), fg = ops::attention(q.to(gpu), k.to(gpu), v.to(gpu));
  CHECK(rel(fg.out, fc.out) < 1e-5);
  const Tensor dout = ops::randn(q.shape(), 6);
  const ops::AttentionGrads gc = ops::attention_backward(q, k, v, fc, dout);
  const ops::AttentionGrads gg = ops::attention_backward(q.to(gpu), k.to(gpu), v.to(gpu), fg, dout.to(gpu));
  CHECK(rel(gg.dq, gc.dq) < 1e-5);
  CHECK(rel(gg.dk, gc.dk) < 1e-5);
  CHECK(rel(gg.dv, gc.dv) < 1e-5);
}

TEST_CASE("ops on cuda: AdamW steps and gradient clipping match the CPU") {
  Tensor p = ops::randn({1000}, 1), g = ops::randn({1000}, 2), m = Tensor::zeros({1000}), v = Tensor::zeros({1000});
  Tensor pg = p.to(gpu), gg = g.to(gpu), mg = m.to(gpu), vg = v.to(gpu);
  for (int step = 1; step <= 5; ++step) {
    ops::adamw_step(p, g, m, v, {}, step, 0.5f);
    ops::adamw_step(pg, gg, mg, vg, {}, step, 0.5f);
  }
  CHECK(rel(pg, p) < 1e-6);
  std::vector<Tensor> cpu_grads{ops::randn({300}, 3), ops::randn({7, 9}, 4)};
  std::vector<Tensor> gpu_grads{cpu_grads[0].to(gpu), cpu_grads[1].to(gpu)};
  CHECK(ops::clip_grad_norm_(gpu_grads, 1.0) == doctest::Approx(ops::clip_grad_norm_(cpu_grads, 1.0)).epsilon(1e-5));
  CHECK(rel(gpu_grads[1], cpu_grads[1]) < 1e-5);
}
