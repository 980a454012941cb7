#pragma once
// CPU loops of COMQ (../shared/methods/comq.md; Zhang et al., arXiv 2403.07134, code AozhongZhang/COMQ
// quant.py): coordinate descent over the integer codes of each output row for the layer error
//   E_i = (w_i - q_i)^T H (w_i - q_i),   q_ij = scale_G * m(code_ij),   G = group of column j,
// with optional closed-form scale updates per (row, group). Rows are independent: one row per OpenMP
// iteration, each with its own scratch, so the result does not depend on the thread count.
//
// Coordinate step (comq.md "Coordinate update", H form): with everything but q_ij fixed, E_i is a 1-D
// quadratic in q_ij with minimiser t = q_ij + (H d)_j / H_jj, d = w_i - q_i; the new code is the grid value
// nearest t, the exact minimiser over the grid. (H d)_j = <H[j,:], d> is evaluated from the current
// residual at each step ("pull" form) instead of keeping the method file's running Rm = (W - Q) H ("push"
// form): the same work (one row of H per coordinate), no initial d_out x d_in^2 product, and no drift over
// thousands of rank-1 updates. d and the dot products are f64.
//
// Scale step (comq.md "Scale update"): with the codes fixed, E_i restricted to the scale of group G is a
// quadratic in that scale along the direction m_G (the levels of the group's codes):
//   E(s_old + e) = E(s_old) - 2 e m_G^T (H d)_G + e^2 m_G^T H_GG m_G,   e* = m_G^T (H d)_G / m_G^T H_GG m_G,
// the method file's delta_iG = k^T r / k^T H_GG k written as a correction. The new scale is s_old + e*
// rounded to f16 (the stored format); since s_old is itself an f16 value, the rounded optimum is never
// farther from the optimum than s_old, and the exact change above is checked before a step is taken.
//
// The decisions of a step (start value, greedy key, coordinate and scale steps) are QLORA_HD functions that the
// CUDA twin (cuda/quant/comq.cu) calls as they are; only the dot products and their summation order differ.
//
// Monotonicity: every accepted step lowers or keeps E_i in exact arithmetic (a new code is taken only when
// it is strictly nearer t than the current value), so starting from RTN codes E_i never rises above RTN's.
// Starting from the weights themselves (the released code's Q = W), the first sweep is sequential rounding
// with error feedback and carries no such guarantee.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "qlora/core/half.hpp"
#include "qlora/cpu/parallel.hpp"
#include "qlora/cpu/quant_int.hpp"

namespace qlora::cpu {

struct ComqSettings {
  IntKind kind = IntKind::asym;
  int bits = 4;
  std::int64_t group = 0;          // columns per group (the whole row: cols)
  int sweeps = 1;                  // code sweeps, each followed by a scale update when update_scales
  bool greedy_order = true;        // per row, columns by |w_ij| sqrt(H_jj) descending; else natural order
  bool update_scales = false;      // closed-form per-(row, group) scale after each sweep
  bool start_from_weights = false; // Q = W before the first sweep (released code); else the given codes
};

// <h[0..n), d[0..n)> in f64 with four running sums (so the compiler can vectorise without reassociating).
template <class HT>
double dot_f64(const HT* h, const double* d, std::int64_t n) {
  double acc0 = 0, acc1 = 0, acc2 = 0, acc3 = 0;
  std::int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    acc0 += double(h[k]) * d[k];
    acc1 += double(h[k + 1]) * d[k + 1];
    acc2 += double(h[k + 2]) * d[k + 2];
    acc3 += double(h[k + 3]) * d[k + 3];
  }
  for (; k < n; ++k) acc0 += double(h[k]) * d[k];
  return (acc0 + acc1) + (acc2 + acc3);
}

// The code whose value on grid g is nearest t: the clamped uniform rounding (the nearest uniform level),
// and for dINT also its two half-step codes. Unlike dint_code's fixed thresholds this is the exact nearest
// level for any zero point, which the coordinate step needs.
QLORA_HD std::uint8_t nearest_int_code(IntKind kind, int bits, float t, IntGrid g) {
  const int qmax = int_qmax(kind, bits);
  std::uint8_t best = int_code(t, g, qmax);
  if (kind == IntKind::dint) {
    double best_dist = std::fabs(double(t) - double(decode_int(kind, bits, best, g)));
    for (int half = qmax + 1; half <= qmax + 2; ++half) {
      const double dist = std::fabs(double(t) - double(decode_int(kind, bits, std::uint8_t(half), g)));
      if (dist < best_dist) {
        best = std::uint8_t(half);
        best_dist = dist;
      }
    }
  }
  return best;
}

// The value q_j of a column before the first sweep: w_j itself for a Q = W start (columns with H_jj > 0;
// a dead column keeps its code), else the starting code's value. Always an f32 value, as every later q_j is
// (a grid value), so q is kept in f32 and only d = w - q needs f64.
QLORA_HD float comq_start_value(const ComqSettings& st, float w, bool active, std::uint8_t code, IntGrid g) {
  return st.start_from_weights && active ? w : decode_int(st.kind, st.bits, code, g);
}

// The greedy key of a column: |w_j| sqrt(H_jj), in f64 (a correctly rounded sqrt and product, so every
// backend computes the same key and the same order).
QLORA_HD double comq_greedy_key(float w, double h_jj) { return std::fabs(double(w)) * std::sqrt(h_jj); }

// One coordinate step (file comment): t = q_j + (H d)_j / H_jj and the grid code nearest t, taken when it is
// strictly nearer t than q_j, or always on the first visit of a Q = W start (off_grid). Returns whether the
// step is taken, with the new code and value.
QLORA_HD bool comq_coordinate_step(IntKind kind, int bits, float q, double hd, double h_jj, IntGrid grid, bool off_grid,
                                   std::uint8_t& code, float& value) {
  const double t = double(q) + hd / h_jj;
  code = nearest_int_code(kind, bits, float(t), grid);
  value = decode_int(kind, bits, code, grid);
  return off_grid || std::fabs(double(value) - t) < std::fabs(double(q) - t);
}

// One scale step (file comment) from num = m_G^T (H d)_G and den = m_G^T H_GG m_G: the optimum s + num / den
// rounded to f16, taken only when the exact change of E_i, e^2 den - 2 e num, is negative. Returns whether
// the scale moves, with the new scale.
QLORA_HD bool comq_scale_step(float scale, double num, double den, float& new_scale) {
  if (!(den > 0)) return false;
  const double optimum = double(scale) + num / den;
  if (!(optimum > 0) || !(optimum < 65504.0)) return false;  // also refuses NaN; +inf is >= 65504
  new_scale = round_scale_to_f16(float(optimum));
  const double e = double(new_scale) - double(scale);
  return e * e * den - 2 * e * num < 0;  // take strict decreases only
}

// Per-thread scratch of comq_row (reused across the rows a thread handles).
struct ComqScratch {
  std::vector<float> q;              // current values of the row (f32 values: see comq_start_value)
  std::vector<double> d;             // residual w - q of the row
  std::vector<std::int64_t> order;   // columns in visiting order (those with H_jj > 0)
  std::vector<double> key;           // greedy keys
  std::vector<double> level;         // levels m of one group's codes (scale step)
};

// Columns of the row in the order the sweeps visit them: those with H_jj > 0 (a column with H_jj = 0 is an
// input that never fires; it does not enter E), by |w_j| sqrt(H_jj) descending when greedy (ties: lower
// column first), else ascending.
template <class HT>
void comq_column_order(const float* w, const HT* h, std::int64_t cols, bool greedy, ComqScratch& s) {
  s.order.clear();
  for (std::int64_t j = 0; j < cols; ++j)
    if (h[j * cols + j] > HT(0)) s.order.push_back(j);
  if (!greedy) return;
  s.key.resize(std::size_t(cols));
  for (const std::int64_t j : s.order) s.key[std::size_t(j)] = comq_greedy_key(w[j], double(h[j * cols + j]));
  std::stable_sort(s.order.begin(), s.order.end(),
                   [&](std::int64_t a, std::int64_t b) { return s.key[std::size_t(a)] > s.key[std::size_t(b)]; });
}

// One closed-form scale step per group of the row (block coordinate descent over the groups in order).
template <class HT>
void comq_update_row_scales(const ComqSettings& st, const float* w, const HT* h, std::int64_t cols,
                            const std::uint8_t* codes, IntGrid* grids, ComqScratch& s) {
  const std::int64_t gpr = (cols + st.group - 1) / st.group;
  std::vector<double>& level = s.level;
  level.resize(std::size_t(st.group));
  for (std::int64_t g = 0; g < gpr; ++g) {
    const std::int64_t begin = g * st.group, end = std::min(cols, begin + st.group);
    IntGrid& grid = grids[g];
    double num = 0;  // m_G^T (H d)_G
    for (std::int64_t j = begin; j < end; ++j) {
      const double m = double(int_level(st.kind, st.bits, codes[j], grid.zero));
      level[std::size_t(j - begin)] = m;
      if (m != 0.0) num += m * dot_f64(h + j * cols, s.d.data(), cols);
    }
    double den = 0;  // m_G^T H_GG m_G
    for (std::int64_t j = begin; j < end; ++j) {
      const double mj = level[std::size_t(j - begin)];
      if (mj == 0.0) continue;
      double row = 0;
      for (std::int64_t k = begin; k < end; ++k) row += double(h[j * cols + k]) * level[std::size_t(k - begin)];
      den += mj * row;
    }
    float scale = 0.f;
    if (!comq_scale_step(grid.scale, num, den, scale)) continue;
    grid.scale = scale;
    for (std::int64_t j = begin; j < end; ++j) {
      s.q[std::size_t(j)] = decode_int(st.kind, st.bits, codes[j], grid);
      s.d[std::size_t(j)] = double(w[j]) - double(s.q[std::size_t(j)]);
    }
  }
}

// COMQ on one row: w [cols] (f32), h [cols, cols] (symmetric, H_jj >= 0), codes [cols] (one per byte, the
// starting codes on input), grids [groups of the row] (scale f16-exact, zero); codes and scales are updated.
template <class HT>
void comq_row(const ComqSettings& st, const float* w, const HT* h, std::int64_t cols, std::uint8_t* codes,
              IntGrid* grids, ComqScratch& s) {
  s.q.resize(std::size_t(cols));
  s.d.resize(std::size_t(cols));
  for (std::int64_t j = 0; j < cols; ++j) {
    s.q[std::size_t(j)] = comq_start_value(st, w[j], h[j * cols + j] > HT(0), codes[j], grids[j / st.group]);
    s.d[std::size_t(j)] = double(w[j]) - double(s.q[std::size_t(j)]);
  }
  comq_column_order(w, h, cols, st.greedy_order, s);
  for (int sweep = 0; sweep < st.sweeps; ++sweep) {
    const bool off_grid = st.start_from_weights && sweep == 0;  // first visit of a Q = W start: always round
    for (const std::int64_t j : s.order) {
      std::uint8_t code = 0;
      float value = 0.f;
      if (comq_coordinate_step(st.kind, st.bits, s.q[std::size_t(j)], dot_f64(h + j * cols, s.d.data(), cols),
                               double(h[j * cols + j]), grids[j / st.group], off_grid, code, value)) {
        codes[j] = code;
        s.q[std::size_t(j)] = value;
        s.d[std::size_t(j)] = double(w[j]) - double(value);
      }
    }
    if (st.update_scales) comq_update_row_scales(st, w, h, cols, codes, grids, s);
  }
}

// COMQ on every row: w [rows, cols] f32, h [cols, cols] (HT = float or double), codes [rows, cols] unpacked
// (in: the start, e.g. RTN; out: COMQ's), grids [rows, ceil(cols / group)] (scales updated in place when
// update_scales). Inputs must be finite with H_jj >= 0 (checked at the Tensor level).
template <class HT>
void comq_rows(const ComqSettings& st, const float* w, const HT* h, std::int64_t rows, std::int64_t cols,
               std::uint8_t* codes, IntGrid* grids) {
  const std::int64_t gpr = (cols + st.group - 1) / st.group;
#pragma omp parallel if (qlora::cpu::worth_parallel(rows * cols * cols))
  {
    ComqScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t r = 0; r < rows; ++r)
      comq_row(st, w + r * cols, h, cols, codes + r * cols, grids + r * gpr, scratch);
  }
}

}  // namespace qlora::cpu
