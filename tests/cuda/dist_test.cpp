// The dist layer on a GPU: the gradient bucketer's CUDA path (pack, reduce and unpack on its own stream,
// ordered by events) and, when built with NCCL, the NCCL communicator in a world of one rank (the unique id
// exchanged over the single-process host communicator). Multi-rank NCCL runs need mpirun and one GPU per
// rank: docs/distributed.md. In a world of one, a sum or mean is the identity, so results are bit-exact.

#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include "qlora/cuda/runtime.hpp"
#include "qlora/dist/gradient_bucketer.hpp"
#include "qlora/dist/single_process.hpp"
#include "qlora/ops/ops.hpp"
#include "support/random.hpp"
#if defined(QLORA_WITH_NCCL)
#include "qlora/dist/nccl_communicator.hpp"
#endif

using namespace qlora;

namespace {

const Device gpu = Device::cuda(0);

Tensor random_on_gpu(Shape shape, std::uint64_t seed, DType dtype = DType::f32) {
  const Tensor host = Tensor::from(test::random_vector<float>(std::size_t(shape.numel()), seed), shape);
  return host.to(dtype).to(gpu);
}

// Adapter-like CUDA params of odd sizes with random gradients.
std::vector<std::unique_ptr<autograd::Param>> gpu_params() {
  const std::vector<Shape> shapes = {{7}, {3, 5}, {1}, {13, 3}, {2, 2, 2}, {40}};
  std::vector<std::unique_ptr<autograd::Param>> params;
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    auto p = std::make_unique<autograd::Param>(std::string(1, char('a' + i)), Tensor::zeros(shapes[i], DType::f32, gpu));
    p->grad = random_on_gpu(shapes[i], 300 + i);
    params.push_back(std::move(p));
  }
  return params;
}

// Runs one bucketed step where each gradient is doubled on the current stream right before mark_ready:
// the bucketer's stream must see the doubled values (its event orders the pack after the kernel) and the
// current stream must see the reduced ones after finish().
void check_bucketed_step(dist::Communicator& comm) {
  auto params = gpu_params();
  std::vector<autograd::Param*> pointers;
  std::vector<std::vector<float>> want;
  for (auto& p : params) {
    pointers.push_back(p.get());
    std::vector<float> v = p->grad.to_vector<float>();
    for (float& x : v) x *= 2;  // exact
    want.push_back(v);
  }
  dist::GradientBucketer bucketer(comm, pointers, 16 * sizeof(float));
  CHECK(bucketer.bucket_count() == 7);
  for (auto it = params.rbegin(); it != params.rend(); ++it) {  // the order of a backward
    ops::scale_((*it)->grad, 2.f);
    bucketer.mark_ready(it->get());
  }
  bucketer.finish();
  for (std::size_t i = 0; i < params.size(); ++i) {
    CAPTURE(i);
    CHECK(params[i]->grad.to_vector<float>() == want[i]);
  }
}

}  // namespace

TEST_CASE("cuda dist: the gradient bucketer's stream and events order pack, reduce and unpack") {
  dist::SingleProcessCommunicator single;
  check_bucketed_step(single);
}

#if defined(QLORA_WITH_NCCL)

TEST_CASE("cuda dist: NCCL in a world of one: every collective is the identity") {
  auto host = std::make_shared<dist::SingleProcessCommunicator>();
  dist::NcclCommunicator nccl(host, 0);
  CHECK(nccl.rank() == 0);
  CHECK(nccl.size() == 1);
  CHECK(nccl.supports(gpu));
  CHECK_FALSE(nccl.supports(Device::cpu()));

  for (DType dtype : {DType::f32, DType::bf16}) {
    CAPTURE(dtype_name(dtype));
    const Tensor original = random_on_gpu({37, 3}, 400, dtype);
    Tensor sum = original.clone(), mean = original.clone(), root = original.clone();
    nccl.all_reduce_sum_(sum);
    nccl.all_reduce_mean_(mean);
    nccl.broadcast_(root, 0);
    const Tensor gathered = nccl.all_gather(original);
    const auto want = original.to(DType::f32).to_vector<float>();
    CHECK(sum.to(DType::f32).to_vector<float>() == want);
    CHECK(mean.to(DType::f32).to_vector<float>() == want);
    CHECK(root.to(DType::f32).to_vector<float>() == want);
    CHECK(gathered.shape() == original.shape());
    CHECK(gathered.to(DType::f32).to_vector<float>() == want);
  }
  nccl.barrier();
  CHECK(nccl.all_reduce_sum(1.5) == 1.5);
  CHECK(nccl.broadcast_bytes(std::string("id\0x", 4), 0) == std::string("id\0x", 4));

  Tensor on_host = Tensor::from(std::vector<float>{1, 2}, {2});
  CHECK_THROWS_WITH_AS(nccl.all_reduce_sum_(on_host), doctest::Contains("does not reach"), Error);
  Tensor t = random_on_gpu({4}, 401);
  CHECK_THROWS_WITH_AS(nccl.broadcast_(t, 1), doctest::Contains("root rank 1"), Error);
}

TEST_CASE("cuda dist: the gradient bucketer over NCCL in a world of one") {
  auto host = std::make_shared<dist::SingleProcessCommunicator>();
  dist::NcclCommunicator nccl(host, 0);
  check_bucketed_step(nccl);
}

#endif  // QLORA_WITH_NCCL
