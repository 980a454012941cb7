// autograd-lite: a small residual network written the way model code is (each module's forward pushes
// its explicit backward onto the tape), checked against float64 finite differences, with and without
// activation checkpointing.

#include <doctest/doctest.h>

#include "qlora/autograd/checkpoint.hpp"
#include "qlora/autograd/gradcheck.hpp"
#include "qlora/autograd/param.hpp"
#include "qlora/autograd/tape.hpp"
#include "qlora/ops/ops.hpp"
#include "support/random.hpp"

using namespace qlora;
using autograd::Param;
using autograd::Tape;

namespace {

// y = x W^T; saves x for dW and W for dx.
Tensor linear(Tape& tape, Param& w, const Tensor& x) {
  Tensor y = ops::matmul(x, w.value, false, true);
  tape.push("linear " + w.name, [&w, x](const Tensor& dy) {
    w.accumulate_grad(ops::matmul(dy, x, true, false));  // dW = dy^T x
    return ops::matmul(dy, w.value);                      // dx = dy W
  });
  return y;
}

Tensor rmsnorm(Tape& tape, Param& g, const Tensor& x) {
  ops::RmsNormResult r = ops::rmsnorm(x, g.value, 1e-5f);
  tape.push("rmsnorm " + g.name, [&g, x, rstd = r.rstd](const Tensor& dy) {
    Tensor dg = Tensor::zeros(g.value.shape(), g.value.dtype());
    Tensor dx = ops::rmsnorm_backward(x, g.value, rstd, dy, dg);
    g.accumulate_grad(dg);
    return dx;
  });
  return r.y;
}

Tensor silu(Tape& tape, const Tensor& x) {
  Tensor y = ops::silu(x);
  tape.push("silu", [x](const Tensor& dy) { return ops::silu_backward(x, dy); });
  return y;
}

struct Block {
  Param norm, up, down;
  // x + down(silu(up(norm(x)))): the residual branch runs on a nested tape.
  Tensor forward(Tape& tape, const Tensor& x) {
    auto branch = std::make_shared<Tape>();
    Tensor h = linear(*branch, down, silu(*branch, linear(*branch, up, rmsnorm(*branch, norm, x))));
    tape.push("residual", [branch](const Tensor& dy) { return ops::add(dy, branch->backward(dy)); });
    return ops::add(x, h);
  }
};

struct Net {
  std::vector<Block> blocks;
  Param head;
  explicit Net(int layers) {
    const std::int64_t d = 6, hidden = 10, classes = 4;
    std::uint64_t seed = 100;
    for (int l = 0; l < layers; ++l)
      blocks.push_back({Param("norm" + std::to_string(l), ops::rand({d}, seed++, Device::cpu(), 0.5f, 1.5f).to(DType::f64)),
                        Param("up" + std::to_string(l), ops::randn({hidden, d}, seed++, Device::cpu(), 0, 0.5f).to(DType::f64)),
                        Param("down" + std::to_string(l), ops::randn({d, hidden}, seed++, Device::cpu(), 0, 0.5f).to(DType::f64))});
    head = Param("head", ops::randn({classes, d}, seed++).to(DType::f64));
  }
  std::vector<Param*> params() {
    std::vector<Param*> p;
    for (Block& b : blocks) p.insert(p.end(), {&b.norm, &b.up, &b.down});
    p.push_back(&head);
    return p;
  }
  // Mean cross-entropy; fills gradients when backward is true.
  double loss(const Tensor& x, const Tensor& targets, bool backward, bool checkpointed) {
    Tape tape;
    Tensor h = x;
    for (Block& b : blocks) {
      if (checkpointed)
        h = autograd::checkpoint(tape, "block", [&b](Tape& t, const Tensor& in) { return b.forward(t, in); }, h);
      else
        h = b.forward(tape, h);
    }
    Tensor dh;
    Tensor dhead = Tensor::zeros(head.value.shape(), DType::f64);
    const ops::LinearCrossEntropyResult r =
        ops::linear_cross_entropy(h, head.value, targets, 2, backward ? &dh : nullptr, backward ? &dhead : nullptr);
    if (backward) {
      head.accumulate_grad(dhead);
      tape.backward(dh);
    }
    return r.loss;
  }
};

}  // namespace

TEST_CASE("autograd: tape backward through a residual network matches float64 finite differences") {
  Net net(2);
  const Tensor x = ops::randn({5, 6}, 7).to(DType::f64);
  const Tensor targets = Tensor::from(std::vector<std::int32_t>{0, 3, -100, 1, 2}, {5});
  net.loss(x, targets, true, false);
  for (Param* p : net.params()) {
    INFO(p->name);
    REQUIRE(p->grad.defined());
    const Tensor analytic = p->grad.clone();
    const double err = autograd::gradient_error([&] { return net.loss(x, targets, false, false); }, p->value, analytic);
    CHECK(err < 1e-7);
  }
}

TEST_CASE("autograd: checkpointed blocks give the same gradients and hold fewer activations") {
  Net plain(3), ckpt(3);
  const Tensor x = ops::randn({5, 6}, 7).to(DType::f64);
  const Tensor targets = Tensor::from(std::vector<std::int32_t>{0, 3, 2, 1, 2}, {5});
  const double l0 = plain.loss(x, targets, true, false);
  const double l1 = ckpt.loss(x, targets, true, true);
  CHECK(l0 == l1);
  const auto pp = plain.params(), cp = ckpt.params();
  for (std::size_t i = 0; i < pp.size(); ++i) {
    INFO(pp[i]->name);
    CHECK(pp[i]->grad.to_vector<double>() == cp[i]->grad.to_vector<double>());
  }

  // Memory held by the tape after the forward pass: every activation without checkpointing, only the
  // block inputs with it.
  auto held_after_forward = [&](Net& net, bool checkpointed) {
    const std::size_t before = CpuAllocator::instance().stats().allocated_bytes;
    Tape tape;
    Tensor h = x.clone();
    for (Block& b : net.blocks)
      h = checkpointed ? autograd::checkpoint(tape, "block", [&b](Tape& t, const Tensor& in) { return b.forward(t, in); }, h)
                       : b.forward(tape, h);
    return CpuAllocator::instance().stats().allocated_bytes - before;
  };
  CHECK(held_after_forward(ckpt, true) < held_after_forward(plain, false) / 2);
}

TEST_CASE("autograd: frozen params receive no gradient and the tape empties after backward") {
  Param frozen("base", ops::randn({3, 4}, 1).to(DType::f64), false);
  Tape tape;
  const Tensor x = ops::randn({2, 4}, 2).to(DType::f64);
  Tensor y = linear(tape, frozen, x);
  CHECK(tape.names() == std::vector<std::string>{"linear base"});
  const Tensor dx = tape.backward(ops::randn({2, 3}, 3).to(DType::f64));
  CHECK(dx.shape() == x.shape());
  CHECK(!frozen.grad.defined());
  CHECK(tape.empty());
  frozen.requires_grad = true;
  CHECK_THROWS_WITH_AS(frozen.accumulate_grad(Tensor::zeros({2, 2}, DType::f64)),
                       "gradient of shape (2, 2) for parameter 'base' of shape (3, 4)", Error);
}
