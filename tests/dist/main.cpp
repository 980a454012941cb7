// The main of the dist suite. With MPI it starts the MPI runtime first, so the same binary runs as world
// size 1 when started directly and as N ranks under `mpirun -np N`; every rank runs every test case (the
// collectives need all of them), and only rank 0 reports passing cases.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#if defined(QLORA_WITH_MPI)
#include "qlora/dist/mpi_runtime.hpp"
#endif

int main(int argc, char** argv) {
#if defined(QLORA_WITH_MPI)
  qlora::dist::MpiRuntime mpi(&argc, &argv);
  const int rank = mpi.world_rank();
#else
  const int rank = 0;
#endif
  doctest::Context context(argc, argv);
  if (rank != 0) context.setOption("minimal", true);  // failures only: one summary, not N
  return context.run();
}
