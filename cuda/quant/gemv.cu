// Fused dequantize-and-multiply GEMV / skinny GEMM for generation:
//   y[b, r] = sum_j x[b, j] * deq(W)[r, j]      x [batch, cols] f32 or bf16, 1 <= batch <= 16, y [batch, rows] f32
// CPU twin: cpu::gemv_packed (qlora/cpu/quant_gemv.hpp). Every weight element is decoded to the same f32
// value as the dequantization kernel (cuda/quant/packed.cuh) and multiplied in f32; the sums run in another
// order than the twin's, so the test compares by relative error (1e-5).
//
// What it does:
// * Reads the packed codes exactly once, straight from global memory with 16-byte loads (PackedUnit), never
//   writing a dequantized copy. Batch 1..16 shares each decoded weight: the codes of a row are read once for
//   the whole batch.
// * Each warp owns kRowsPerWarp = 2 output rows; a block of kWarps = 8 warps owns 16 consecutive rows, so the
//   grid is ceil(rows / 16) blocks. Lanes stride over the units (32 4-bit codes) of a row, each keeping
//   f32 partial sums for every (row, batch item) in registers; a warp reduction (shuffles) ends each row.
// * x is staged in shared memory as f32, tile by tile along the columns (a tile is a multiple of the unit and
//   fits 64 KiB for the whole batch), so x is read from L2 once per block and tile rather than once per row.
//   The tile is padded by one float per unit (x index j -> j + j / kCodes): lane l reads column l*kCodes + i
//   at step i, and without the pad every lane of a warp would hit the same shared-memory bank.
// * The batch is a compile-time bound (1, 4 or 16: the smallest that holds the batch) so that the
//   accumulators stay in registers (three buckets only: each is a full set of kernels to compile).
// What it does not do (yet):
// * No tensor cores: the multiply-adds are f32 FMAs on the CUDA cores. At batch 1 the kernel is bound by
//   the packed-weight bandwidth; at batch 16 it does 16 FMAs per decoded weight and becomes compute-bound
//   on an H100 (a Marlin-style mma.sync path over dequantized bf16 fragments is the next step).
// * No asynchronous copy pipeline (cp.async / TMA) or split-K: a matrix with few rows (< 16 * SM count * a
//   few) leaves SMs idle; the shapes of a 7B model (4096 and 11008 rows) fill an H100.
// * No lookup-table tricks for the int formats (code - zero is one f32 subtraction per element).

#include <algorithm>

#include "quant/packed.cuh"

namespace qlora::cuda {
namespace {

using namespace detail;

constexpr int kWarps = 8;
constexpr int kRowsPerWarp = 2;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kGemvThreads = kWarps * kWarpSize;
constexpr std::size_t kTileSharedBytes = 64 * 1024;

template <int kCodes>
__host__ __device__ __forceinline__ int padded(int j) {
  return j + j / kCodes;
}

template <int kBits, class TX, int kMaxBatch>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const QuantParams p, const TX* x, int batch, int tile_cols, float* y) {
  using Unit = PackedUnit<kBits>;
  constexpr int kCodes = Unit::kCodes;
  constexpr int kChunk = 16;  // the smallest group: the grid can change every 16 columns
  extern __shared__ float x_tile[];  // [batch][pitch], pitch = padded(tile_cols)
  __shared__ float levels[16];
  if (threadIdx.x < 16) levels[threadIdx.x] = p.nf4_levels[threadIdx.x];

  const std::int64_t rows = p.w.rows, cols = p.w.cols;
  const int pitch = padded<kCodes>(tile_cols);
  const int warp = int(threadIdx.x) / kWarpSize, lane = int(threadIdx.x) % kWarpSize;
  const std::int64_t row0 = std::int64_t(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp;

  float acc[kRowsPerWarp][kMaxBatch];
#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr)
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b) acc[rr][b] = 0.f;

  for (std::int64_t k0 = 0; k0 < cols; k0 += tile_cols) {
    const int tile = int(std::min<std::int64_t>(tile_cols, cols - k0));
    __syncthreads();  // the previous tile is no longer read
    for (int b = 0; b < batch; ++b)
      for (int j = threadIdx.x; j < tile_cols; j += kGemvThreads)
        x_tile[b * pitch + padded<kCodes>(j)] = j < tile ? to_f32(x[b * cols + k0 + j]) : 0.f;
    __syncthreads();

    const int units = (tile + kCodes - 1) / kCodes;  // tile_cols is a multiple of kCodes: units never straddle
    const std::int64_t first_unit = k0 / kCodes;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const std::int64_t row = row0 + rr;
      if (row >= rows) break;
      const std::uint8_t* codes = p.w.codes + row * p.row_bytes;
      for (int u = lane; u < units; u += kWarpSize) {
        Unit unit;
        unit.load(codes, first_unit + u, p.row_bytes);
        const int jt = u * kCodes;  // column of the unit's first code within the tile
#pragma unroll
        for (int c = 0; c < kCodes; c += kChunk) {
          // Columns past the row end decode padding codes against x = 0 (the tile is zero-filled), but their
          // group index must stay inside the row: clamp it to the row's last group.
          const std::int64_t j = std::min<std::int64_t>(k0 + jt + c, cols - 1);
          const GroupGrid grid = load_grid(p, row * p.groups_per_row + (j >> p.group_shift));
#pragma unroll
          for (int i = 0; i < kChunk; ++i) {
            const float w = decode_code(p, levels, unit.code(c + i), grid);
            const int xi = padded<kCodes>(jt + c + i);
#pragma unroll
            for (int b = 0; b < kMaxBatch; ++b)
              if (b < batch) acc[rr][b] = fmaf(w, x_tile[b * pitch + xi], acc[rr][b]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
    for (int b = 0; b < kMaxBatch; ++b) {
      if (b >= batch) break;
      const float sum = warp_sum(acc[rr][b]);
      const std::int64_t row = row0 + rr;
      if (lane == 0 && row < rows) y[std::int64_t(b) * rows + row] = sum;
    }
  }
}

// Columns of x staged per tile: the whole row when it fits, else as many whole warp-sweeps of units as fit
// kTileSharedBytes for the batch, else as many units as fit. Always a multiple of the unit's codes.
template <int kCodes>
int tile_columns(std::int64_t cols, int batch) {
  const std::int64_t floats = std::int64_t(kTileSharedBytes / sizeof(float)) / batch;
  std::int64_t fit = floats * kCodes / (kCodes + 1) / kCodes * kCodes;  // room for the padding
  const std::int64_t sweep = std::int64_t(kWarpSize) * kCodes;
  if (fit >= sweep) fit = fit / sweep * sweep;
  fit = std::max<std::int64_t>(fit, kCodes);
  const std::int64_t whole = ceil_div(cols, kCodes) * kCodes;
  return int(std::min(fit, whole));
}

template <int kBits, class TX, int kMaxBatch>
void launch_gemv_batch(const QuantParams& p, const TX* x, int batch, float* y, Stream stream) {
  constexpr int kCodes = PackedUnit<kBits>::kCodes;
  const int tile = tile_columns<kCodes>(p.w.cols, batch);
  const std::size_t shared_bytes = std::size_t(batch) * std::size_t(padded<kCodes>(tile)) * sizeof(float);
  auto* kernel = &gemv_kernel<kBits, TX, kMaxBatch>;
  allow_dynamic_shared_memory(kernel, shared_bytes, "gemv_kernel");
  const auto grid = unsigned(ceil_div(p.w.rows, kRowsPerBlock));
  kernel<<<grid, kGemvThreads, shared_bytes, stream>>>(p, x, batch, tile, y);
  check_launch("gemv_kernel");
}

template <int kBits, class TX>
void launch_gemv(const QuantParams& p, const TX* x, int batch, float* y, Stream stream) {
  if (batch <= 1) launch_gemv_batch<kBits, TX, 1>(p, x, batch, y, stream);
  else if (batch <= 4) launch_gemv_batch<kBits, TX, 4>(p, x, batch, y, stream);
  else launch_gemv_batch<kBits, TX, 16>(p, x, batch, y, stream);
}

}  // namespace

template <class TX>
void gemv(const PackedWeight& w, const TX* x, std::int64_t batch, float* y, Stream stream) {
  const QuantParams p = make_quant_params(w, "cuda::gemv");
  if (batch < 1 || batch > kGemvMaxBatch)
    throw Error("cuda::gemv: batch " + std::to_string(batch) + " is outside 1..16");
  if (w.rows >= (std::int64_t(1) << 31) / kRowsPerBlock)
    throw Error("cuda::gemv: " + std::to_string(w.rows) + " rows are too many for one grid");
  auto* xd = dev(x);
  switch (w.bits) {
    case 2: launch_gemv<2>(p, xd, int(batch), y, stream); break;
    case 3: launch_gemv<3>(p, xd, int(batch), y, stream); break;
    case 4: launch_gemv<4>(p, xd, int(batch), y, stream); break;
    case 8: launch_gemv<8>(p, xd, int(batch), y, stream); break;
  }
}

template void gemv<float>(const PackedWeight&, const float*, std::int64_t, float*, Stream);
template void gemv<qlora::bf16>(const PackedWeight&, const qlora::bf16*, std::int64_t, float*, Stream);

}  // namespace qlora::cuda
