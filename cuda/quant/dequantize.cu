// Dequantization of packed rows into an f32 or bf16 workspace (CPU twins: cpu::dequantize_int_rows,
// cpu::dequantize_nf4_rows; bit-exact in f32, bf16 = the f32 value rounded to nearest even).
//
// Launch: one thread per unit of packed codes (16 bytes; 48 for 3-bit, see PackedUnit), 256 threads a
// block, a grid-stride loop over the flattened (row, unit) index. A thread makes one 16-byte load (three
// for 3-bit), decodes its 16..128 codes in f32, re-reading its group's grid (scale, zero, or the NF4 block
// constant, decoded from the double quantization on the fly) when a 16-column chunk enters a new group,
// and writes them with 16-byte stores when every output row is 16-byte aligned (cols a multiple of 4 for
// f32, 8 for bf16), else element by element. Rows with a shorter last group need no special case: the
// group of column j is j >> log2(group).
// Not done yet: staging the output through shared memory so that a warp's stores are contiguous (each
// thread writes 64..512 contiguous bytes; the L2 merges them), and asynchronous copies (cp.async / TMA).

#include <algorithm>

#include "quant/packed.cuh"

namespace qlora::cuda {
namespace {

using namespace detail;

constexpr int kDequantThreads = 256;

template <int kBits, class T, bool kVectorStores>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_rows_kernel(const QuantParams p, std::int64_t row_begin, std::int64_t num_rows, T* out) {
  using Unit = PackedUnit<kBits>;
  constexpr int kVector = 16 / int(sizeof(T));  // elements per 16-byte store: 4 f32, 8 bf16
  constexpr int kChunk = 16;                    // the smallest group: the grid can change every 16 columns
  static_assert(Unit::kCodes % kChunk == 0 && kChunk % kVector == 0);

  __shared__ float levels[16];
  if (threadIdx.x < 16) levels[threadIdx.x] = p.nf4_levels[threadIdx.x];
  __syncthreads();

  const std::int64_t cols = p.w.cols;
  const std::int64_t units_per_row = (cols + Unit::kCodes - 1) / Unit::kCodes;
  const std::int64_t total = num_rows * units_per_row;
  for (std::int64_t t = grid_index(); t < total; t += grid_stride()) {
    const std::int64_t r = t / units_per_row, u = t - r * units_per_row;
    const std::int64_t row = row_begin + r;
    Unit unit;
    unit.load(p.w.codes + row * p.row_bytes, u, p.row_bytes);
    const std::int64_t j0 = u * Unit::kCodes;
    const int n = int(std::min<std::int64_t>(Unit::kCodes, cols - j0));
    T* dst = out + r * cols + j0;

#pragma unroll
    for (int c = 0; c < Unit::kCodes; c += kChunk) {
      if (c >= n) break;
      const GroupGrid grid = load_grid(p, row * p.groups_per_row + ((j0 + c) >> p.group_shift));
#pragma unroll
      for (int v = 0; v < kChunk; v += kVector) {
        alignas(16) T values[kVector];
#pragma unroll
        for (int i = 0; i < kVector; ++i) values[i] = from_f32<T>(decode_code(p, levels, unit.code(c + v + i), grid));
        if constexpr (kVectorStores) {
          if (c + v < n) *reinterpret_cast<uint4*>(dst + c + v) = *reinterpret_cast<const uint4*>(values);
        } else {
#pragma unroll
          for (int i = 0; i < kVector; ++i)
            if (c + v + i < n) dst[c + v + i] = values[i];
        }
      }
    }
  }
}

template <int kBits, class T>
void launch_dequantize(const QuantParams& p, std::int64_t row_begin, std::int64_t num_rows, T* out, Stream stream) {
  using Unit = PackedUnit<kBits>;
  const std::int64_t total = num_rows * ceil_div(p.w.cols, Unit::kCodes);
  const auto grid = unsigned(std::clamp<std::int64_t>(ceil_div(total, kDequantThreads), 1, std::int64_t(1) << 20));
  constexpr int kVector = 16 / int(sizeof(T));
  const bool vector_stores = p.w.cols % kVector == 0 && reinterpret_cast<std::uintptr_t>(out) % 16 == 0;
  if (vector_stores)
    dequantize_rows_kernel<kBits, T, true><<<grid, kDequantThreads, 0, stream>>>(p, row_begin, num_rows, out);
  else
    dequantize_rows_kernel<kBits, T, false><<<grid, kDequantThreads, 0, stream>>>(p, row_begin, num_rows, out);
  check_launch("dequantize_rows_kernel");
}

}  // namespace

template <class T>
void dequantize_rows(const PackedWeight& w, std::int64_t row_begin, std::int64_t row_end, T* out, Stream stream) {
  const QuantParams p = make_quant_params(w, "cuda::dequantize_rows");
  if (row_begin < 0 || row_end > w.rows || row_begin > row_end)
    throw Error("cuda::dequantize_rows: row range [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                ") is out of range for " + std::to_string(w.rows) + " rows");
  if (row_begin == row_end) return;
  auto* o = dev(out);
  const std::int64_t n = row_end - row_begin;
  switch (w.bits) {
    case 2: launch_dequantize<2>(p, row_begin, n, o, stream); break;
    case 3: launch_dequantize<3>(p, row_begin, n, o, stream); break;
    case 4: launch_dequantize<4>(p, row_begin, n, o, stream); break;
    case 8: launch_dequantize<8>(p, row_begin, n, o, stream); break;
  }
}

template void dequantize_rows<float>(const PackedWeight&, std::int64_t, std::int64_t, float*, Stream);
template void dequantize_rows<qlora::bf16>(const PackedWeight&, std::int64_t, std::int64_t, qlora::bf16*, Stream);

}  // namespace qlora::cuda
