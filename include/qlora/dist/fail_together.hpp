#pragma once
// fail_together(comm, fn): runs fn on this rank and makes a failure on any rank a failure on every rank.
//
// Ranks of a data-parallel job meet in collectives; one that throws while the others wait in the next
// collective would leave them waiting for ever (and MPI_Finalize on the failed rank waits for them too).
// Every step whose success may differ between ranks (reading files, rank 0 writing a checkpoint) runs
// inside fail_together: after fn, the ranks count the failures in one all-reduce (which is also a barrier,
// so no rank goes on before, say, rank 0 has finished writing); the failed rank rethrows its own error,
// the others throw one that points at it.

#include <exception>
#include <string>
#include <utility>

#include "qlora/core/error.hpp"
#include "qlora/dist/communicator.hpp"

namespace qlora::dist {

template <class Fn>
void fail_together(Communicator& comm, Fn&& fn) {
  std::exception_ptr failure;
  try {
    std::forward<Fn>(fn)();
  } catch (...) {
    failure = std::current_exception();
  }
  const double failures = comm.all_reduce_sum(failure ? 1.0 : 0.0);
  if (failure) std::rethrow_exception(failure);
  if (failures > 0)
    throw Error("rank " + std::to_string(comm.rank()) + " stops: " + std::to_string(int(failures)) + " other rank" +
                (failures > 1 ? "s" : "") + " failed (see their message)");
}

}  // namespace qlora::dist
