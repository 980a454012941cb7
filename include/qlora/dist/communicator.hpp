#pragma once
// Communicator: the collective operations of data parallelism among `size()` processes (ranks), whatever
// carries them: SingleProcessCommunicator (size 1), MpiCommunicator (host tensors over MPI),
// NcclCommunicator (CUDA tensors over NCCL). docs/distributed.md describes the design.
//
// Every rank must call the same collectives in the same order with tensors of the same shape and dtype
// (all_gather: the same trailing shape). Calls ending in '_' work in place. Tensor collectives of a CUDA
// backend are enqueued on cuda::current_stream() and return before they complete; the scalar and byte
// helpers and barrier() always return with the result on the host.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"

namespace qlora::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "single", "mpi" or "nccl": for messages and logs.
  virtual std::string_view backend() const = 0;
  // Whether tensors on `device` can take part in this backend's tensor collectives.
  virtual bool supports(Device device) const = 0;

  // t = sum over ranks of t.  f32, f64, i32, u8 (and bf16 on NCCL); integers wrap like their C++ type.
  virtual void all_reduce_sum_(Tensor& t) = 0;
  // t = (sum over ranks of t) / size().  Floating dtypes only.
  virtual void all_reduce_mean_(Tensor& t) = 0;
  // t = root's t on every rank.  Any dtype (the bytes are copied).
  virtual void broadcast_(Tensor& t, int root) = 0;
  // Returns the ranks' tensors concatenated along dim 0, rank 0 first. The leading dimension may differ
  // between ranks (an uneven shard); the trailing shape and the dtype may not.
  virtual Tensor all_gather(const Tensor& t) = 0;
  // Returns when every rank has reached it (and, on a CUDA backend, when this rank's current stream is done).
  virtual void barrier() = 0;

  // Host scalars and bytes, for metrics, rank-0 decisions and the NCCL unique id.
  virtual double all_reduce_sum(double value) = 0;
  // The element-wise sum over ranks of host doubles (every rank passes as many). The default issues one
  // scalar all-reduce per element; the MPI backend sends them in one collective.
  virtual std::vector<double> all_reduce_sums(std::vector<double> values) {
    for (double& v : values) v = all_reduce_sum(v);
    return values;
  }
  // Returns root's `bytes` on every rank (the other ranks' argument is ignored; its length may differ).
  virtual std::string broadcast_bytes(const std::string& bytes, int root) = 0;

  bool is_root() const { return rank() == 0; }

 protected:
  Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;
};

namespace detail {

// The checks every backend makes before a tensor collective, with messages naming the operation, the
// backend and the tensor. They depend only on this rank's arguments, so all ranks throw alike when
// they are called alike.
inline std::string where(std::string_view backend, std::string_view op) {
  return std::string(backend) + " communicator: " + std::string(op);
}

inline void check_tensor(const Communicator& comm, std::string_view op, const Tensor& t) {
  if (!t.defined()) throw Error(where(comm.backend(), op) + ": the tensor is undefined");
  if (!comm.supports(t.device()))
    throw Error(where(comm.backend(), op) + ": " + t.str() + " is on a device this backend does not reach" +
                (t.device().is_cuda() ? " (CUDA tensors need the NCCL communicator)"
                                      : " (host tensors need the MPI or single-process communicator)"));
}

inline bool is_integer(DType t) { return t == DType::i32 || t == DType::u8 || t == DType::i8; }

// Sums: floating and integer dtypes; means: floating dtypes (an integer mean would silently truncate).
inline void check_reducible(const Communicator& comm, std::string_view op, const Tensor& t, bool mean) {
  check_tensor(comm, op, t);
  const DType d = t.dtype();
  const bool ok = mean ? is_floating(d) : (is_floating(d) || is_integer(d));
  if (!ok)
    throw Error(where(comm.backend(), op) + ": cannot " + (mean ? "average" : "sum") + " " + t.str() +
                (mean ? " (only floating dtypes have a mean)" : " (raw bytes have no sum)"));
}

inline void check_root(const Communicator& comm, std::string_view op, int root) {
  if (root < 0 || root >= comm.size())
    throw Error(where(comm.backend(), op) + ": root rank " + std::to_string(root) + " is not in [0, " +
                std::to_string(comm.size()) + ")");
}

inline void check_gatherable(const Communicator& comm, std::string_view op, const Tensor& t) {
  check_tensor(comm, op, t);
  if (t.rank() < 1) throw Error(where(comm.backend(), op) + ": " + t.str() + " has no leading dimension to concatenate along");
}

}  // namespace detail
}  // namespace qlora::dist
