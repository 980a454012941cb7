#pragma once
// CPU twin of GPTQ's column loop (baselines.md section 3; IST-DASLab/gptq `gptq.py`, GPTQ.fasterquant): the
// pointer-level part that a CUDA kernel (cuda/quant/gptq.cu) mirrors. The Tensor-level driver, the
// Hessian preparation and the lazy trailing update (a GEMM) are in qlora/quant/gptq.hpp.
//
// For one lazy block of columns [begin, end) and one row r (rows are independent; they share U):
//   for col in [begin, end):
//     if the grid of col's group is fitted in the loop and col starts the group:
//         fit it on the row's current weights of the group (columns past `end` get the pending updates of
//         the block's earlier columns added on the fly, so the fit sees exactly what blocksize 1 would)
//     code = encode(w[col]);  q = decode(code)
//     e = (w[col] - q) / U[col, col];     err[col - begin] = e
//     w[j] -= e * U[col, j]               for j in (col, end)
// and the caller then applies W[:, end:] -= Err U[begin:end, end:].
//
// Layout (shared with the CUDA kernel, so that one thread per row reads coalesced): the working weights are
// transposed, wt [cols, rows] (column c of W is the contiguous row c of wt, in the possibly act-order-permuted
// column order); err [block, rows]; codes [cols, rows]; U [cols, cols] row-major (upper triangular); grids
// [rows, groups_per_row] in natural group order.
//
// Every f32 step is one separately rounded operation (cpu/quant_fp.hpp), so the kernel reproduces the
// twin's in-block arithmetic bit for bit; only the trailing GEMM sums in another order.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "qlora/cpu/parallel.hpp"
#include "qlora/cpu/quant_fp.hpp"
#include "qlora/cpu/quant_int.hpp"
#include "qlora/cpu/quant_nf4.hpp"

namespace qlora::cpu {

// The grid family GPTQ quantizes onto. The grid of a group is an IntGrid: for NF4, scale holds the block
// absmax c (zero unused), so that one grid array serves every scheme.
struct GptqGridFormat {
  bool nf4 = false;
  IntKind kind = IntKind::asym;  // int / dint
  int bits = 4;
  bool mse_search = false;
  float range_shrink = 1.f;  // MagR's beta: each int grid's top moved to lo + beta (hi - lo) (int_group_grid)
};

// The grid of a group of n values: RTN's (int_group_grid, possibly MagR-shrunk, or the NF4 absmax of
// quantize_nf4_block).
QLORA_HD IntGrid gptq_fit_grid(const GptqGridFormat& f, const float* w, std::int64_t n) {
  if (!f.nf4) return int_group_grid(f.kind, f.bits, f.mse_search, w, n, f.range_shrink);
  float c = 0.f;
  for (std::int64_t j = 0; j < n; ++j) c = std::max(c, std::fabs(w[j]));
  return IntGrid{c, 0.f};
}

QLORA_HD std::uint8_t gptq_encode(const GptqGridFormat& f, float w, IntGrid g) {
  if (!f.nf4) return encode_int(f.kind, f.bits, w, g);
  return g.scale > 0.f ? nf4_encode(div_rn(w, g.scale)) : kNf4ZeroCode;
}

QLORA_HD float gptq_decode(const GptqGridFormat& f, std::uint8_t code, IntGrid g) {
  return f.nf4 ? nf4_decode(code, g.scale) : decode_int(f.kind, f.bits, code, g);
}

// a - b * c with two roundings (never an FMA): the update of GPTQ's loop.
QLORA_HD float gptq_subtract_product(float a, float b, float c) { return add_rn(a, -mul_rn(b, c)); }

// What one block of the column loop reads and writes (host pointers for the twin, device pointers for the
// kernel). Sizes in elements.
struct GptqColumnLoop {
  GptqGridFormat format;
  std::int64_t rows = 0, cols = 0;
  const float* u = nullptr;               // [cols, cols] upper Cholesky factor of H^-1, row-major
  const float* wt = nullptr;              // [cols, rows] working weights, transposed (read past the block)
  float* err = nullptr;                   // [block, rows] scaled errors e of the current block
  std::uint8_t* codes = nullptr;          // [cols, rows] output codes, transposed
  IntGrid* grids = nullptr;               // [rows, groups_per_row]
  std::int64_t groups_per_row = 1;
  const std::int32_t* group_of_column = nullptr;  // [cols] grid index within a row of (permuted) column c
  std::int64_t fit_group = 0;             // > 0: fit the grid of group col / fit_group when col starts it
};

// The column loop of block [begin, end) for row r. w1[i * stride] is the row's weight of column begin + i
// (stride 1 on the CPU's row-major tile, rows on the GPU's transposed array); fit_buffer holds fit_group
// floats.
QLORA_HD void gptq_block_row(const GptqColumnLoop& p, std::int64_t begin, std::int64_t end, std::int64_t r, float* w1,
                             std::int64_t stride, float* fit_buffer) {
  const std::int64_t count = end - begin, rows = p.rows, cols = p.cols;
  for (std::int64_t i = 0; i < count; ++i) {
    const std::int64_t col = begin + i;
    if (p.fit_group > 0 && col % p.fit_group == 0) {
      const std::int64_t n = std::min(p.fit_group, cols - col);
      for (std::int64_t t = 0; t < n; ++t) {
        const std::int64_t j = col + t;
        if (j < end) {
          fit_buffer[t] = w1[(j - begin) * stride];
        } else {  // not yet updated by this block's earlier columns: add their updates in column order
          float v = p.wt[j * rows + r];
          for (std::int64_t k = begin; k < col; ++k) v = gptq_subtract_product(v, p.err[(k - begin) * rows + r], p.u[k * cols + j]);
          fit_buffer[t] = v;
        }
      }
      p.grids[r * p.groups_per_row + col / p.fit_group] = gptq_fit_grid(p.format, fit_buffer, n);
    }
    const IntGrid grid = p.grids[r * p.groups_per_row + p.group_of_column[col]];
    const float w = w1[i * stride];
    const std::uint8_t code = gptq_encode(p.format, w, grid);
    p.codes[col * rows + r] = code;
    const float* u_row = p.u + col * cols;
    const float e = div_rn(add_rn(w, -gptq_decode(p.format, code, grid)), u_row[col]);
    p.err[i * rows + r] = e;
    for (std::int64_t j = i + 1; j < count; ++j) w1[j * stride] = gptq_subtract_product(w1[j * stride], e, u_row[begin + j]);
  }
}

// The twin's block step: every row through gptq_block_row. Rows go in chunks of kRowTile; each chunk's
// columns [begin, end) are copied into a row-major tile first, so the per-row loop walks contiguous memory
// (the transposed array would be read with a stride of `rows` floats). The tile is not written back: the
// block's own columns are never read again once quantized.
inline void gptq_block_columns(const GptqColumnLoop& p, std::int64_t begin, std::int64_t end) {
  constexpr std::int64_t kRowTile = 64;
  const std::int64_t count = end - begin, rows = p.rows;
  const std::int64_t tiles = (rows + kRowTile - 1) / kRowTile;
#pragma omp parallel if (worth_parallel(rows * count * count / 2))
  {
    std::vector<float> tile(std::size_t(kRowTile * count)), fit(std::size_t(std::max<std::int64_t>(p.fit_group, 1)));
#pragma omp for schedule(static)
    for (std::int64_t t = 0; t < tiles; ++t) {
      const std::int64_t r0 = t * kRowTile, r1 = std::min(rows, r0 + kRowTile);
      for (std::int64_t i = 0; i < count; ++i)
        for (std::int64_t r = r0; r < r1; ++r) tile[std::size_t((r - r0) * count + i)] = p.wt[(begin + i) * rows + r];
      for (std::int64_t r = r0; r < r1; ++r) gptq_block_row(p, begin, end, r, tile.data() + (r - r0) * count, 1, fit.data());
    }
  }
}

}  // namespace qlora::cpu
