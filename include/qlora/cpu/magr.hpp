#pragma once
// CPU twin of MagR's proximal step (../shared/methods/magr.md "Proximal gradient"; Zhang et al., NeurIPS 2024,
// code AozhongZhang/MagR MagR.py): the proximal operator of t * ||.||_inf applied to every (row, group)
// segment of a matrix. By Moreau decomposition prox_{t||.||inf}(v) = v - t Proj_{||u||_1 <= 1}(v / t), and
// with Duchi et al.'s (2008) l1-ball projection this is a clip:
//   ||v||_1 <= t:  0
//   otherwise:     clip(v, -c, c),  c = (C_rho - t) / rho,  mu = |v| sorted descending, C_k = mu_1 + ... + mu_k,
//                  rho = max{k : mu_k > (C_k - t) / k}      (so that sum_k max(|v_k| - c, 0) = t)
// The condition on k holds exactly for k <= rho, so only the largest entries need sorting: the top 64 are
// sorted first and the prefix widened (x4) until the condition fails or the segment is exhausted; the result
// is that of a full sort. Sums in f64. The CUDA kernel (cuda/quant/magr.cu) finds c by bisection instead.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

// The clip level c of prox_{t||.||inf} on v[0..n) (t > 0): 0 when ||v||_1 <= t. `scratch` is resized to n.
template <class T>
double linf_prox_level(const T* v, std::int64_t n, double t, std::vector<double>& scratch) {
  scratch.resize(std::size_t(n));
  double l1 = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    scratch[std::size_t(j)] = std::fabs(double(v[j]));
    l1 += scratch[std::size_t(j)];
  }
  if (l1 <= t) return 0.0;
  std::int64_t rho = 0;
  double c_rho = 0;
  for (std::int64_t k = std::min<std::int64_t>(n, 64);; k = std::min(n, 4 * k)) {
    std::partial_sort(scratch.begin(), scratch.begin() + k, scratch.end(), std::greater<double>());
    double c = 0;
    bool ended = false;
    for (std::int64_t i = 0; i < k; ++i) {
      c += scratch[std::size_t(i)];
      if (scratch[std::size_t(i)] * double(i + 1) > c - t) {
        rho = i + 1;
        c_rho = c;
      } else {
        ended = true;
        break;
      }
    }
    if (ended || k == n) break;
  }
  return (c_rho - t) / double(rho);
}

// out[r, G] = prox_{t ||.||_inf}(v[r, G]) for every row r of v [rows, cols] and every group G of `group`
// columns (the last group of a row may be shorter; group = cols: one segment per row). t = 0 copies v.
// out may alias v.
template <class T>
void linf_prox_rows(const T* v, T* out, std::int64_t rows, std::int64_t cols, std::int64_t group, double t) {
  const std::int64_t gpr = (cols + group - 1) / group;
#pragma omp parallel if (qlora::cpu::worth_parallel(rows * cols))
  {
    std::vector<double> scratch;
#pragma omp for
    for (std::int64_t s = 0; s < rows * gpr; ++s) {
      const std::int64_t r = s / gpr, begin = (s % gpr) * group, n = std::min(group, cols - begin);
      const T* vs = v + r * cols + begin;
      T* os = out + r * cols + begin;
      if (!(t > 0)) {
        std::copy(vs, vs + n, os);
        continue;
      }
      const double c = linf_prox_level(vs, n, t, scratch);
      for (std::int64_t j = 0; j < n; ++j) os[j] = T(std::clamp(double(vs[j]), -c, c));
    }
  }
}

}  // namespace qlora::cpu
