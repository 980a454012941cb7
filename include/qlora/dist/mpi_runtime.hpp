#pragma once
// MpiRuntime: MPI_Init_thread / MPI_Finalize as an object. A program started by mpirun joins its world;
// one started directly becomes a world of size 1 (MPI's singleton start), so the same binary runs both ways.
// Only with MPI (QLORA_WITH_MPI, defined by the qlora::backend target when CMake found an MPI).

#if defined(QLORA_WITH_MPI)

#include <mpi.h>

#include <string>

#include "qlora/core/error.hpp"

namespace qlora::dist {

// Throws qlora::Error naming the MPI call and MPI's own description of a failed return code.
inline void mpi_check(int code, const std::string& what) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, text, &length);
  throw Error("MPI error in " + what + ": " + std::string(text, std::size_t(length)));
}

class MpiRuntime {
 public:
  // Initializes MPI unless it already is (then this object owns nothing and finalizes nothing).
  // FUNNELED: only the thread that created the runtime calls MPI; OpenMP threads never do.
  explicit MpiRuntime(int* argc = nullptr, char*** argv = nullptr) {
    if (finalized()) throw Error("MPI was already finalized in this process: it cannot be initialized again");
    if (initialized()) return;
    int provided = 0;
    mpi_check(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    owner_ = true;
    // Errors come back as return codes (turned into qlora::Error) instead of aborting every rank.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~MpiRuntime() {
    if (owner_ && !finalized()) MPI_Finalize();
  }
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  bool owns_initialization() const { return owner_; }
  int world_rank() const { return query(MPI_Comm_rank); }
  int world_size() const { return query(MPI_Comm_size); }

  static bool initialized() {
    int flag = 0;
    MPI_Initialized(&flag);
    return flag != 0;
  }
  static bool finalized() {
    int flag = 0;
    MPI_Finalized(&flag);
    return flag != 0;
  }
  // For code that needs MPI without owning main(): starts a process-wide runtime, finalized at exit,
  // unless MPI is already running (from an MpiRuntime in main or from another library).
  static void ensure_initialized() {
    if (initialized()) return;
    static MpiRuntime process_runtime;
  }

 private:
  static int query(int (*fn)(MPI_Comm, int*)) {
    int value = 0;
    mpi_check(fn(MPI_COMM_WORLD, &value), "querying MPI_COMM_WORLD");
    return value;
  }

  bool owner_ = false;
};

}  // namespace qlora::dist

#endif  // QLORA_WITH_MPI
