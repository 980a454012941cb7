// COMQ's sweeps on the GPU (CPU twin: cpu::comq_rows and cpu::comq_column_order in qlora/cpu/comq.hpp, which
// document the steps; maths ../shared/methods/comq.md).
//
// Launch: one thread block of kComqThreadsPerBlock threads per output row (rows are independent; a
// grid-stride loop covers rows beyond the grid). The row's current values q (f32: every q_j is an f32 value,
// see cpu::comq_start_value) and residual d = w - q (f64) live in dynamic shared memory, 12 bytes per column
// (up to about 19k columns on an H100); wider rows keep them in a global scratch slice per resident block
// (8 blocks per SM) instead. A coordinate step is a block-wide f64 dot of H[j, :] (f32 or f64 H, read from
// global memory: coalesced, L2-resident for the columns many rows visit) with d, then thread 0 takes the
// step with cpu::comq_coordinate_step, the twin's very function (nearest grid code, acceptance test) and
// updates the code, q_j and d_j; two __syncthreads per step. The scale step per group is one pass over the
// group's rows of H giving m^T (H d)_G and m^T H_GG m (block reductions), then thread 0 decides with
// cpu::comq_scale_step (the twin's function) and the block rewrites the group's q and d.
//
// The greedy order (|w_ij| sqrt(H_jj) descending, columns with H_jj = 0 excluded) comes from CUB's segmented
// radix sort, one segment per row, on the device: the keys are the twin's cpu::comq_greedy_key (correctly
// rounded f64, so equal bit for bit), dead columns get the key -1 and sort last, and the sort is stable, so
// ties keep the lower column first exactly like the twin's std::stable_sort. On the host the sort would be
// rows * cols log cols serial work (about a second for 4096 x 4096), more than one sweep should take here.
// Rows go through the sort in chunks of at most kOrderChunkElements keys (CUB counts items in int, and the
// scratch stays bounded).
//
// Arithmetic: the dots sum in f64 in another order than the twin's four running sums (per-thread strided
// sums, a warp butterfly, then the warps in order: deterministic from run to run), so a t that lies within
// ~1e-12 relative of a rounding midpoint may round the other way; everything else is the twin's.
// Not done yet: keeping a block's rows of H in shared memory across rows that visit the same columns, more
// than one row per block for narrow layers, and the natural order's GPTQ-style lazy blocking (comq.md, GPU
// notes). Speed unmeasured (written without a GPU; bench/ptq_comq_magr.cpp has the cases).

#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <string>

#include "common.cuh"
#include "qlora/cuda/comq.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

constexpr int kWarps = kComqThreadsPerBlock / kWarpSize;
constexpr int kResidentBlocksPerSm = 2048 / kComqThreadsPerBlock;  // global-scratch path: blocks that fit at once
constexpr std::int64_t kOrderChunkElements = std::int64_t(1) << 25;  // keys per sort call (640 MiB of scratch)

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The block's sums of a and b, valid in thread 0 only (the warps' partials added in warp order). Every
// thread must call it; the caller synchronises again before the next call reuses `partial`.
__device__ __forceinline__ void block_sums_to_thread0(double& a, double& b, double (*partial)[kWarps]) {
  a = warp_sum_f64(a);
  b = warp_sum_f64(b);
  const int lane = int(threadIdx.x) % kWarpSize, warp = int(threadIdx.x) / kWarpSize;
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    a = b = 0;
    for (int w = 0; w < kWarps; ++w) {
      a += partial[0][w];
      b += partial[1][w];
    }
  }
}

__device__ __forceinline__ double block_sum_to_thread0(double a, double (*partial)[kWarps]) {
  a = warp_sum_f64(a);
  const int lane = int(threadIdx.x) % kWarpSize, warp = int(threadIdx.x) / kWarpSize;
  if (lane == 0) partial[0][warp] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    a = 0;
    for (int w = 0; w < kWarps; ++w) a += partial[0][w];
  }
  return a;
}

// The scale step of every group of the row (cpu::comq_update_row_scales).
template <class HT>
__device__ void update_row_scales(const cpu::ComqSettings& st, const float* w, const HT* h, std::int64_t cols,
                                  const std::uint8_t* codes, cpu::IntGrid* grids, float* q, double* d,
                                  double (*partial)[kWarps]) {
  __shared__ int moved;
  const std::int64_t gpr = (cols + st.group - 1) / st.group;
  for (std::int64_t g = 0; g < gpr; ++g) {
    const std::int64_t begin = g * st.group, end = min(cols, begin + st.group);
    const float zero = grids[g].zero;
    double num = 0, den = 0;  // m_G^T (H d)_G and m_G^T H_GG m_G, this thread's share
    for (std::int64_t j = begin; j < end; ++j) {
      const double mj = double(cpu::int_level(st.kind, st.bits, codes[j], zero));
      if (mj == 0.0) continue;  // uniform across the block
      const HT* hj = h + j * cols;
      double hd = 0, hm = 0;
      for (std::int64_t k = threadIdx.x; k < cols; k += blockDim.x) hd += double(hj[k]) * d[k];
      for (std::int64_t k = begin + threadIdx.x; k < end; k += blockDim.x)
        hm += double(hj[k]) * double(cpu::int_level(st.kind, st.bits, codes[k], zero));
      num += mj * hd;
      den += mj * hm;
    }
    block_sums_to_thread0(num, den, partial);
    if (threadIdx.x == 0) {
      float scale = 0.f;
      moved = cpu::comq_scale_step(grids[g].scale, num, den, scale);
      if (moved) grids[g].scale = scale;
    }
    __syncthreads();
    if (moved) {
      const cpu::IntGrid grid = grids[g];
      for (std::int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
        q[j] = cpu::decode_int(st.kind, st.bits, codes[j], grid);
        d[j] = double(w[j]) - double(q[j]);
      }
    }
    __syncthreads();  // q, d and `moved` are settled before the next group reads them
  }
}

// scratch_d / scratch_q: null for the shared-memory path, else [gridDim.x, cols] slices in global memory.
template <class HT>
__global__ void __launch_bounds__(kComqThreadsPerBlock)
    comq_rows_kernel(const cpu::ComqSettings st, const float* w, const HT* h, std::int64_t rows, std::int64_t cols,
                     const std::int32_t* order, std::int64_t order_stride, std::int64_t active,
                     std::uint8_t* codes, cpu::IntGrid* grids, double* scratch_d, float* scratch_q) {
  extern __shared__ double shared_row[];  // d [cols] f64, then q [cols] f32
  __shared__ double partial[2][kWarps];
  double* d = scratch_d ? scratch_d + std::int64_t(blockIdx.x) * cols : shared_row;
  float* q = scratch_d ? scratch_q + std::int64_t(blockIdx.x) * cols : reinterpret_cast<float*>(shared_row + cols);
  const std::int64_t gpr = (cols + st.group - 1) / st.group;

  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* wr = w + r * cols;
    std::uint8_t* cr = codes + r * cols;
    cpu::IntGrid* gr = grids + r * gpr;
    const std::int32_t* row_order = order + r * order_stride;
    for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      q[j] = cpu::comq_start_value(st, wr[j], h[j * cols + j] > HT(0), cr[j], gr[j / st.group]);
      d[j] = double(wr[j]) - double(q[j]);
    }
    __syncthreads();
    for (int sweep = 0; sweep < st.sweeps; ++sweep) {
      const bool off_grid = st.start_from_weights && sweep == 0;
      for (std::int64_t i = 0; i < active; ++i) {
        const std::int64_t j = row_order[i];
        const HT* hj = h + j * cols;
        double hd = 0;
        for (std::int64_t k = threadIdx.x; k < cols; k += blockDim.x) hd += double(hj[k]) * d[k];
        hd = block_sum_to_thread0(hd, partial);
        if (threadIdx.x == 0) {
          std::uint8_t code = 0;
          float value = 0.f;
          if (cpu::comq_coordinate_step(st.kind, st.bits, q[j], hd, double(hj[j]), gr[j / st.group], off_grid, code,
                                        value)) {
            cr[j] = code;
            q[j] = value;
            d[j] = double(wr[j]) - double(value);
          }
        }
        __syncthreads();  // d_j is settled (and `partial` free) before the next dot
      }
      if (st.update_scales) update_row_scales(st, wr, h, cols, cr, gr, q, d, partial);
    }
    __syncthreads();  // the row is done with q and d before the next row overwrites them
  }
}

template <class HT>
__global__ void greedy_keys_kernel(const float* w, const HT* h, std::int64_t n, std::int64_t cols, double* keys,
                                   std::int32_t* columns) {
  for (std::int64_t i = grid_index(); i < n; i += grid_stride()) {
    const std::int64_t j = i % cols;
    const HT h_jj = h[j * cols + j];
    keys[i] = h_jj > HT(0) ? cpu::comq_greedy_key(w[i], double(h_jj)) : -1.0;  // live keys are >= 0
    columns[i] = std::int32_t(j);
  }
}

__global__ void segment_offsets_kernel(std::int32_t* offsets, std::int64_t segments, std::int64_t length) {
  for (std::int64_t i = grid_index(); i <= segments; i += grid_stride()) offsets[i] = std::int32_t(i * length);
}

// ---- the greedy order's scratch: [keys in | keys out | columns in | offsets | CUB's temporary storage] -------

constexpr std::size_t kAlign = 256;
std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

struct OrderLayout {
  std::int64_t chunk_rows = 0, chunk_elements = 0;
  std::size_t keys_in = 0, keys_out = 0, columns = 0, offsets = 0, temp = 0, temp_bytes = 0, total = 0;
};

OrderLayout order_layout(std::int64_t rows, std::int64_t cols) {
  OrderLayout l;
  l.chunk_rows = std::clamp<std::int64_t>(kOrderChunkElements / cols, 1, rows);
  l.chunk_elements = l.chunk_rows * cols;
  QLORA_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, l.temp_bytes, static_cast<const double*>(nullptr), static_cast<double*>(nullptr),
      static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr), int(l.chunk_elements),
      int(l.chunk_rows), static_cast<const std::int32_t*>(nullptr), static_cast<const std::int32_t*>(nullptr)));
  const auto n = std::size_t(l.chunk_elements);
  l.keys_out = l.keys_in + aligned(n * sizeof(double));
  l.columns = l.keys_out + aligned(n * sizeof(double));
  l.offsets = l.columns + aligned(n * sizeof(std::int32_t));
  l.temp = l.offsets + aligned(std::size_t(l.chunk_rows + 1) * sizeof(std::int32_t));
  l.total = l.temp + aligned(l.temp_bytes);
  return l;
}

void check_shape(const char* who, std::int64_t rows, std::int64_t cols) {
  if (rows < 0 || cols <= 0 || cols > std::int64_t(1 << 30))
    throw Error(std::string(who) + ": unsupported shape " + std::to_string(rows) + " x " + std::to_string(cols));
}

template <class HT>
void launch_greedy_order(const float* w, const HT* h, std::int64_t rows, std::int64_t cols, std::int32_t* order,
                  void* scratch, std::size_t scratch_bytes, Stream stream) {
  check_shape("cuda::comq_greedy_order", rows, cols);
  if (rows == 0) return;
  const OrderLayout l = order_layout(rows, cols);
  if (scratch == nullptr || scratch_bytes < l.total)
    throw Error("cuda::comq_greedy_order: needs " + std::to_string(l.total) + " bytes of scratch, got " +
                std::to_string(scratch == nullptr ? 0 : scratch_bytes));
  auto* base = static_cast<char*>(scratch);
  auto* keys_in = reinterpret_cast<double*>(base + l.keys_in);
  auto* keys_out = reinterpret_cast<double*>(base + l.keys_out);
  auto* columns = reinterpret_cast<std::int32_t*>(base + l.columns);
  auto* offsets = reinterpret_cast<std::int32_t*>(base + l.offsets);
  const std::int32_t* segment_offsets = offsets;  // the types of order_layout's size query
  segment_offsets_kernel<<<elementwise_grid(l.chunk_rows + 1), kElementwiseThreads, 0, stream>>>(offsets, l.chunk_rows,
                                                                                                   cols);
  check_launch("segment_offsets_kernel");
  for (std::int64_t first = 0; first < rows; first += l.chunk_rows) {
    const std::int64_t chunk = std::min(l.chunk_rows, rows - first), n = chunk * cols;
    greedy_keys_kernel<<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(w + first * cols, h, n, cols, keys_in,
                                                                                columns);
    check_launch("greedy_keys_kernel");
    std::size_t temp_bytes = l.temp_bytes;
    QLORA_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        base + l.temp, temp_bytes, static_cast<const double*>(keys_in), keys_out,
        static_cast<const std::int32_t*>(columns), order + first * cols, int(n), int(chunk), segment_offsets,
        segment_offsets + 1, 0, int(sizeof(double) * 8), stream));
  }
}

// Whether a row's q and d fit in one block's shared memory (next to the kernel's static shared memory).
template <class HT>
bool row_fits_in_shared_memory(std::int64_t cols) {
  int device = 0, optin = 0;
  QLORA_CUDA_CHECK(cudaGetDevice(&device));
  QLORA_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attributes{};
  QLORA_CUDA_CHECK(cudaFuncGetAttributes(&attributes, comq_rows_kernel<HT>));
  return std::size_t(cols) * (sizeof(double) + sizeof(float)) + attributes.sharedSizeBytes <= std::size_t(optin);
}

std::int64_t scratch_blocks(std::int64_t rows) {
  return std::min<std::int64_t>(rows, std::int64_t(kResidentBlocksPerSm) * sm_count());
}

template <class HT>
std::size_t rows_scratch_bytes(std::int64_t rows, std::int64_t cols) {
  if (rows <= 0 || row_fits_in_shared_memory<HT>(cols)) return 0;
  return std::size_t(scratch_blocks(rows) * cols) * (sizeof(double) + sizeof(float));
}

template <class HT>
void launch_rows(const cpu::ComqSettings& st, const float* w, const HT* h, std::int64_t rows, std::int64_t cols,
          const std::int32_t* order, std::int64_t order_stride, std::int64_t active, std::uint8_t* codes,
          cpu::IntGrid* grids, void* scratch, Stream stream) {
  check_shape("cuda::comq_rows", rows, cols);
  if (st.group <= 0 || st.sweeps < 1 || active < 0 || active > cols)
    throw Error("cuda::comq_rows: bad settings (group " + std::to_string(st.group) + ", sweeps " +
                std::to_string(st.sweeps) + ", " + std::to_string(active) + " live columns of " +
                std::to_string(cols) + ")");
  if (rows == 0) return;
  if (row_fits_in_shared_memory<HT>(cols)) {
    const std::size_t bytes = std::size_t(cols) * (sizeof(double) + sizeof(float));
    allow_dynamic_shared_memory(comq_rows_kernel<HT>, bytes, "comq_rows_kernel");
    comq_rows_kernel<HT><<<row_grid(rows), kComqThreadsPerBlock, bytes, stream>>>(
        st, w, h, rows, cols, order, order_stride, active, codes, grids, nullptr, nullptr);
  } else {
    if (scratch == nullptr)
      throw Error("cuda::comq_rows: rows of " + std::to_string(cols) +
                  " columns do not fit in shared memory and no scratch was given (comq_rows_scratch_bytes)");
    const std::int64_t blocks = scratch_blocks(rows);
    auto* d = static_cast<double*>(scratch);
    auto* q = reinterpret_cast<float*>(d + blocks * cols);
    comq_rows_kernel<HT><<<unsigned(blocks), kComqThreadsPerBlock, 0, stream>>>(st, w, h, rows, cols, order, order_stride,
                                                                              active, codes, grids, d, q);
  }
  check_launch("comq_rows_kernel");
}

}  // namespace

std::size_t comq_greedy_order_scratch_bytes(std::int64_t rows, std::int64_t cols) {
  check_shape("cuda::comq_greedy_order_scratch_bytes", rows, cols);
  return rows == 0 ? 0 : order_layout(rows, cols).total;
}

void comq_greedy_order(const float* w, const float* h, std::int64_t rows, std::int64_t cols, std::int32_t* order,
                       void* scratch, std::size_t scratch_bytes, Stream stream) {
  launch_greedy_order(w, h, rows, cols, order, scratch, scratch_bytes, stream);
}
void comq_greedy_order(const float* w, const double* h, std::int64_t rows, std::int64_t cols, std::int32_t* order,
                       void* scratch, std::size_t scratch_bytes, Stream stream) {
  launch_greedy_order(w, h, rows, cols, order, scratch, scratch_bytes, stream);
}

std::size_t comq_rows_scratch_bytes(std::int64_t rows, std::int64_t cols) {
  check_shape("cuda::comq_rows_scratch_bytes", rows, cols);
  return std::max(rows_scratch_bytes<float>(rows, cols), rows_scratch_bytes<double>(rows, cols));
}

void comq_rows(const cpu::ComqSettings& st, const float* w, const float* h, std::int64_t rows, std::int64_t cols,
               const std::int32_t* order, std::int64_t order_stride, std::int64_t active, std::uint8_t* codes,
               cpu::IntGrid* grids, void* scratch, Stream stream) {
  launch_rows(st, w, h, rows, cols, order, order_stride, active, codes, grids, scratch, stream);
}
void comq_rows(const cpu::ComqSettings& st, const float* w, const double* h, std::int64_t rows, std::int64_t cols,
               const std::int32_t* order, std::int64_t order_stride, std::int64_t active, std::uint8_t* codes,
               cpu::IntGrid* grids, void* scratch, Stream stream) {
  launch_rows(st, w, h, rows, cols, order, order_stride, active, codes, grids, scratch, stream);
}

}  // namespace qlora::cuda
