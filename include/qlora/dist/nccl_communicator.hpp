#pragma once
// NcclCommunicator: collectives over NCCL for CUDA tensors (f32, bf16; also f64, f16, i32, u8, i8 sums).
// One communicator per process, on one device (by convention the rank's local rank on its node). Rank 0
// creates the ncclUniqueId and a host communicator (MPI, or the single-process one for a world of one)
// broadcasts it; the host communicator also carries barrier(), the scalar and the byte helpers.
//
// Tensor collectives are enqueued on cuda::current_stream() (the stream the ops use; set it to a
// communication stream to overlap) and return before they complete. all_gather also asks the host
// communicator for the ranks' leading dimensions, so it waits for every rank to reach it.
// Reductions are NCCL's (ring or tree by size and topology): not bitwise equal across world sizes.
// Only when built with CUDA and NCCL (QLORA_WITH_NCCL, defined by qlora_cuda when CMake found libnccl);
// definitions in cuda/dist/nccl_communicator.cu.

#if defined(QLORA_WITH_CUDA) && defined(QLORA_WITH_NCCL)

#include <memory>
#include <string>
#include <string_view>

#include "qlora/dist/communicator.hpp"

namespace qlora::dist {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `host`: each of its ranks joins with its own CUDA device index.
  NcclCommunicator(std::shared_ptr<Communicator> host, int device);
  ~NcclCommunicator() override;

  int rank() const override;
  int size() const override;
  std::string_view backend() const override { return "nccl"; }
  bool supports(Device device) const override;
  int device() const;
  Communicator& host() const;

  void all_reduce_sum_(Tensor& t) override;
  void all_reduce_mean_(Tensor& t) override;
  void broadcast_(Tensor& t, int root) override;
  Tensor all_gather(const Tensor& t) override;
  void barrier() override;

  double all_reduce_sum(double value) override;
  std::string broadcast_bytes(const std::string& bytes, int root) override;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace qlora::dist

#endif  // QLORA_WITH_CUDA && QLORA_WITH_NCCL
