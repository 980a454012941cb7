// NcclCommunicator (include/qlora/dist/nccl_communicator.hpp): NCCL collectives on the current stream, the
// unique id and the host-side helpers carried by a host communicator. Compiled only with NCCL.

#if defined(QLORA_WITH_NCCL)

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <string>
#include <vector>

#include "common.cuh"
#include "qlora/cuda/runtime.hpp"
#include "qlora/dist/nccl_communicator.hpp"

#if NCCL_VERSION_CODE < NCCL_VERSION(2, 10, 0)
#error "qlora needs NCCL 2.10 or newer (ncclAvg, ncclBfloat16)"
#endif

namespace qlora::dist {
namespace {

void nccl_check(ncclResult_t result, const std::string& what) {
  if (result != ncclSuccess) throw Error("NCCL error in " + what + ": " + ncclGetErrorString(result));
}

// NCCL's element type for a reduction; raw copies (broadcast, gather) use bytes.
ncclDataType_t nccl_type(DType d) {
  switch (d) {
    case DType::f32: return ncclFloat32;
    case DType::bf16: return ncclBfloat16;
    case DType::f16: return ncclFloat16;
    case DType::f64: return ncclFloat64;
    case DType::i32: return ncclInt32;
    case DType::u8: return ncclUint8;
    case DType::i8: return ncclInt8;
    case DType::bytes: break;
  }
  throw Error("nccl communicator: no NCCL reduction type for " + std::string(dtype_name(d)));
}

}  // namespace

struct NcclCommunicator::State {
  std::shared_ptr<Communicator> host;
  ncclComm_t comm = nullptr;
  int device = 0;
  int rank = 0;
  int size = 1;

  std::string op(std::string_view call, const Tensor& t) const {
    return std::string(call) + " of " + t.str() + " (rank " + std::to_string(rank) + " of " + std::to_string(size) + ")";
  }
};

NcclCommunicator::NcclCommunicator(std::shared_ptr<Communicator> host, int device) : state_(std::make_unique<State>()) {
  if (!host) throw Error("nccl communicator: no host communicator to exchange the NCCL unique id over");
  State& s = *state_;
  s.host = std::move(host);
  s.rank = s.host->rank();
  s.size = s.host->size();
  s.device = device;
  if (device < 0 || device >= cuda::device_count())
    throw Error("nccl communicator: rank " + std::to_string(s.rank) + " was given cuda:" + std::to_string(device) +
                " but this node has " + std::to_string(cuda::device_count()) + " CUDA devices" +
                (cuda::device_count() ? "" : std::string(" (") + cuda::unavailable_reason() + ")"));
  cuda::set_device(device);

  // Rank 0 creates the id; an empty broadcast tells the others that it failed, so that no rank waits forever.
  ncclUniqueId id{};
  std::string bytes;
  std::string failure;
  if (s.rank == 0) {
    const ncclResult_t result = ncclGetUniqueId(&id);
    if (result == ncclSuccess) bytes.assign(id.internal, sizeof(id.internal));
    else failure = ncclGetErrorString(result);
  }
  bytes = s.host->broadcast_bytes(bytes, 0);
  if (bytes.size() != sizeof(id.internal))
    throw Error("nccl communicator: rank 0 could not create the NCCL unique id" + (failure.empty() ? "" : ": " + failure));
  std::memcpy(id.internal, bytes.data(), sizeof(id.internal));
  nccl_check(ncclCommInitRank(&s.comm, s.size, id, s.rank),
             "ncclCommInitRank (rank " + std::to_string(s.rank) + " of " + std::to_string(s.size) + " on cuda:" +
                 std::to_string(device) + ")");
}

NcclCommunicator::~NcclCommunicator() {
  if (!state_ || !state_->comm) return;
  // Destroying a communicator with collectives in flight is undefined: let them finish first.
  cudaSetDevice(state_->device);
  cudaDeviceSynchronize();
  ncclCommDestroy(state_->comm);
}

int NcclCommunicator::rank() const { return state_->rank; }
int NcclCommunicator::size() const { return state_->size; }
int NcclCommunicator::device() const { return state_->device; }
Communicator& NcclCommunicator::host() const { return *state_->host; }
bool NcclCommunicator::supports(Device device) const { return device == Device::cuda(state_->device); }

void NcclCommunicator::all_reduce_sum_(Tensor& t) {
  detail::check_reducible(*this, "all_reduce_sum_", t, false);
  cuda::set_device(state_->device);
  nccl_check(ncclAllReduce(t.data(), t.data(), std::size_t(t.numel()), nccl_type(t.dtype()), ncclSum, state_->comm,
                           cuda::current_stream()),
             state_->op("ncclAllReduce", t));
}

void NcclCommunicator::all_reduce_mean_(Tensor& t) {
  detail::check_reducible(*this, "all_reduce_mean_", t, true);
  cuda::set_device(state_->device);
  nccl_check(ncclAllReduce(t.data(), t.data(), std::size_t(t.numel()), nccl_type(t.dtype()), ncclAvg, state_->comm,
                           cuda::current_stream()),
             state_->op("ncclAllReduce (average)", t));
}

void NcclCommunicator::broadcast_(Tensor& t, int root) {
  detail::check_tensor(*this, "broadcast_", t);
  detail::check_root(*this, "broadcast_", root);
  cuda::set_device(state_->device);
  nccl_check(ncclBroadcast(t.data(), t.data(), t.nbytes(), ncclUint8, root, state_->comm, cuda::current_stream()),
             state_->op("ncclBroadcast", t));
}

Tensor NcclCommunicator::all_gather(const Tensor& t) {
  detail::check_gatherable(*this, "all_gather", t);
  State& s = *state_;
  // The ranks' (dtype, rank, dims) over the host communicator: leading dimensions may differ, the rest may not.
  constexpr int kFields = 2 + Shape::kMaxRank;
  std::vector<double> mine(kFields, 0.0);
  mine[0] = double(int(t.dtype()));
  mine[1] = t.rank();
  for (int i = 0; i < t.rank(); ++i) mine[std::size_t(2 + i)] = double(t.dim(i));
  const std::vector<double> all = s.host->all_gather(Tensor::from(mine, {1, kFields})).to_vector<double>();
  std::vector<std::int64_t> rows(static_cast<std::size_t>(s.size));
  std::int64_t total_rows = 0;
  for (int r = 0; r < s.size; ++r) {
    const double* theirs = all.data() + std::size_t(r) * kFields;
    bool same = theirs[0] == mine[0] && theirs[1] == mine[1];
    for (int i = 3; i < kFields; ++i) same = same && theirs[i] == mine[std::size_t(i)];
    if (!same)
      throw Error("nccl communicator: all_gather: rank " + std::to_string(r) +
                  " gathers a tensor of another dtype or trailing shape than rank " + std::to_string(s.rank) + "'s " + t.str());
    rows[std::size_t(r)] = std::int64_t(theirs[2]);
    total_rows += rows[std::size_t(r)];
  }
  cuda::set_device(s.device);
  Tensor out = Tensor::empty(t.shape().with_dim(0, total_rows), t.dtype(), t.device());
  const std::size_t row_bytes = std::size_t(t.shape().without_first().numel()) * dtype_size(t.dtype());
  bool even = true;
  for (std::int64_t r : rows) even = even && r == rows[0];
  char* recv = static_cast<char*>(out.data());
  if (even) {
    nccl_check(ncclAllGather(t.data(), recv, t.nbytes(), ncclUint8, s.comm, cuda::current_stream()),
               s.op("ncclAllGather", t));
    return out;
  }
  // Uneven shards: NCCL has no all-gather-v; one broadcast per rank in a group is the usual equivalent.
  nccl_check(ncclGroupStart(), "ncclGroupStart");
  std::size_t offset = 0;
  for (int r = 0; r < s.size; ++r) {
    const std::size_t bytes = std::size_t(rows[std::size_t(r)]) * row_bytes;
    if (bytes > 0)
      nccl_check(ncclBroadcast(r == s.rank ? t.data() : recv + offset, recv + offset, bytes, ncclUint8, r, s.comm,
                               cuda::current_stream()),
                 s.op("ncclBroadcast (all_gather)", t));
    offset += bytes;
  }
  nccl_check(ncclGroupEnd(), "ncclGroupEnd");
  return out;
}

void NcclCommunicator::barrier() {
  cuda::set_device(state_->device);
  cuda::synchronize_stream(cuda::current_stream());
  state_->host->barrier();
}

double NcclCommunicator::all_reduce_sum(double value) { return state_->host->all_reduce_sum(value); }

std::string NcclCommunicator::broadcast_bytes(const std::string& bytes, int root) {
  detail::check_root(*this, "broadcast_bytes", root);
  return state_->host->broadcast_bytes(bytes, root);
}

}  // namespace qlora::dist

#endif  // QLORA_WITH_NCCL
