// Fused causal grouped-query attention, FlashAttention-2 (Dao 2023, Alg. 1 and 2), bf16 in, f32 accumulation,
// head dim D = 64 or 128 as a template parameter. CPU twin: qlora/cpu/flash_attention.hpp (same tile loops).
//
// Tensor cores through mma.sync.m16n8k16 (bf16 in, f32 accumulate) rather than nvcuda::wmma: the PTX ISA
// documents which lane holds which element of an mma.sync accumulator, so the online softmax runs on the
// score tile where it lies in registers and the probabilities P are re-packed in registers as the A operand of
// the next product (an accumulator pair of 16 x 8 tiles is exactly one 16 x 16 A fragment). wmma's fragment
// layout is opaque, which would force every score tile through shared memory. Operands are read from shared
// memory with ldmatrix (.trans where the stored tile is the transpose of the operand). Both run on sm_80 and
// sm_90; no Hopper-only instruction (wgmma, TMA) is used.
//
// Fragments (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4 g + i (g = lane / 4, i = lane % 4):
//   A 16x16: a0 (row g, cols 2i, 2i+1), a1 (row g+8, same cols), a2 (row g, cols 2i+8, 2i+9), a3 (row g+8, ...)
//   B 16x8:  b0 (rows 2i, 2i+1, col g), b1 (rows 2i+8, 2i+9, col g)
//   C 16x8:  c0 c1 (row g, cols 2i, 2i+1), c2 c3 (row g+8, cols 2i, 2i+1)
//
// Forward: one block of 4 warps per (query tile of Br = 64 rows, query head, batch); warp w owns query rows
// 16 w .. 16 w + 15 of the tile and keeps them in registers as A fragments (D / 16 of them), along with its
// O accumulator (16 x D f32, D / 8 C fragments), and per row the running max m and running sum l (each lane
// holds rows g and g + 8, and sums its own columns: the row sum is reduced over the 4 lanes of a row once, at
// the end). Key tiles of Bc = 64 keys stream through double-buffered shared memory (cp.async: tile j + 1
// loads while tile j is used); the tiles past the diagonal of the block's last query are never loaded. Per key
// tile: S = Q K^T (16 x 64 per warp), in log2 units (scale log2 e folded in, so exp2 is the exponential),
// masked, m_new = max(m, rowmax S), P = exp2(S - m_new), O = exp2(m - m_new) O + P V. Blocks start with the
// last query tiles (the longest causal rows) so that the short ones fill the tail of the grid.
//   shared memory: Q 64 x (D + 8) + 2 stages x (K, V) 64 x (D + 8) bf16 = 45 KiB (D = 64), 85 KiB (D = 128).
//
// Backward, three launches: (1) D = rowsum(dO * O) per query row, and the f32 dq accumulator zeroed;
// (2) one block of 4 warps per (key tile of Bc = 64 keys, kv head, batch), warp w owning keys 16 w .. 16 w + 15
// with its dK and dV accumulators in registers for the whole kernel: the block walks every query head of its
// kv group and every query tile of Br = 32 rows that sees the key tile, computing S^T = K Q^T and
// dP^T = V dO^T (keys as rows, so P^T and dS^T come out of the accumulators already in A-fragment form for
// dV += P^T dO and dK += dS^T Q), then dQ += dS K from dS^T staged in shared memory, added into the f32
// accumulator with atomics (FA2's choice: a separate dQ pass would recompute S and dP, 40% more FLOPs).
// dK and dV need no atomics: one block owns a key tile of a kv head and adds its result into dk, dv once.
// (3) dq = bf16(dq accumulator) through the convert kernel.
//   shared memory: K, V 64 x (D + 8) + Q, dO 32 x (D + 8) + dS^T 64 x 40 bf16 = 32 KiB (D = 64), 56 KiB (D = 128).
//
// Floors (docs/performance.md): causal forward 4 b hq d tq^2 / 2 FLOP; backward 2.5 times that (five products
// against the forward's two). Unmeasured so far (no GPU in the session that wrote this). Not done: a swizzled
// shared layout instead of the padding (6% of shared memory), more than two pipeline stages, overlapping the
// backward's tile loads with its products, warp-specialised wgmma/TMA on Hopper; f32 inputs use the plain
// kernels (qlora/cuda/attention.hpp).

#include <cuda_bf16.h>

#include <cstdint>
#include <string>

#include "common.cuh"
#include "qlora/cuda/convert.hpp"
#include "qlora/cuda/flash_attention.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;
using bf16_t = __nv_bfloat16;

constexpr int kFlashWarps = 4;
constexpr int kFlashThreads = kFlashWarps * kWarpSize;
constexpr int kSharedPad = 8;  // bf16 per shared row beyond the data: rows 16 bytes apart in bank space
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- tensor-core building blocks ---------------------------------------------------------------------------

struct FragmentA {  // 16 x 16 bf16, the layout above
  std::uint32_t x[4];
};
struct Accumulator {  // 16 x 8 f32, the layout above
  float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};
};

// c += a b, with b given as its two registers.
__device__ __forceinline__ void mma(Accumulator& c, const FragmentA& a, std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c.x[0]), "+f"(c.x[1]), "+f"(c.x[2]), "+f"(c.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 bf16 matrices from shared memory; lanes 8 m .. 8 m + 7 give the row addresses of matrix m, and
// register m receives matrix m in the fragment layout (row lane / 4, columns 2 (lane % 4), + 1). The .trans
// form delivers each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const bf16_t* row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const bf16_t* row) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// Operand loads from a row-major shared tile with `stride` bf16 per row. The four 8 x 8 pieces are picked so
// that the registers come out in fragment order.
// A (16 x 16 at rows r0, columns c0) stored as it is.
__device__ __forceinline__ void load_a(FragmentA& a, const bf16_t* tile, int stride, int r0, int c0) {
  const int lane = threadIdx.x % kWarpSize;
  ldmatrix_x4(a.x, tile + (r0 + (lane & 15)) * stride + c0 + 8 * (lane >> 4));
}
// A (16 x 16 at rows r0, columns c0) from a tile that stores A^T ([column][row]).
__device__ __forceinline__ void load_a_from_transposed(FragmentA& a, const bf16_t* tile, int stride, int r0, int c0) {
  const int lane = threadIdx.x % kWarpSize;
  ldmatrix_x4_trans(a.x, tile + (c0 + (lane & 7) + 8 * (lane >> 4)) * stride + r0 + 8 * ((lane >> 3) & 1));
}
// Two B operands, columns n0 .. n0 + 7 (b[0], b[1]) and n0 + 8 .. n0 + 15 (b[2], b[3]), rows k0 .. k0 + 15,
// from a tile that stores B as it is ([k][n]): V in O = P V.
__device__ __forceinline__ void load_b(std::uint32_t (&b)[4], const bf16_t* tile, int stride, int k0, int n0) {
  const int lane = threadIdx.x % kWarpSize;
  ldmatrix_x4_trans(b, tile + (k0 + (lane & 15)) * stride + n0 + 8 * (lane >> 4));
}
// The same two B operands from a tile that stores B^T ([n][k]): K in S = Q K^T.
__device__ __forceinline__ void load_b_from_transposed(std::uint32_t (&b)[4], const bf16_t* tile, int stride, int k0,
                                                       int n0) {
  const int lane = threadIdx.x % kWarpSize;
  ldmatrix_x4(b, tile + (n0 + (lane & 7) + 8 * (lane >> 4)) * stride + k0 + 8 * ((lane >> 3) & 1));
}

// Two f32 values as one register of bf16 (the lower column in the low half, as the fragments want).
__device__ __forceinline__ std::uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&pair);
}

// Accumulators n and n + 1 (a 16 x 16 tile: columns 8 n .. 8 n + 15) as the A operand of the next product.
__device__ __forceinline__ FragmentA accumulators_as_a(const Accumulator& left, const Accumulator& right) {
  return FragmentA{{pack_bf16(left.x[0], left.x[1]), pack_bf16(left.x[2], left.x[3]), pack_bf16(right.x[0], right.x[1]),
                    pack_bf16(right.x[2], right.x[3])}};
}

// ---- global -> shared copies (cp.async, 16 bytes per instruction) -----------------------------------------

__device__ __forceinline__ void cp_async_16(bf16_t* shared, const bf16_t* global, bool valid) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  const int bytes = valid ? 16 : 0;  // 0: nothing is read and the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Rows 0 .. Rows - 1 of a head (`row_stride` elements apart in global memory) into a padded shared tile; rows
// at or past `valid_rows` are zero-filled. Issued by the whole block; completes at cp_async_wait_all.
template <int Rows, int D>
__device__ __forceinline__ void copy_tile_async(bf16_t* tile, const bf16_t* rows, std::int64_t row_stride,
                                                int valid_rows) {
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  for (int i = threadIdx.x; i < Rows * kPieces; i += blockDim.x) {
    const int r = i / kPieces, c = i % kPieces * 8;
    const bool valid = r < valid_rows;
    cp_async_16(tile + r * (D + kSharedPad) + c, valid ? rows + r * row_stride + c : rows, valid);
  }
}

// Sum and max over the four lanes that hold one accumulator row.
__device__ __forceinline__ float row_group_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
__device__ __forceinline__ float row_group_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}

// ---- forward ------------------------------------------------------------------------------------------------

constexpr int kForwardBr = 64, kForwardBc = 64;

template <int D>
constexpr std::size_t forward_shared_bytes() {
  return std::size_t(kForwardBr + 4 * kForwardBc) * (D + kSharedPad) * sizeof(bf16_t);  // Q + 2 x (K, V)
}

template <int D>
__global__ void __launch_bounds__(kFlashThreads) flash_forward_kernel(const bf16_t* q, const bf16_t* k,
                                                                      const bf16_t* v, bf16_t* out, float* lse, int tq,
                                                                      int tk, int hq, int hkv, float scale_log2) {
  constexpr int Br = kForwardBr, Bc = kForwardBc, kStride = D + kSharedPad;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  bf16_t* q_tile = reinterpret_cast<bf16_t*>(shared_bytes);
  bf16_t* k_tiles = q_tile + Br * kStride;  // stage s at k_tiles + s Bc kStride
  bf16_t* v_tiles = k_tiles + 2 * Bc * kStride;

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4, i = lane % 4;
  const int i0 = (gridDim.x - 1 - blockIdx.x) * Br;  // the longest causal rows first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (hq / hkv);
  const std::int64_t q_stride = std::int64_t(hq) * D, kv_stride = std::int64_t(hkv) * D;
  const bf16_t* q_rows = q + ((std::int64_t(b) * tq + i0) * hq + h) * D;  // query i0 of this head
  const bf16_t* k_rows = k + (std::int64_t(b) * tk * hkv + hk) * D;       // key 0 of this kv head
  const bf16_t* v_rows = v + (std::int64_t(b) * tk * hkv + hk) * D;

  const int rows = min(Br, tq - i0);
  const int key_tiles = (tk - tq + i0 + rows - 1) / Bc + 1;  // through the last query's diagonal
  copy_tile_async<Br, D>(q_tile, q_rows, q_stride, rows);
  copy_tile_async<Bc, D>(k_tiles, k_rows, kv_stride, tk);
  copy_tile_async<Bc, D>(v_tiles, v_rows, kv_stride, tk);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  FragmentA q_frag[D / 16];  // this warp's 16 query rows, all channels
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a(q_frag[kk], q_tile, kStride, 16 * warp, 16 * kk);

  // This lane's two rows (r = 0: g, r = 1: g + 8): the last key each may see, running max and partial sum.
  int last_key[2];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int r = 0; r < 2; ++r) last_key[r] = tk - tq + i0 + 16 * warp + g + 8 * r;
  Accumulator o[D / 8];

  for (int tile = 0; tile < key_tiles; ++tile) {
    const int stage = tile % 2, j0 = tile * Bc;
    const bf16_t *k_tile = k_tiles + stage * Bc * kStride, *v_tile = v_tiles + stage * Bc * kStride;
    if (tile + 1 < key_tiles) {  // prefetch the next tile into the other stage (last read one iteration ago)
      const int next = j0 + Bc;
      copy_tile_async<Bc, D>(k_tiles + (1 - stage) * Bc * kStride, k_rows + next * kv_stride, kv_stride, tk - next);
      copy_tile_async<Bc, D>(v_tiles + (1 - stage) * Bc * kStride, v_rows + next * kv_stride, kv_stride, tk - next);
      cp_async_commit();
    }

    // S = Q K^T: 16 x 64 per warp, 8 accumulators.
    Accumulator s[Bc / 8];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int n = 0; n < Bc / 16; ++n) {
        std::uint32_t kb[4];
        load_b_from_transposed(kb, k_tile, kStride, 16 * kk, 16 * n);
        mma(s[2 * n], q_frag[kk], kb[0], kb[1]);
        mma(s[2 * n + 1], q_frag[kk], kb[2], kb[3]);
      }
    }

    // Online softmax in log2 units: mask, new row max, rescale factor, P = exp2(S - m_new).
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < Bc / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j0 + 8 * n + 2 * i + (e & 1), r = e / 2;
        const float x = key <= last_key[r] && key < tk ? s[n].x[e] * scale_log2 : -INFINITY;
        s[n].x[e] = x;
        tile_max[r] = fmaxf(tile_max[r], x);
      }
    }
    float rescale[2], row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // Key 0 is in the first tile and every row sees it: m_new is finite from the first tile on.
      const float m_new = fmaxf(m[r], row_group_max(tile_max[r]));
      rescale[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
    }
#pragma unroll
    for (int n = 0; n < Bc / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[n].x[e] - m[e / 2]);
        s[n].x[e] = p;
        row_sum[e / 2] += p;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) l[r] = rescale[r] * l[r] + row_sum[r];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n].x[0] *= rescale[0];
      o[n].x[1] *= rescale[0];
      o[n].x[2] *= rescale[1];
      o[n].x[3] *= rescale[1];
    }

    // O += P V, P straight from the accumulators.
#pragma unroll
    for (int kk = 0; kk < Bc / 16; ++kk) {
      const FragmentA p = accumulators_as_a(s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        std::uint32_t vb[4];
        load_b(vb, v_tile, kStride, 16 * kk, 16 * n);
        mma(o[2 * n], p, vb[0], vb[1]);
        mma(o[2 * n + 1], p, vb[2], vb[3]);
      }
    }
    cp_async_wait_all();  // the next stage has landed ...
    __syncthreads();      // ... for every thread, and nobody still reads this one
  }

  // O / l and lse = (m + log2 l) ln 2, for the rows that exist.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int t = i0 + 16 * warp + g + 8 * r;
    const float row_l = row_group_sum(l[r]);
    if (t >= tq) continue;
    bf16_t* out_row = out + ((std::int64_t(b) * tq + t) * hq + h) * D;
    const float inv_l = 1.0f / row_l;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<std::uint32_t*>(out_row + 8 * n + 2 * i) =
          pack_bf16(o[n].x[2 * r] * inv_l, o[n].x[2 * r + 1] * inv_l);
    if (i == 0) lse[(std::int64_t(b) * hq + h) * tq + t] = (m[r] + log2f(row_l)) * kLn2;
  }
}

// ---- backward -----------------------------------------------------------------------------------------------

constexpr int kBackwardBr = 32, kBackwardBc = 64;
constexpr int kDsStride = kBackwardBr + kSharedPad;  // dS^T tile: Bc rows (keys) of Br queries

template <int D>
constexpr std::size_t backward_shared_bytes() {
  return (std::size_t(2 * kBackwardBc + 2 * kBackwardBr) * (D + kSharedPad) + kBackwardBc * kDsStride) *
             sizeof(bf16_t) +
         2 * kBackwardBr * sizeof(float);  // K, V, Q, dO, dS^T; lse and D of the query tile
}

// D = rowsum(dO * O) for every query row, one warp per row, into (batch, hq, tq) order.
template <int D>
__global__ void flash_backward_rowsum_kernel(const bf16_t* out, const bf16_t* dout, float* rowsum, std::int64_t rows,
                                             int tq, int hq) {
  const int lane = threadIdx.x % kWarpSize;
  const std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;  // (b, t, h)
  if (row >= rows) return;
  float sum = 0.0f;
  for (int c = lane; c < D; c += kWarpSize) sum += to_f32(out[row * D + c]) * to_f32(dout[row * D + c]);
  sum = warp_sum(sum);
  const std::int64_t b = row / (std::int64_t(tq) * hq), t = row / hq % tq, h = row % hq;
  if (lane == 0) rowsum[(b * hq + h) * tq + t] = sum;
}

template <int D>
__global__ void __launch_bounds__(kFlashThreads)
    flash_backward_kernel(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,
                          const float* rowsum, float* dq_accumulator, float* dk, float* dv, int tq, int tk, int hq,
                          int hkv, float scale, float scale_log2) {
  constexpr int Br = kBackwardBr, Bc = kBackwardBc, kStride = D + kSharedPad;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  bf16_t* k_tile = reinterpret_cast<bf16_t*>(shared_bytes);
  bf16_t* v_tile = k_tile + Bc * kStride;
  bf16_t* q_tile = v_tile + Bc * kStride;
  bf16_t* do_tile = q_tile + Br * kStride;
  bf16_t* ds_tile = do_tile + Br * kStride;  // dS^T: [key][query]
  float* lse_tile = reinterpret_cast<float*>(ds_tile + Bc * kDsStride);  // in log2 units
  float* rowsum_tile = lse_tile + Br;

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, g = lane / 4, i = lane % 4;
  const int j0 = blockIdx.x * Bc, hk = blockIdx.y, b = blockIdx.z, group = hq / hkv;
  const std::int64_t q_stride = std::int64_t(hq) * D, kv_stride = std::int64_t(hkv) * D;
  const std::int64_t kv_offset = ((std::int64_t(b) * tk + j0) * hkv + hk) * D;  // key j0 of this kv head
  copy_tile_async<Bc, D>(k_tile, k + kv_offset, kv_stride, tk - j0);
  copy_tile_async<Bc, D>(v_tile, v + kv_offset, kv_stride, tk - j0);
  cp_async_commit();

  Accumulator dk_acc[D / 8], dv_acc[D / 8];  // keys 16 warp .. 16 warp + 15 of the tile, all channels
  int key[2];
  for (int r = 0; r < 2; ++r) key[r] = j0 + 16 * warp + g + 8 * r;
  const int first_query = max(0, j0 - (tk - tq));  // the first query that sees key j0

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int i0 = first_query / Br * Br; i0 < tq; i0 += Br) {
      const std::int64_t q_offset = ((std::int64_t(b) * tq + i0) * hq + h) * D;
      copy_tile_async<Br, D>(q_tile, q + q_offset, q_stride, tq - i0);
      copy_tile_async<Br, D>(do_tile, dout + q_offset, q_stride, tq - i0);
      cp_async_commit();
      for (int r = threadIdx.x; r < Br; r += blockDim.x) {
        const int t = i0 + r;
        const std::int64_t at = (std::int64_t(b) * hq + h) * tq + t;
        lse_tile[r] = t < tq ? lse[at] * kLog2e : INFINITY;  // a row that does not exist gets P = 0
        rowsum_tile[r] = t < tq ? rowsum[at] : 0.0f;
      }
      cp_async_wait_all();
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T: 16 keys x 32 queries per warp.
      Accumulator p[Br / 8], dp[Br / 8];
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        FragmentA kf, vf;
        load_a(kf, k_tile, kStride, 16 * warp, 16 * kk);
        load_a(vf, v_tile, kStride, 16 * warp, 16 * kk);
#pragma unroll
        for (int n = 0; n < Br / 16; ++n) {
          std::uint32_t qb[4], dob[4];
          load_b_from_transposed(qb, q_tile, kStride, 16 * kk, 16 * n);
          load_b_from_transposed(dob, do_tile, kStride, 16 * kk, 16 * n);
          mma(p[2 * n], kf, qb[0], qb[1]);
          mma(p[2 * n + 1], kf, qb[2], qb[3]);
          mma(dp[2 * n], vf, dob[0], dob[1]);
          mma(dp[2 * n + 1], vf, dob[2], dob[3]);
        }
      }
      // P^T = exp2(S^T scale log2 e - lse log2 e) where visible; dS^T = P^T (dP^T - D), kept in dp.
#pragma unroll
      for (int n = 0; n < Br / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * n + 2 * i + (e & 1), t = i0 + col, kj = key[e / 2];
          const bool visible = t < tq && kj < tk && kj <= tk - tq + t;
          const float pv = visible ? exp2f(p[n].x[e] * scale_log2 - lse_tile[col]) : 0.0f;
          p[n].x[e] = pv;
          dp[n].x[e] = pv * (dp[n].x[e] - rowsum_tile[col]);
        }
      }
      // dV += P^T dO and dK += dS^T Q (scale applied once at the end).
#pragma unroll
      for (int kk = 0; kk < Br / 16; ++kk) {
        const FragmentA pa = accumulators_as_a(p[2 * kk], p[2 * kk + 1]);
        const FragmentA dsa = accumulators_as_a(dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
          std::uint32_t dob[4], qb[4];
          load_b(dob, do_tile, kStride, 16 * kk, 16 * n);
          load_b(qb, q_tile, kStride, 16 * kk, 16 * n);
          mma(dv_acc[2 * n], pa, dob[0], dob[1]);
          mma(dv_acc[2 * n + 1], pa, dob[2], dob[3]);
          mma(dk_acc[2 * n], dsa, qb[0], qb[1]);
          mma(dk_acc[2 * n + 1], dsa, qb[2], qb[3]);
        }
      }
      // dS^T to shared memory: dQ needs dS with queries as rows, spread over the warps differently.
#pragma unroll
      for (int n = 0; n < Br / 8; ++n) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<std::uint32_t*>(ds_tile + (16 * warp + g + 8 * r) * kDsStride + 8 * n + 2 * i) =
              pack_bf16(dp[n].x[2 * r], dp[n].x[2 * r + 1]);
      }
      __syncthreads();

      // dQ += scale dS K: warp w takes query rows 16 (w % 2) .. + 15 and channels (w / 2) D / 2 .. + D / 2 - 1.
      {
        const int m0 = 16 * (warp % 2), c0 = (warp / 2) * (D / 2);
        Accumulator dq_part[D / 16];
#pragma unroll
        for (int kk = 0; kk < Bc / 16; ++kk) {
          FragmentA dsa;
          load_a_from_transposed(dsa, ds_tile, kDsStride, m0, 16 * kk);
#pragma unroll
          for (int n = 0; n < D / 32; ++n) {
            std::uint32_t kb[4];
            load_b(kb, k_tile, kStride, 16 * kk, c0 + 16 * n);
            mma(dq_part[2 * n], dsa, kb[0], kb[1]);
            mma(dq_part[2 * n + 1], dsa, kb[2], kb[3]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int t = i0 + m0 + g + 8 * r;
          if (t >= tq) continue;
          float* dq_row = dq_accumulator + ((std::int64_t(b) * tq + t) * hq + h) * D + c0;
#pragma unroll
          for (int n = 0; n < D / 16; ++n) {
            atomicAdd(dq_row + 8 * n + 2 * i, scale * dq_part[n].x[2 * r]);
            atomicAdd(dq_row + 8 * n + 2 * i + 1, scale * dq_part[n].x[2 * r + 1]);
          }
        }
      }
      __syncthreads();  // before the next query tile overwrites Q, dO and dS^T
    }
  }

  // This block alone owns these dk, dv rows: add once, no atomics.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= tk) continue;
    const std::int64_t row = ((std::int64_t(b) * tk + key[r]) * hkv + hk) * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int c = 8 * n + 2 * i;
      dk[row + c] += scale * dk_acc[n].x[2 * r];
      dk[row + c + 1] += scale * dk_acc[n].x[2 * r + 1];
      dv[row + c] += dv_acc[n].x[2 * r];
      dv[row + c + 1] += dv_acc[n].x[2 * r + 1];
    }
  }
}

// ---- launchers ------------------------------------------------------------------------------------------------

void check_flash_shape(const char* name, std::int64_t batch, std::int64_t tq, std::int64_t tk, std::int64_t hq,
                       std::int64_t hkv, std::int64_t d, std::initializer_list<const void*> pointers) {
  const std::string where = std::string(name) + ": ";
  QLORA_CHECK(d == 64 || d == 128, where + "head dim " + std::to_string(d) + " is not 64 or 128");
  QLORA_CHECK(tk >= tq, where + "tk " + std::to_string(tk) + " < tq " + std::to_string(tq));
  QLORA_CHECK(hkv >= 1 && hq % hkv == 0,
              where + "hq " + std::to_string(hq) + " is not a multiple of hkv " + std::to_string(hkv));
  QLORA_CHECK(hq <= 65535 && batch <= 65535 && tk <= 0x7fffffff - 128,
              where + "sizes too large (tk " + std::to_string(tk) + ", hq " + std::to_string(hq) + ", batch " +
                  std::to_string(batch) + ")");
  QLORA_CHECK(flash_attention_supports(d, pointers), where + "every pointer must be 16-byte aligned");
}

template <int D>
void launch_forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, std::int64_t batch,
                    std::int64_t tq, std::int64_t tk, std::int64_t hq, std::int64_t hkv, Stream stream) {
  auto* kernel = &flash_forward_kernel<D>;
  constexpr std::size_t bytes = forward_shared_bytes<D>();
  allow_dynamic_shared_memory(kernel, bytes, "flash_forward_kernel");
  const dim3 grid(unsigned(ceil_div(tq, kForwardBr)), unsigned(hq), unsigned(batch));
  kernel<<<grid, kFlashThreads, bytes, stream>>>(dev(q), dev(k), dev(v), dev(out), lse, int(tq), int(tk), int(hq),
                                                 int(hkv), kLog2e / std::sqrt(float(D)));
  check_launch("flash_forward_kernel");
}

template <int D>
void launch_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* out, const float* lse, const bf16* dout,
                     bf16* dq, float* dk, float* dv, float* workspace, std::int64_t batch, std::int64_t tq,
                     std::int64_t tk, std::int64_t hq, std::int64_t hkv, Stream stream) {
  const std::int64_t q_elements = batch * tq * hq * D, rows = batch * tq * hq;
  float *dq_accumulator = workspace, *rowsum = workspace + q_elements;
  QLORA_CUDA_CHECK(cudaMemsetAsync(dq_accumulator, 0, std::size_t(q_elements) * sizeof(float), stream));
  constexpr int kRowsPerBlock = kRowThreads / kWarpSize;
  flash_backward_rowsum_kernel<D><<<unsigned(ceil_div(rows, kRowsPerBlock)), kRowThreads, 0, stream>>>(
      dev(out), dev(dout), rowsum, rows, int(tq), int(hq));
  check_launch("flash_backward_rowsum_kernel");

  auto* kernel = &flash_backward_kernel<D>;
  constexpr std::size_t bytes = backward_shared_bytes<D>();
  allow_dynamic_shared_memory(kernel, bytes, "flash_backward_kernel");
  const dim3 grid(unsigned(ceil_div(tk, kBackwardBc)), unsigned(hkv), unsigned(batch));
  const float scale = 1.0f / std::sqrt(float(D));
  kernel<<<grid, kFlashThreads, bytes, stream>>>(dev(q), dev(k), dev(v), dev(dout), lse, rowsum, dq_accumulator, dk,
                                                 dv, int(tq), int(tk), int(hq), int(hkv), scale, scale * kLog2e);
  check_launch("flash_backward_kernel");
  convert<float, bf16>(dq_accumulator, dq, q_elements, stream);
}

}  // namespace

void flash_attention_forward(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, std::int64_t batch,
                             std::int64_t tq, std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
                             Stream stream) {
  if (batch <= 0 || tq <= 0 || hq <= 0) return;
  check_flash_shape("flash_attention_forward", batch, tq, tk, hq, hkv, d, {q, k, v, out});
  if (d == 64)
    launch_forward<64>(q, k, v, out, lse, batch, tq, tk, hq, hkv, stream);
  else
    launch_forward<128>(q, k, v, out, lse, batch, tq, tk, hq, hkv, stream);
}

void flash_attention_backward(const bf16* q, const bf16* k, const bf16* v, const bf16* out, const float* lse,
                              const bf16* dout, bf16* dq, float* dk, float* dv, float* workspace, std::int64_t batch,
                              std::int64_t tq, std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d,
                              Stream stream) {
  if (batch <= 0 || tq <= 0 || hq <= 0) return;
  check_flash_shape("flash_attention_backward", batch, tq, tk, hq, hkv, d, {q, k, v, out, dout, dq});
  QLORA_CHECK(workspace != nullptr, "flash_attention_backward: no workspace");
  if (d == 64)
    launch_backward<64>(q, k, v, out, lse, dout, dq, dk, dv, workspace, batch, tq, tk, hq, hkv, stream);
  else
    launch_backward<128>(q, k, v, out, lse, dout, dq, dk, dv, workspace, batch, tq, tk, hq, hkv, stream);
}

}  // namespace qlora::cuda
