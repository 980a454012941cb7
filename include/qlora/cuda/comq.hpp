#pragma once
// CUDA kernels of COMQ (kernel layer; CPU twin: qlora/cpu/comq.hpp, which documents the coordinate and scale
// steps; maths: ../shared/methods/comq.md). The Tensor-level driver (qlora/quant/comq.hpp) checks the inputs,
// unpacks the starting codes on the host and calls these with device pointers on one stream:
//   comq_greedy_order   each row's visiting order (cpu::comq_column_order for every row at once)
//   comq_rows           the sweeps (cpu::comq_rows), from the codes and grids given, updated in place
// The natural order (greedy_order = false) needs no kernel: it is the same list of live columns for every row.

#include <cstddef>
#include <cstdint>

#include "qlora/cpu/comq.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

inline constexpr int kComqThreadsPerBlock = 256;

// Bytes of device scratch comq_greedy_order needs for a [rows, cols] weight.
std::size_t comq_greedy_order_scratch_bytes(std::int64_t rows, std::int64_t cols);

// order [rows, cols] i32: row r's columns by |w_rj| sqrt(H_jj) descending (ties: lower column first), the
// columns with H_jj = 0 after all others; the first (number of columns with H_jj > 0) entries of a row are
// cpu::comq_column_order's list. w [rows, cols] f32, h [cols, cols]; scratch of the size above.
void comq_greedy_order(const float* w, const float* h, std::int64_t rows, std::int64_t cols, std::int32_t* order,
                       void* scratch, std::size_t scratch_bytes, Stream stream);
void comq_greedy_order(const float* w, const double* h, std::int64_t rows, std::int64_t cols, std::int32_t* order,
                       void* scratch, std::size_t scratch_bytes, Stream stream);

// Bytes of device scratch comq_rows needs: 0 when a row's q (f32) and d (f64) fit in a block's shared memory
// (cols up to about 19k on an H100), else 12 * cols bytes for each resident block.
std::size_t comq_rows_scratch_bytes(std::int64_t rows, std::int64_t cols);

// The sweeps of cpu::comq_rows on every row: row r visits order[r * order_stride + i], i < active (order_stride
// 0: one list shared by all rows). codes [rows, cols] unpacked, grids [rows, ceil(cols / st.group)]: the start
// on input, COMQ's on output. w [rows, cols] f32, h [cols, cols] finite with H_jj >= 0. scratch: the bytes
// above (may be null when that is 0).
void comq_rows(const cpu::ComqSettings& st, const float* w, const float* h, std::int64_t rows, std::int64_t cols,
               const std::int32_t* order, std::int64_t order_stride, std::int64_t active, std::uint8_t* codes,
               cpu::IntGrid* grids, void* scratch, Stream stream);
void comq_rows(const cpu::ComqSettings& st, const float* w, const double* h, std::int64_t rows, std::int64_t cols,
               const std::int32_t* order, std::int64_t order_stride, std::int64_t active, std::uint8_t* codes,
               cpu::IntGrid* grids, void* scratch, Stream stream);

}  // namespace qlora::cuda
