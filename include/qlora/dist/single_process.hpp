#pragma once
// SingleProcessCommunicator: the world of one rank. Every collective is the identity, so code written for
// data parallelism runs unchanged (and at no cost) in one process, on the host or on a GPU. It makes the
// same argument checks as the other backends so that a mistake shows up before the first mpirun.

#include <string>
#include <string_view>

#include "qlora/dist/communicator.hpp"

namespace qlora::dist {

class SingleProcessCommunicator final : public Communicator {
 public:
  SingleProcessCommunicator() = default;

  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string_view backend() const override { return "single"; }
  bool supports(Device) const override { return true; }

  void all_reduce_sum_(Tensor& t) override { detail::check_reducible(*this, "all_reduce_sum_", t, false); }
  void all_reduce_mean_(Tensor& t) override { detail::check_reducible(*this, "all_reduce_mean_", t, true); }
  void broadcast_(Tensor& t, int root) override {
    detail::check_tensor(*this, "broadcast_", t);
    detail::check_root(*this, "broadcast_", root);
  }
  Tensor all_gather(const Tensor& t) override {
    detail::check_gatherable(*this, "all_gather", t);
    return t.clone();  // a new tensor, as with more ranks: the caller may modify it freely
  }
  void barrier() override {}

  double all_reduce_sum(double value) override { return value; }
  std::vector<double> all_reduce_sums(std::vector<double> values) override { return values; }
  std::string broadcast_bytes(const std::string& bytes, int root) override {
    detail::check_root(*this, "broadcast_bytes", root);
    return bytes;
  }
};

// The world of one that code taking a Communicator& uses when it is given none (stateless, so one
// instance serves every caller).
inline Communicator& single_process() {
  static SingleProcessCommunicator world_of_one;
  return world_of_one;
}

}  // namespace qlora::dist
