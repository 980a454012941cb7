#pragma once
// LowRank{p, k, r'}: the adapter of LoRA, Q-BLoRA, QA-LoRA and QA-BLoRA (methods/qblora.md):
//   y += s E_k( B( A( drop(P_p x) ) ) ),   A: r' x d_in/p,   B: d_out/k x r'
// Backward, with G_h = s E_k^T dy, u = drop(P_p x), v = u A^T (both saved by the forward):
//   dB += G_h^T v,   G_v = G_h B,   dA += G_v^T u,   dx += P_p^T drop_bwd(G_v A)
// Effective update dW = s E_k B A P_p, i.e. dW[o, i] = (s/p) (B A)[o/k, i/p]: constant on k x p tiles.

#include <cmath>
#include <string>
#include <vector>

#include "qlora/nn/merge.hpp"
#include "qlora/nn/pooled_io.hpp"
#include "qlora/ops/random.hpp"

namespace qlora::nn {

// An adapter written as an ordinary LoRA: dW = scale * B A with A (rank x d_in), B (d_out x rank). How
// Q-BLoRA is exported so that any PEFT user can load it (rank 2r).
struct PlainLora {
  Tensor A, B;
  float scale = 1.f;
};

class LowRank {
 public:
  // A: kaiming-uniform with a = sqrt(5) (PEFT's default: bound 1/sqrt(fan_in)) or xavier-uniform (QA-LoRA's
  // option); B = 0, so the layer starts as its base. Parameters are dtype (f32 masters; f64 for gradient
  // checks) on device, drawn from Philox with init_seed.
  LowRank(const AdapterShape& shape, std::int64_t d_out, std::int64_t d_in, const std::string& name,
          std::uint64_t init_seed, DType dtype = DType::f32, Device device = Device::cpu())
      : shape_(shape), d_out_(d_out), d_in_(d_in) {
    const std::int64_t fan_in = shape.pooled_in(d_in), rank = shape.rank;
    const float bound = shape.init == AdapterInit::xavier ? float(std::sqrt(6.0 / double(fan_in + rank)))
                                                          : float(1.0 / std::sqrt(double(fan_in)));
    A = autograd::Param(name + ".lora_A", ops::rand(Shape{rank, fan_in}, init_seed, device, -bound, bound).to(dtype));
    B = autograd::Param(name + ".lora_B", Tensor::zeros(Shape{shape.pooled_out(d_out), rank}, dtype, device));
  }

  autograd::Param A, B;

  const AdapterShape& shape() const { return shape_; }
  std::vector<autograd::Param*> params() { return {&A, &B}; }

  // y (N, d_out) += the adapter's output for x (N, d_in).
  void forward(const Context& ctx, const Tensor& x, Tensor& y, std::uint64_t dropout_seed) {
    dropout_seed_ = dropout_seed;
    u_ = detail::pooled_input(ctx, x, shape_, dropout_seed);
    v_ = ops::matmul(u_, detail::compute_copy(A, x), false, true);
    const Tensor h = ops::matmul(v_, detail::compute_copy(B, x), false, true);
    detail::add_repeated_output(y, h, shape_);
    if (!ctx.training) u_ = v_ = Tensor();  // inference keeps nothing for a backward
  }

  // After a merge: the adapter contributes nothing (B = 0), so the layer's output is the merged base's.
  void reset_to_zero() { B.value.zero_(); }

  // RA-LoRA (nn/rank_adaptive.hpp) changes the rank: new factors a (r2 x d_in/p) and b (d_out/k x r2) in the
  // parameters' dtype and device. The Params stay the same objects (the trainer's lists remain valid); their
  // gradients and the saved forward are dropped. The scale s is kept: it is frozen at alpha / r_init, so a rank
  // change never rescales what was learned (methods/ra-lora.md).
  void set_factors(Tensor a, Tensor b) {
    QLORA_CHECK(a.rank() == 2 && b.rank() == 2 && a.dim(0) == b.dim(1) && a.dim(0) >= 1 && a.dim(1) == A.value.dim(1) &&
                    b.dim(0) == B.value.dim(0) && a.dtype() == A.value.dtype() && b.dtype() == B.value.dtype() &&
                    a.device() == A.value.device() && b.device() == B.value.device(),
                A.name + ": new factors " + a.str() + " and " + b.str() + " do not fit the layer (" + A.value.str() +
                    ", " + B.value.str() + ")");
    shape_.rank = a.dim(0);
    A.value = std::move(a);
    B.value = std::move(b);
    A.grad = B.grad = Tensor();
    release_saved();
  }
  void release_saved() { u_ = v_ = Tensor(); }

  // Accumulates dA, dB from dy (N, d_out); adds the input gradient into dx (N, d_in) when dx is given.
  void backward(const Context& ctx, const Tensor& dy, Tensor* dx) {
    if (!u_.defined()) throw Error("LowRank::backward on " + A.name + " without a saved forward");
    const Tensor g_h = detail::pooled_output_grad(dy, shape_);
    detail::accumulate_matmul(B, g_h, v_, true, false);
    const Tensor g_v = ops::matmul(g_h, detail::compute_copy(B, dy));
    detail::accumulate_matmul(A, g_v, u_, true, false);
    if (dx != nullptr) detail::add_input_grad(ctx, *dx, ops::matmul(g_v, detail::compute_copy(A, dy)), shape_,
                                              dropout_seed_);
    u_ = Tensor();
    v_ = Tensor();
  }

  // The equivalent plain LoRA: A_full = (1/p) repeat_interleave(A, p, dim 1), B_full = repeat_interleave(B, k,
  // dim 0), same scale; on the CPU, in the parameters' dtype.
  PlainLora to_plain_lora() const {
    const Tensor a = A.value.to(Device::cpu()), b = B.value.to(Device::cpu());
    PlainLora out{Tensor::zeros(Shape{shape_.rank, d_in_}, a.dtype()), Tensor::zeros(Shape{d_out_, shape_.rank}, b.dtype()),
                  shape_.scale};
    Tensor a_cols = out.A;  // (rank, d_in) += (1/p) repeat along columns
    ops::repeat_add_(a_cols, a, shape_.pool, 1.0 / double(shape_.pool));
    visit_floating(b.dtype(), [&](auto t) {  // rows of B repeated k times
      using T = decltype(t);
      const T* src = b.data<T>();
      T* dst = out.B.data<T>();
      for (std::int64_t o = 0; o < d_out_; ++o)
        for (std::int64_t j = 0; j < shape_.rank; ++j) dst[o * shape_.rank + j] = src[(o / shape_.repeat) * shape_.rank + j];
    });
    return out;
  }

  // The update on the pooled grid, (s/p) B A (d_out/k x d_in/p): dW[o, i] = pooled_delta[o/k, i/p]. CPU.
  Tensor pooled_delta() const {
    return scaled_copy(ops::matmul(B.value.to(Device::cpu()), A.value.to(Device::cpu())),
                       double(shape_.scale) / double(shape_.pool));
  }

  // dW = s E_k B A P_p (d_out x d_in) on the CPU, in the parameters' dtype.
  Tensor delta_weight() const { return expand_delta(pooled_delta(), shape_.repeat, shape_.pool); }

 private:
  AdapterShape shape_;
  std::int64_t d_out_, d_in_;
  Tensor u_, v_;  // saved by forward for backward
  std::uint64_t dropout_seed_ = 0;
};

}  // namespace qlora::nn
