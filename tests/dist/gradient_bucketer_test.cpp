// GradientBucketer on host ranks: after a step every gradient equals the mean over ranks of the ranks'
// gradients (recomputed here from their seeds), whatever order each rank marks its params ready in, with
// odd sizes that straddle bucket boundaries and a dtype change that forces one.

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "dist/dist_test_util.hpp"
#include "qlora/dist/gradient_bucketer.hpp"
#include "qlora/dist/single_process.hpp"

using qlora::DType;
using qlora::Error;
using qlora::Shape;
using qlora::Tensor;
using qlora::autograd::Param;
using qlora::dist::GradientBucketer;
using qlora::test::rank_values;
using qlora::test::rel_error;
using qlora::test::sum_over_ranks;
using qlora::test::world;

namespace {

// Adapter-like params of odd sizes: 7 + 15 + 1 + 39 + 8 + 40 = 110 elements.
std::vector<std::unique_ptr<Param>> make_params(DType dtype = DType::f32) {
  const std::vector<Shape> shapes = {{7}, {3, 5}, {1}, {13, 3}, {2, 2, 2}, {40}};
  std::vector<std::unique_ptr<Param>> params;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    std::string name = "p";
    name += std::to_string(i);  // (GCC 12 warns falsely, -Wrestrict, about "p" + std::to_string(i))
    params.push_back(std::make_unique<Param>(name, Tensor::zeros(shapes[i], dtype)));
  }
  return params;
}

std::vector<Param*> pointers(const std::vector<std::unique_ptr<Param>>& params) {
  std::vector<Param*> out;
  for (const auto& p : params) out.push_back(p.get());
  return out;
}

std::uint64_t grad_seed(int step, std::size_t param) { return 1000 + 100 * std::uint64_t(step) + param; }

// This rank's gradients for `step`.
void fill_grads(const std::vector<std::unique_ptr<Param>>& params, int step, int rank) {
  for (std::size_t i = 0; i < params.size(); ++i) {
    Param& p = *params[i];
    const std::size_t n = std::size_t(p.value.numel());
    p.grad = p.value.dtype() == DType::f64 ? Tensor::from(rank_values<double>(n, grad_seed(step, i), rank), p.value.shape())
                                           : Tensor::from(rank_values<float>(n, grad_seed(step, i), rank), p.value.shape());
  }
}

std::vector<double> grad_as_double(const Param& p) {
  if (p.grad.dtype() == DType::f64) return p.grad.to_vector<double>();
  const auto f = p.grad.to_vector<float>();
  return std::vector<double>(f.begin(), f.end());
}

// A rank-dependent order of marking: rank 0 forwards, rank 1 backwards, others a rotation.
std::vector<std::size_t> mark_order(std::size_t count, int rank) {
  std::vector<std::size_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  if (rank % 3 == 1) std::reverse(order.begin(), order.end());
  if (rank % 3 == 2) std::rotate(order.begin(), order.begin() + 3, order.end());
  return order;
}

}  // namespace

TEST_CASE("dist bucketer: lays gradients end to end in buckets of the given size") {
  const auto params = make_params();
  qlora::dist::SingleProcessCommunicator single;
  GradientBucketer bucketer(single, pointers(params), 16 * sizeof(float));
  REQUIRE(bucketer.bucket_count() == 7);  // ceil(110 / 16)
  for (std::size_t b = 0; b + 1 < 7; ++b) CHECK(bucketer.bucket_numel(b) == 16);
  CHECK(bucketer.bucket_numel(6) == 110 - 6 * 16);

  // A dtype change closes a bucket: f32 (7) | f64 (15) | f32 (1 + 39 + 8 + 40 = 88 -> 16 x 5 + 8).
  auto mixed = make_params();
  mixed[1] = std::make_unique<Param>("p1", Tensor::zeros({3, 5}, DType::f64));
  GradientBucketer by_dtype(single, pointers(mixed), 16 * sizeof(float));
  CHECK(by_dtype.bucket_count() == 1 + 2 + 6);  // the f64 bucket holds 8 elements: 15 -> 8 + 7
}

TEST_CASE("dist bucketer: every gradient becomes the mean over ranks, for any order of mark_ready") {
  auto& comm = world();
  const auto params = make_params();
  GradientBucketer bucketer(comm, pointers(params), 16 * sizeof(float));
  for (int step = 0; step < 2; ++step) {  // the second step reuses the buckets
    CAPTURE(step);
    fill_grads(params, step, comm.rank());
    const auto order = mark_order(params.size(), comm.rank());
    for (std::size_t i : order) bucketer.mark_ready(params[i].get());
    CHECK(bucketer.buckets_launched() == bucketer.bucket_count());
    bucketer.finish();
    for (std::size_t i = 0; i < params.size(); ++i) {
      CAPTURE(i);
      auto expected = sum_over_ranks(std::size_t(params[i]->value.numel()), grad_seed(step, i), comm.size());
      for (double& x : expected) x /= comm.size();
      CHECK(rel_error(grad_as_double(*params[i]), expected) < 1e-6);
    }
  }
}

TEST_CASE("dist bucketer: a bucket is reduced only when it and every earlier bucket are complete") {
  auto& comm = world();
  const auto params = make_params();
  fill_grads(params, 0, comm.rank());
  GradientBucketer bucketer(comm, pointers(params), 16 * sizeof(float));
  // Buckets: [p0 7 | p1 9], [p1 6 | p2 1 | p3 9], [p3 16], [p3 14 | p4 2], [p4 6 | p5 10], [p5 16], [p5 14].
  bucketer.mark_ready(params[1].get());
  CHECK(bucketer.buckets_launched() == 0);  // bucket 0 still waits for p0
  bucketer.mark_ready(params[2].get());
  bucketer.mark_ready(params[3].get());
  CHECK(bucketer.buckets_launched() == 0);
  bucketer.mark_ready(params[0].get());
  CHECK(bucketer.buckets_launched() == 3);  // buckets 0, 1 and 2; bucket 3 waits for p4
  bucketer.mark_ready(params[5].get());
  CHECK(bucketer.buckets_launched() == 3);
  bucketer.mark_ready(params[4].get());
  CHECK(bucketer.buckets_launched() == 7);
  bucketer.finish();
  CHECK(bucketer.buckets_launched() == 0);  // reset for the next step
}

TEST_CASE("dist bucketer: mixed f32 and f64 params, and a param without a gradient on some ranks") {
  auto& comm = world();
  auto params = make_params();
  params[1] = std::make_unique<Param>("p1", Tensor::zeros({3, 5}, DType::f64));
  params[4] = std::make_unique<Param>("p4", Tensor::zeros({2, 2, 2}, DType::f64));
  fill_grads(params, 3, comm.rank());
  // p2 got no gradient on odd ranks: they contribute zeros.
  const bool p2_missing = comm.rank() % 2 == 1;
  if (p2_missing) params[2]->grad = Tensor();
  GradientBucketer bucketer(comm, pointers(params), 24);  // 6 f32 or 3 f64 per bucket
  bucketer.all_reduce();
  for (std::size_t i = 0; i < params.size(); ++i) {
    CAPTURE(i);
    const std::size_t n = std::size_t(params[i]->value.numel());
    std::vector<double> expected(n, 0.0);
    for (int r = 0; r < comm.size(); ++r) {
      if (i == 2 && r % 2 == 1) continue;
      const auto v = rank_values<double>(n, grad_seed(3, i), r);  // the f32 grads are these, rounded
      for (std::size_t k = 0; k < n; ++k) expected[k] += v[k];
    }
    for (double& x : expected) x /= comm.size();
    CHECK(rel_error(grad_as_double(*params[i]), expected) < (params[i]->value.dtype() == DType::f64 ? 1e-14 : 1e-6));
  }
}

TEST_CASE("dist bucketer: one process leaves the gradients bit for bit") {
  qlora::dist::SingleProcessCommunicator single;
  const auto params = make_params();
  fill_grads(params, 7, 0);
  std::vector<std::vector<float>> before;
  for (const auto& p : params) before.push_back(p->grad.to_vector<float>());
  GradientBucketer bucketer(single, pointers(params), 40);
  bucketer.all_reduce();
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(params[i]->grad.to_vector<float>() == before[i]);
}

TEST_CASE("dist bucketer: misuse throws qlora::Error naming the parameter") {
  qlora::dist::SingleProcessCommunicator single;
  auto params = make_params();
  CHECK_THROWS_WITH_AS(GradientBucketer(single, {}), doctest::Contains("no parameters"), Error);
  CHECK_THROWS_WITH_AS(GradientBucketer(single, pointers(params), 0), doctest::Contains("bucket size"), Error);
  CHECK_THROWS_WITH_AS(GradientBucketer(single, {params[0].get(), params[0].get()}), doctest::Contains("'p0' is listed twice"),
                       Error);
  Param frozen("base", Tensor::zeros({4}), /*requires_grad=*/false);
  CHECK_THROWS_WITH_AS(GradientBucketer(single, {params[0].get(), &frozen}), doctest::Contains("'base' is frozen"), Error);

  fill_grads(params, 0, 0);
  GradientBucketer bucketer(single, {params[0].get(), params[1].get(), params[2].get()}, 16);
  Param stranger("stranger", Tensor::zeros({2}));
  CHECK_THROWS_WITH_AS(bucketer.mark_ready(&stranger), doctest::Contains("'stranger' is not one of"), Error);
  bucketer.mark_ready(params[0].get());
  CHECK_THROWS_WITH_AS(bucketer.mark_ready(params[0].get()), doctest::Contains("'p0' was marked ready twice"), Error);
  CHECK_THROWS_WITH_AS(bucketer.finish(), doctest::Contains("'p1', 'p2'"), Error);
  params[1]->grad = Tensor::zeros({3, 5}, DType::f64);
  CHECK_THROWS_WITH_AS(bucketer.mark_ready(params[1].get()), doctest::Contains("gradient of 'p1'"), Error);
}
