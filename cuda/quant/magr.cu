// MagR's proximal step: the prox of t * ||.||_inf on every (row, group) segment, a clip at level c.
// Launch: one block of 256 threads per segment (grid-stride over segments). Per segment, block reductions
// give ||v||_1 and max|v|; c is bracketed by 40 bisection steps on [0, max|v|] of the decreasing function
// f(c) = sum_j max(|v_j| - c, 0) (f(lo) > t >= f(hi)), then computed exactly on the bracket's support
// S = {j : |v_j| > lo} as c = (sum_S |v_j| - t) / |S|: the sort-based formula of the CPU twin
// (cpu/magr.hpp), without a sort. After 40 halvings the bracket is below f32 resolution of max|v|, so S is
// the twin's support up to entries equal to c in f32. f32 sums (the twin sums in f64): compare with a
// tolerance. The segment is re-read from global memory by each pass (L1/L2 resident: a row of 4096 floats
// is 16 KiB). Not done: a shared-memory copy of the segment, a warp per segment for small groups.

#include "common.cuh"
#include "qlora/cuda/magr.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

constexpr int kBisectionSteps = 40;

__global__ void linf_prox_kernel(const float* v, float* out, std::int64_t rows, std::int64_t cols,
                                 std::int64_t group, std::int64_t groups_per_row, float t) {
  for (std::int64_t s = blockIdx.x; s < rows * groups_per_row; s += gridDim.x) {
    const std::int64_t r = s / groups_per_row, begin = (s % groups_per_row) * group;
    const std::int64_t n = min(group, cols - begin);
    const float* vs = v + r * cols + begin;
    float* os = out + r * cols + begin;

    float l1 = 0.0f, vmax = 0.0f;
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float a = fabsf(vs[j]);
      l1 += a;
      vmax = fmaxf(vmax, a);
    }
    l1 = block_sum(l1);
    vmax = block_max(vmax);

    float c = INFINITY;  // t == 0: the identity
    if (t > 0.0f && l1 <= t) {
      c = 0.0f;
    } else if (t > 0.0f) {
      float lo = 0.0f, hi = vmax;
      for (int step = 0; step < kBisectionSteps; ++step) {
        const float mid = 0.5f * (lo + hi);
        float excess = 0.0f;
        for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) excess += fmaxf(fabsf(vs[j]) - mid, 0.0f);
        if (block_sum(excess) > t) lo = mid;
        else hi = mid;
      }
      float support = 0.0f, mass = 0.0f;
      for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const float a = fabsf(vs[j]);
        if (a > lo) {
          support += 1.0f;
          mass += a;
        }
      }
      support = block_sum(support);
      mass = block_sum(mass);
      c = fmaxf((mass - t) / support, 0.0f);
    }
    __syncthreads();  // every read of the segment is done before a write that may alias it
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) os[j] = fminf(fmaxf(vs[j], -c), c);
    __syncthreads();
  }
}

}  // namespace

void linf_prox_rows(const float* v, float* out, std::int64_t rows, std::int64_t cols, std::int64_t group, float t,
                    Stream stream) {
  if (rows <= 0 || cols <= 0) return;
  if (group <= 0) throw Error("cuda::linf_prox_rows: group must be positive, got " + std::to_string(group));
  const std::int64_t groups_per_row = ceil_div(cols, group);
  linf_prox_kernel<<<row_grid(rows * groups_per_row), kRowThreads, 0, stream>>>(v, out, rows, cols, group,
                                                                                 groups_per_row, t);
  check_launch("linf_prox_kernel");
}

}  // namespace qlora::cuda
