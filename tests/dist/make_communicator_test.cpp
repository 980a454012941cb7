// make_communicator and the launch environment it reads: which backend for which launch and device, and
// clear errors for launches the build cannot serve.

#include <doctest/doctest.h>

#include <cstdlib>
#include <map>
#include <string>

#include "dist/dist_test_util.hpp"
#include "qlora/dist/make_communicator.hpp"

using qlora::Device;
using qlora::Error;
using qlora::dist::LaunchEnvironment;

namespace {

// A fake environment: a table of variables.
LaunchEnvironment::Lookup table(std::map<std::string, std::string> vars) {
  return [vars = std::move(vars)](const char* name) -> const char* {
    const auto found = vars.find(name);
    return found == vars.end() ? nullptr : found->second.c_str();
  };
}

}  // namespace

TEST_CASE("dist launch environment: OpenMPI, PMI and torchrun variables, in that order") {
  const auto none = LaunchEnvironment::from_environment(table({}));
  CHECK(none.world_size == 1);
  CHECK(none.world_rank == 0);
  CHECK(none.local_rank == 0);
  CHECK(none.source.empty());

  const auto ompi = LaunchEnvironment::from_environment(table({{"OMPI_COMM_WORLD_SIZE", "8"},
                                                               {"OMPI_COMM_WORLD_RANK", "5"},
                                                               {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                                               {"WORLD_SIZE", "2"},
                                                               {"RANK", "0"}}));
  CHECK(ompi.world_size == 8);
  CHECK(ompi.world_rank == 5);
  CHECK(ompi.local_rank == 1);
  CHECK(ompi.source == "OMPI_COMM_WORLD_SIZE");

  const auto pmi = LaunchEnvironment::from_environment(table({{"PMI_SIZE", "4"}, {"PMI_RANK", "3"}}));
  CHECK(pmi.world_size == 4);
  CHECK(pmi.world_rank == 3);
  CHECK(pmi.local_rank == 0);

  const auto torchrun =
      LaunchEnvironment::from_environment(table({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"LOCAL_RANK", "1"}}));
  CHECK(torchrun.world_size == 2);
  CHECK(torchrun.world_rank == 1);
  CHECK(torchrun.local_rank == 1);
}

TEST_CASE("dist launch environment: malformed variables throw naming the variable") {
  CHECK_THROWS_WITH_AS(LaunchEnvironment::from_environment(table({{"OMPI_COMM_WORLD_SIZE", "two"}})),
                       doctest::Contains("OMPI_COMM_WORLD_SIZE='two'"), Error);
  CHECK_THROWS_WITH_AS(LaunchEnvironment::from_environment(table({{"WORLD_SIZE", "4x"}})),
                       doctest::Contains("WORLD_SIZE='4x'"), Error);
  CHECK_THROWS_WITH_AS(LaunchEnvironment::from_environment(table({{"WORLD_SIZE", "2"}, {"RANK", "2"}})),
                       doctest::Contains("RANK=2 is not below WORLD_SIZE=2"), Error);
  CHECK_THROWS_WITH_AS(LaunchEnvironment::from_environment(table({{"PMI_SIZE", "0"}})), doctest::Contains("PMI_SIZE"),
                       Error);
}

TEST_CASE("dist make_communicator: host tensors get a communicator spanning the launch") {
  const LaunchEnvironment env = LaunchEnvironment::from_environment();
  const auto comm = qlora::dist::make_communicator(Device::cpu());
  CHECK(comm->size() == env.world_size);
  CHECK(comm->rank() == env.world_rank);
#if defined(QLORA_WITH_MPI)
  CHECK(comm->backend() == "mpi");  // MPI is running (the suite's main started it), even in a world of one
#else
  CHECK(comm->backend() == "single");
#endif
  CHECK(comm->all_reduce_sum(1.0) == double(env.world_size));
}

#if !(defined(QLORA_WITH_CUDA) && defined(QLORA_WITH_NCCL))
TEST_CASE("dist make_communicator: CUDA tensors without NCCL work alone and refuse a larger world") {
  const LaunchEnvironment env = LaunchEnvironment::from_environment();
  if (env.world_size == 1) {
    const auto comm = qlora::dist::make_communicator(Device::cuda(0));
    CHECK(comm->backend() == "single");
    CHECK(comm->size() == 1);
  } else {
    CHECK_THROWS_WITH_AS(qlora::dist::make_communicator(Device::cuda(0)), doctest::Contains("without NCCL"), Error);
  }
}
#endif
