#pragma once
// Helpers of the dist suite: the world communicator of this process and rank-dependent inputs that every
// rank can recompute for every other rank, so the expected collective results are closed forms.

#include <cstdint>
#include <memory>
#include <vector>

#include "qlora/dist/make_communicator.hpp"
#include "support/random.hpp"

namespace qlora::test {

// The communicator of the host world: MPI (of size 1 without mpirun) when built with MPI, else single.
inline dist::Communicator& world() {
  static const std::unique_ptr<dist::Communicator> comm = dist::make_communicator(Device::cpu());
  return *comm;
}

// Rank r's input for a test: uniform in [-1, 1), seeded by (seed, r); never zeros, different per rank.
template <class T = float>
std::vector<T> rank_values(std::size_t n, std::uint64_t seed, int rank) {
  return random_vector<T>(n, seed * 1000 + std::uint64_t(rank));
}

// The sum over ranks 0..size-1 of rank_values, in double.
inline std::vector<double> sum_over_ranks(std::size_t n, std::uint64_t seed, int size) {
  std::vector<double> sum(n, 0.0);
  for (int r = 0; r < size; ++r) {
    const auto v = rank_values<double>(n, seed, r);
    for (std::size_t i = 0; i < n; ++i) sum[i] += v[i];
  }
  return sum;
}

}  // namespace qlora::test
