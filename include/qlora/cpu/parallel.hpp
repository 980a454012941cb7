#pragma once
// When a CPU kernel's OpenMP region is worth opening: one policy for the `#pragma omp parallel` regions
// of include/qlora/cpu/ (all but matmul.hpp's, below), used as
//   #pragma omp parallel for if (qlora::cpu::worth_parallel(rows * cols))
//
// Work is counted in scalar operations: elements read or written for streaming kernels (elementwise,
// convert, reductions, softmax, norms, packing, quantization: rows * cols), multiply-adds for products
// (attention: batch * heads * tq * tk * d). Constant factors per element (an exp, a philox draw) are
// ignored: the threshold is an order of magnitude, not a cost model.
//
// matmul.hpp does not use it: Eigen's GEMM decides its own threading (from 100k multiply-adds), and its
// blocking (the depth split kc) depends on the thread count, so forcing small products serial would
// change their bits for depths above ~256. Its batch loop keeps `if (batch > 1)` for the same reason.
//
// Why a threshold at all: a parallel region costs a fork and a join barrier, a few microseconds with
// idle cores but up to a scheduler time slice (milliseconds) when a worker's core is busy with other
// work. The small models trained on CPU (stories260K: dim 64, sequences of 128) run thousands of regions
// per step over a few thousand elements each; opening them all in parallel made training some 20 times
// slower with two threads on a shared machine than with one. Below kParallelMinWork a region runs on
// the calling thread (an `if` clause that is false gives a team of one), which costs tens of
// microseconds at most; above it the work repays the fork even when a worker has to be woken.
//
// Results never depend on this choice: every region that uses it gives each iteration its own outputs
// and its own scratch (no per-thread partial sums merged afterwards), so one thread or many compute the
// same bits.
//
// Override at build time with -DQLORA_PARALLEL_MIN_WORK=<n> (0 or 1: always parallel, as before).

#include <cstdint>

namespace qlora::cpu {

#ifdef QLORA_PARALLEL_MIN_WORK
inline constexpr std::int64_t kParallelMinWork = QLORA_PARALLEL_MIN_WORK;
#else
inline constexpr std::int64_t kParallelMinWork = std::int64_t(1) << 18;
#endif

// True when `work` scalar operations (see above) are enough to open a parallel region for.
constexpr bool worth_parallel(std::int64_t work) { return work >= kParallelMinWork; }

}  // namespace qlora::cpu
