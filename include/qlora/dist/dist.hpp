#pragma once
// The dist layer in one include: communicators (single process, MPI, NCCL as built), the factory that picks
// one from the launch, and the data-parallel gradient bucketer. docs/distributed.md.

#include "qlora/dist/communicator.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/gradient_bucketer.hpp"
#include "qlora/dist/make_communicator.hpp"
#include "qlora/dist/sharded_rows.hpp"
#include "qlora/dist/single_process.hpp"
#if defined(QLORA_WITH_MPI)
#include "qlora/dist/mpi_communicator.hpp"
#include "qlora/dist/mpi_runtime.hpp"
#endif
#if defined(QLORA_WITH_CUDA) && defined(QLORA_WITH_NCCL)
#include "qlora/dist/nccl_communicator.hpp"
#endif
