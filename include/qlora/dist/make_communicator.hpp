#pragma once
// make_communicator(device): the communicator a program should use, chosen from how it was launched and
// where its tensors live.
//
//   launched                      host tensors (Device::cpu())      CUDA tensors (Device::cuda(i))
//   directly (world size 1)       single process                    single process
//   by mpirun / srun (world > 1)  MPI                               NCCL on cuda:<local rank>, id over MPI
//
// The launch is read from the environment: OpenMPI's OMPI_COMM_WORLD_{SIZE,RANK,LOCAL_RANK}, else PMI's
// PMI_SIZE / PMI_RANK (MPICH, Slurm), else torchrun-style WORLD_SIZE / RANK / LOCAL_RANK. A world larger
// than one that the build cannot serve (no MPI, or no NCCL for CUDA tensors) is an error, never a run
// where each process silently trains alone. When MPI is already initialized (an MpiRuntime in main) host
// tensors get the MPI communicator even in a world of one.

#include <cstdlib>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "qlora/core/device.hpp"
#include "qlora/core/error.hpp"
#include "qlora/dist/communicator.hpp"
#include "qlora/dist/single_process.hpp"
#if defined(QLORA_WITH_MPI)
#include "qlora/dist/mpi_communicator.hpp"
#include "qlora/dist/mpi_runtime.hpp"
#endif
#if defined(QLORA_WITH_CUDA) && defined(QLORA_WITH_NCCL)
#include "qlora/cuda/runtime.hpp"
#include "qlora/dist/nccl_communicator.hpp"
#endif

namespace qlora::dist {

// Where this process sits in the launch, as the launcher's environment tells.
struct LaunchEnvironment {
  int world_size = 1;
  int world_rank = 0;
  int local_rank = 0;
  std::string source;  // the variable world_size came from ("" when none was set)

  // How variables are looked up: std::getenv, or a table in tests.
  using Lookup = std::function<const char*(const char*)>;

  // Reads an integer variable; nullopt when unset, qlora::Error when set to something else.
  static std::optional<int> read_int(const Lookup& lookup, const char* name) {
    const char* text = lookup(name);
    if (!text) return std::nullopt;
    const std::string value(text);
    std::size_t used = 0;
    int parsed = -1;
    try {
      parsed = std::stoi(value, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != value.size() || parsed < 0)
      throw Error("environment variable " + std::string(name) + "='" + value + "' is not a non-negative integer");
    return parsed;
  }

  static LaunchEnvironment from_environment(const Lookup& lookup = [](const char* name) { return std::getenv(name); }) {
    struct Names {
      const char* size;
      const char* rank;
      const char* local_rank;
    };
    constexpr Names kLaunchers[] = {
        {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"},
        {"PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID"},
        {"WORLD_SIZE", "RANK", "LOCAL_RANK"},
    };
    LaunchEnvironment env;
    for (const Names& names : kLaunchers) {
      const std::optional<int> size = read_int(lookup, names.size);
      if (!size) continue;
      if (*size < 1) throw Error("environment variable " + std::string(names.size) + " is 0: a world needs a rank");
      env.world_size = *size;
      env.world_rank = read_int(lookup, names.rank).value_or(0);
      env.local_rank = read_int(lookup, names.local_rank).value_or(0);
      env.source = names.size;
      if (env.world_rank >= env.world_size)
        throw Error("environment variable " + std::string(names.rank) + "=" + std::to_string(env.world_rank) +
                    " is not below " + names.size + "=" + std::to_string(env.world_size));
      break;
    }
    return env;
  }
};

inline std::unique_ptr<Communicator> make_communicator(Device device) {
  const LaunchEnvironment env = LaunchEnvironment::from_environment();
  const std::string launch = "launched as rank " + std::to_string(env.world_rank) + " of " +
                             std::to_string(env.world_size) + " (" + env.source + ")";
  if (device.is_cpu()) {
#if defined(QLORA_WITH_MPI)
    if (env.world_size > 1 || MpiRuntime::initialized()) return std::make_unique<MpiCommunicator>();
#else
    if (env.world_size > 1)
      throw Error(launch + " but qlora was built without MPI (configure with -DQLORA_MPI=ON; needs libopenmpi-dev)");
#endif
    return std::make_unique<SingleProcessCommunicator>();
  }
  // CUDA tensors.
  if (env.world_size == 1) return std::make_unique<SingleProcessCommunicator>();
#if defined(QLORA_WITH_CUDA) && defined(QLORA_WITH_NCCL)
  std::shared_ptr<Communicator> host = make_communicator(Device::cpu());
  // One GPU per rank: the rank's place on its node picks the device (the caller's index is a default
  // only for a single rank, handled above).
  const int gpus = cuda::device_count();
  if (env.local_rank >= gpus)
    throw Error(launch + " with local rank " + std::to_string(env.local_rank) + " but this node has " +
                std::to_string(gpus) + " CUDA devices: start at most one rank per GPU");
  return std::make_unique<NcclCommunicator>(std::move(host), env.local_rank);
#else
  throw Error(launch + " with tensors on " + device.str() +
              " but qlora was built without NCCL (install libnccl-dev and reconfigure with CUDA)");
#endif
}

}  // namespace qlora::dist
