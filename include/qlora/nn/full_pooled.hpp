#pragma once
// FullPooled{p, k}: the single-matrix variant ("hira", methods/qblora.md, QA-HiRA shapes p = 4, k = 8):
//   y += s E_k( M drop(P_p x) ),   M: d_out/k x d_in/p,   rank up to min(d_out/k, d_in/p)
// Backward, with G_h = s E_k^T dy and u = drop(P_p x) saved: dM += G_h^T u,  dx += P_p^T drop_bwd(G_h M).
// M starts at 0 (the layer starts as its base) and still trains: dM does not depend on M.

#include <string>
#include <vector>

#include "qlora/nn/merge.hpp"
#include "qlora/nn/pooled_io.hpp"

namespace qlora::nn {

class FullPooled {
 public:
  FullPooled(const AdapterShape& shape, std::int64_t d_out, std::int64_t d_in, const std::string& name,
             std::uint64_t /*init_seed*/, DType dtype = DType::f32, Device device = Device::cpu())
      : M(name + ".hira_M", Tensor::zeros(Shape{shape.pooled_out(d_out), shape.pooled_in(d_in)}, dtype, device)),
        shape_(shape) {}

  autograd::Param M;

  const AdapterShape& shape() const { return shape_; }
  std::vector<autograd::Param*> params() { return {&M}; }

  void forward(const Context& ctx, const Tensor& x, Tensor& y, std::uint64_t dropout_seed) {
    dropout_seed_ = dropout_seed;
    u_ = detail::pooled_input(ctx, x, shape_, dropout_seed);
    detail::add_repeated_output(y, ops::matmul(u_, detail::compute_copy(M, x), false, true), shape_);
    if (!ctx.training) u_ = Tensor();  // inference keeps nothing for a backward
  }

  // After a merge: the adapter contributes nothing (M = 0).
  void reset_to_zero() { M.value.zero_(); }
  void release_saved() { u_ = Tensor(); }

  void backward(const Context& ctx, const Tensor& dy, Tensor* dx) {
    if (!u_.defined()) throw Error("FullPooled::backward on " + M.name + " without a saved forward");
    const Tensor g_h = detail::pooled_output_grad(dy, shape_);
    detail::accumulate_matmul(M, g_h, u_, true, false);
    if (dx != nullptr)
      detail::add_input_grad(ctx, *dx, ops::matmul(g_h, detail::compute_copy(M, dy)), shape_, dropout_seed_);
    u_ = Tensor();
  }

  // The update on the pooled grid, (s/p) M: dW[o, i] = pooled_delta[o/k, i/p]. CPU.
  Tensor pooled_delta() const { return scaled_copy(M.value.to(Device::cpu()), double(shape_.scale) / double(shape_.pool)); }

  // dW = s E_k M P_p (d_out x d_in) on the CPU, in the parameter's dtype.
  Tensor delta_weight() const { return expand_delta(pooled_delta(), shape_.repeat, shape_.pool); }

 private:
  AdapterShape shape_;
  Tensor u_;
  std::uint64_t dropout_seed_ = 0;
};

}  // namespace qlora::nn
