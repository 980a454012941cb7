#pragma once
// DenseBase: the Base policy of an unquantized layer, y = x W^T with W (d_out x d_in) in f32/f64 (CPU) or
// bf16/f32 (CUDA). Frozen: the base never receives a gradient.

#include <string>

#include "qlora/nn/context.hpp"
#include "qlora/ops/matmul.hpp"

namespace qlora::nn {

class DenseBase {
 public:
  explicit DenseBase(Tensor weight) : weight_(std::move(weight)) {
    if (!weight_.defined() || weight_.rank() != 2)
      throw Error("DenseBase: the weight must be a 2-D tensor (d_out x d_in), got " +
                  (weight_.defined() ? weight_.shape().str() : std::string("an undefined tensor")));
  }

  std::int64_t out_features() const { return weight_.dim(0); }
  std::int64_t in_features() const { return weight_.dim(1); }
  std::int64_t quant_group() const { return 0; }
  std::string describe() const { return "dense " + std::string(dtype_name(weight_.dtype())); }
  std::size_t storage_bytes() const { return weight_.nbytes(); }
  const Tensor& weight() const { return weight_; }

  // y = x W^T for x (N, d_in).
  Tensor forward(Context&, const Tensor& x) const { return ops::matmul(x, weight_in(x.dtype()), false, true); }
  // dx = dy W for dy (N, d_out).
  Tensor backward_input(Context&, const Tensor& dy) const { return ops::matmul(dy, weight_in(dy.dtype())); }

  // W itself (a CPU copy in dtype): what merging adds the adapter's dW to.
  Tensor dense_weight(DType dtype) const { return weight_.to(Device::cpu()).to(dtype); }

 private:
  Tensor weight_in(DType dtype) const { return weight_.dtype() == dtype ? weight_ : weight_.to(dtype); }
  Tensor weight_;
};

}  // namespace qlora::nn
