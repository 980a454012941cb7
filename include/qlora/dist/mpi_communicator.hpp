#pragma once
// MpiCommunicator: collectives over MPI (OpenMPI from Debian) for host tensors: f32, f64, i32, u8, i8
// reductions; broadcast and all-gather of any dtype. It works on a private duplicate of the parent
// communicator, so its messages never mix with the program's own MPI traffic.
//
// Before each tensor collective the ranks compare the tensor's element count and dtype in one small
// all-reduce: a rank that disagrees makes every rank throw qlora::Error instead of reducing garbage or
// hanging. (The cost is one 32-byte all-reduce, negligible next to a gradient bucket.)
//
// Reduction order: MPI_Allreduce chooses its algorithm (ring, recursive doubling, ...) by message size and
// world size, so a float sum may round differently with another world size or message size. It is the same
// on every rank of one call, but results across world sizes agree to f32 tolerance, not bitwise.

#if defined(QLORA_WITH_MPI)

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/dist/communicator.hpp"
#include "qlora/dist/mpi_runtime.hpp"

namespace qlora::dist {

class MpiCommunicator final : public Communicator {
 public:
  // Collective over `parent`: every rank of it must construct its MpiCommunicator together.
  // Starts MPI (world size 1 outside mpirun) when nothing has yet.
  explicit MpiCommunicator(MPI_Comm parent = MPI_COMM_WORLD) {
    MpiRuntime::ensure_initialized();
    if (MpiRuntime::finalized()) throw Error("mpi communicator: MPI was already finalized in this process");
    mpi_check(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    mpi_check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiCommunicator() override {
    if (comm_ != MPI_COMM_NULL && !MpiRuntime::finalized()) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "mpi"; }
  bool supports(Device device) const override { return device.is_cpu(); }
  MPI_Comm comm() const { return comm_; }

  void all_reduce_sum_(Tensor& t) override {
    detail::check_reducible(*this, "all_reduce_sum_", t, false);
    check_agreement("all_reduce_sum_", t);
    all_reduce_in_place(t);
  }

  void all_reduce_mean_(Tensor& t) override {
    detail::check_reducible(*this, "all_reduce_mean_", t, true);
    check_agreement("all_reduce_mean_", t);
    all_reduce_in_place(t);
    if (size_ == 1) return;
    // Dividing (not multiplying by 1/size) rounds the mean once, as a direct computation would.
    visit_floating(t.dtype(), [&](auto zero) {
      using T = decltype(zero);
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        T* p = t.data<T>();
        const T n = T(size_);
        for (std::int64_t i = 0; i < t.numel(); ++i) p[i] /= n;
      }  // other floating dtypes were refused by all_reduce_in_place: MPI has no sum for them
    });
  }

  void broadcast_(Tensor& t, int root) override {
    detail::check_tensor(*this, "broadcast_", t);
    detail::check_root(*this, "broadcast_", root);
    check_agreement("broadcast_", t);
    char* bytes = static_cast<char*>(t.data());
    for_each_chunk(std::int64_t(t.nbytes()), [&](std::int64_t begin, int count) {
      mpi_check(MPI_Bcast(bytes + begin, count, MPI_BYTE, root, comm_), op_name("MPI_Bcast", t));
    });
  }

  Tensor all_gather(const Tensor& t) override {
    detail::check_gatherable(*this, "all_gather", t);
    // Every rank's (dtype, rank, dims): the leading dimensions make the output, the rest must agree.
    constexpr int kFields = 2 + Shape::kMaxRank;
    std::vector<std::int64_t> mine(kFields, 0), all(static_cast<std::size_t>(kFields * size_));
    mine[0] = std::int64_t(t.dtype());
    mine[1] = t.rank();
    for (int i = 0; i < t.rank(); ++i) mine[std::size_t(2 + i)] = t.dim(i);
    mpi_check(MPI_Allgather(mine.data(), kFields, MPI_INT64_T, all.data(), kFields, MPI_INT64_T, comm_),
              op_name("MPI_Allgather", t));
    std::int64_t rows = 0;
    std::vector<std::int64_t> row_counts(static_cast<std::size_t>(size_));
    for (int r = 0; r < size_; ++r) {
      const std::int64_t* theirs = all.data() + std::size_t(r) * kFields;
      bool same = theirs[0] == mine[0] && theirs[1] == mine[1];
      for (int i = 3; i < kFields; ++i) same = same && theirs[i] == mine[std::size_t(i)];
      if (!same)
        throw Error(detail::where(backend(), "all_gather") + ": rank " + std::to_string(r) +
                    " gathers a tensor of another dtype or trailing shape than rank " + std::to_string(rank_) +
                    "'s " + t.str());
      row_counts[std::size_t(r)] = theirs[2];
      rows += theirs[2];
    }
    Tensor out = Tensor::empty(t.shape().with_dim(0, rows), t.dtype(), Device::cpu());
    const std::int64_t row_bytes = t.shape().without_first().numel() * std::int64_t(dtype_size(t.dtype()));
    std::vector<int> counts(static_cast<std::size_t>(size_)), offsets(static_cast<std::size_t>(size_));
    std::int64_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      const std::int64_t bytes = row_counts[std::size_t(r)] * row_bytes;
      if (offset + bytes > INT_MAX)
        throw Error(detail::where(backend(), "all_gather") + ": the gathered tensor exceeds 2 GiB, MPI_Allgatherv's limit; gather in parts");
      counts[std::size_t(r)] = int(bytes);
      offsets[std::size_t(r)] = int(offset);
      offset += bytes;
    }
    mpi_check(MPI_Allgatherv(t.data(), int(t.nbytes()), MPI_BYTE, out.data(), counts.data(), offsets.data(), MPI_BYTE,
                             comm_),
              op_name("MPI_Allgatherv", t));
    return out;
  }

  void barrier() override { mpi_check(MPI_Barrier(comm_), "MPI_Barrier"); }

  double all_reduce_sum(double value) override {
    double sum = 0;
    mpi_check(MPI_Allreduce(&value, &sum, 1, MPI_DOUBLE, MPI_SUM, comm_), "MPI_Allreduce of a scalar");
    return sum;
  }

  std::vector<double> all_reduce_sums(std::vector<double> values) override {
    // The tensor path, on a view of the vector: the same agreement check and chunking.
    Tensor view = Tensor::wrap(values.data(), Shape{std::int64_t(values.size())}, DType::f64, Device::cpu(), [](void*) {});
    all_reduce_sum_(view);
    return values;
  }

  std::string broadcast_bytes(const std::string& bytes, int root) override {
    detail::check_root(*this, "broadcast_bytes", root);
    std::int64_t length = std::int64_t(bytes.size());
    mpi_check(MPI_Bcast(&length, 1, MPI_INT64_T, root, comm_), "MPI_Bcast of a byte count");
    std::string out = rank_ == root ? bytes : std::string(std::size_t(length), '\0');
    for_each_chunk(length, [&](std::int64_t begin, int count) {
      mpi_check(MPI_Bcast(out.data() + begin, count, MPI_BYTE, root, comm_), "MPI_Bcast of bytes");
    });
    return out;
  }

 private:
  // MPI counts are ints: large buffers go in chunks of at most 1 Gi elements.
  template <class Fn>
  static void for_each_chunk(std::int64_t n, Fn&& fn) {
    constexpr std::int64_t kChunk = std::int64_t(1) << 30;
    for (std::int64_t begin = 0; begin < n; begin += kChunk) fn(begin, int(std::min(kChunk, n - begin)));
  }

  std::string op_name(std::string_view call, const Tensor& t) const {
    return std::string(call) + " of " + t.str() + " (rank " + std::to_string(rank_) + " of " + std::to_string(size_) + ")";
  }

  static MPI_Datatype mpi_type(DType d) {
    switch (d) {
      case DType::f32: return MPI_FLOAT;
      case DType::f64: return MPI_DOUBLE;
      case DType::i32: return MPI_INT32_T;
      case DType::u8: return MPI_UINT8_T;
      case DType::i8: return MPI_INT8_T;
      default: return MPI_DATATYPE_NULL;
    }
  }

  void all_reduce_in_place(Tensor& t) {
    const MPI_Datatype type = mpi_type(t.dtype());
    if (type == MPI_DATATYPE_NULL)
      throw Error(detail::where(backend(), "all-reduce") + ": MPI has no sum for " + t.str() + "; reduce it in f32");
    char* bytes = static_cast<char*>(t.data());
    const std::size_t element = dtype_size(t.dtype());
    for_each_chunk(t.numel(), [&](std::int64_t begin, int count) {
      mpi_check(MPI_Allreduce(MPI_IN_PLACE, bytes + std::size_t(begin) * element, count, type, MPI_SUM, comm_),
                op_name("MPI_Allreduce", t));
    });
  }

  // One all-reduce of (n, -n, dtype, -dtype) with MAX: max == -max(-x) exactly when all ranks agree.
  void check_agreement(std::string_view op, const Tensor& t) {
    if (size_ == 1) return;
    const std::int64_t n = t.numel(), d = std::int64_t(t.dtype());
    std::int64_t values[4] = {n, -n, d, -d};
    mpi_check(MPI_Allreduce(MPI_IN_PLACE, values, 4, MPI_INT64_T, MPI_MAX, comm_), op_name("MPI_Allreduce", t));
    if (values[0] != -values[1] || values[2] != -values[3])
      throw Error(detail::where(backend(), op) + ": the ranks disagree on the tensor (this rank has " + t.str() +
                  "; element counts range over [" + std::to_string(-values[1]) + ", " + std::to_string(values[0]) +
                  "]): every rank must pass the same shape and dtype");
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace qlora::dist

#endif  // QLORA_WITH_MPI
