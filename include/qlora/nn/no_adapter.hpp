#pragma once
// NoAdapter: the Adapter policy of a frozen layer (the LM head, or a layer outside --targets).

#include <string>
#include <vector>

#include "qlora/autograd/param.hpp"
#include "qlora/nn/adapter_config.hpp"
#include "qlora/nn/context.hpp"

namespace qlora::nn {

class NoAdapter {
 public:
  NoAdapter(const AdapterShape&, std::int64_t, std::int64_t, const std::string&, std::uint64_t,
            DType = DType::f32, Device = Device::cpu()) {}
  AdapterShape shape() const { return {}; }
  std::vector<autograd::Param*> params() { return {}; }
  void forward(const Context&, const Tensor&, Tensor&, std::uint64_t) {}
  void backward(const Context&, const Tensor&, Tensor*) {}
  void reset_to_zero() {}
  void release_saved() {}
};

}  // namespace qlora::nn
