#pragma once
// CPU twin of cuda/ops/flash_attention.cu: tiled causal grouped-query attention, FlashAttention-2 (Dao 2023,
// "FlashAttention-2", Alg. 1 forward and Alg. 2 backward), written as the same tile loops the GPU runs so the
// GPU kernel has a reference that follows its order of work, and so the tiling itself is tested on the CPU
// against the plain row-by-row version (qlora/cpu/attention.hpp).
//   q: (batch, tq, hq, d)   k, v: (batch, tk, hkv, d)   out: (batch, tq, hq, d)   lse: (batch, hq, tq)
// Same contract as cpu::attention_forward / attention_backward: query head h reads kv head h / (hq / hkv);
// query t sits at absolute position tk - tq + t (a KV cache of tk - tq earlier keys) and sees keys up to it;
// scale = 1/sqrt(d); dq is overwritten, dk and dv accumulate.
//
// Tiles: Br query rows by Bc keys (template parameters, any sizes: a last partial tile is cut short).
// Forward, per (batch, head, query tile): running row max m, running sum l and an unnormalised O; each key
// tile rescales them by exp(m_old - m_new) (the online softmax), key tiles entirely past the causal diagonal
// are never visited, and at the end O /= l and lse = m + log l. No tq x tk matrix exists, only a Br x Bc tile.
// Backward, per (batch, kv head) with key tiles in the outer loop and query tiles inside (as FA2 does, so dK
// and dV of a key tile stay in one accumulator and need no atomics): P = exp(S - lse) rebuilt from the saved
// lse, D = rowsum(dO * O) computed once per row, dV += P^T dO, dP = dO V^T, dS = P * (dP - D),
// dQ += scale dS K, dK += scale dS^T Q. The query heads of a group all feed their kv head's dK and dV.
// Accumulators are T: float here as on the GPU (f32 accumulation), double for the float64 checks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

namespace detail {

// Where the rows of one (batch, query head) live: q-like tensors are (batch, tq, hq, d), k-like (batch, tk,
// hkv, d). Row t of the head starts at q_row(t), key j at kv_row(j).
struct FlashHead {
  std::int64_t b, h, hk, tq, tk, hq, hkv, d;
  std::int64_t q_row(std::int64_t t) const { return ((b * tq + t) * hq + h) * d; }
  std::int64_t kv_row(std::int64_t j) const { return ((b * tk + j) * hkv + hk) * d; }
  std::int64_t lse_index(std::int64_t t) const { return (b * hq + h) * tq + t; }
  // The last key query t may see (causal with the KV-cache offset).
  std::int64_t last_key(std::int64_t t) const { return tk - tq + t; }
};

template <class T>
T flash_dot(const T* a, const T* b, std::int64_t d) {
  T s = 0;
  for (std::int64_t c = 0; c < d; ++c) s += a[c] * b[c];
  return s;
}

}  // namespace detail

template <std::int64_t Br = 64, std::int64_t Bc = 64, class T>
void flash_attention_forward(const T* q, const T* k, const T* v, T* out, T* lse, std::int64_t batch,
                             std::int64_t tq, std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d) {
  static_assert(Br >= 1 && Bc >= 1, "tile sizes must be positive");
  const std::int64_t group = hq / hkv, query_tiles = (tq + Br - 1) / Br;
  const T scale = T(1) / std::sqrt(T(d));
  const T inf = std::numeric_limits<T>::infinity();
#pragma omp parallel if (qlora::cpu::worth_parallel(batch * hq * tq * tk * d))
  {
    std::vector<T> S(Br * Bc), m(Br), l(Br), O(Br * d);  // one query tile's state
#pragma omp for
    for (std::int64_t task = 0; task < batch * hq * query_tiles; ++task) {
      const std::int64_t b = task / (hq * query_tiles), h = task / query_tiles % hq;
      const std::int64_t i0 = task % query_tiles * Br, rows = std::min(Br, tq - i0);
      const detail::FlashHead head{b, h, h / group, tq, tk, hq, hkv, d};
      std::fill(m.begin(), m.end(), -inf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(O.begin(), O.end(), T(0));
      // Key tiles up to the one holding the last key the tile's last query sees; the rest are skipped.
      for (std::int64_t j0 = 0; j0 <= head.last_key(i0 + rows - 1); j0 += Bc) {
        const std::int64_t cols = std::min(Bc, tk - j0);
        for (std::int64_t r = 0; r < rows; ++r) {
          const T* qi = q + head.q_row(i0 + r);
          T* s = &S[r * Bc];
          T tile_max = -inf;
          for (std::int64_t c = 0; c < cols; ++c) {  // S = scale Q K^T, masked above the diagonal
            s[c] = j0 + c <= head.last_key(i0 + r) ? scale * detail::flash_dot(qi, k + head.kv_row(j0 + c), d) : -inf;
            tile_max = std::max(tile_max, s[c]);
          }
          // Key 0 sits in the first tile and every query sees it, so m_new is finite from the first tile on.
          const T m_new = std::max(m[r], tile_max), rescale = std::exp(m[r] - m_new);
          T* o = &O[r * d];
          T row_sum = 0;
          for (std::int64_t c = 0; c < d; ++c) o[c] *= rescale;
          for (std::int64_t c = 0; c < cols; ++c) {  // P = exp(S - m_new); O += P V
            const T p = std::exp(s[c] - m_new);
            row_sum += p;
            const T* vj = v + head.kv_row(j0 + c);
            for (std::int64_t e = 0; e < d; ++e) o[e] += p * vj[e];
          }
          l[r] = rescale * l[r] + row_sum;
          m[r] = m_new;
        }
      }
      for (std::int64_t r = 0; r < rows; ++r) {
        T* oi = out + head.q_row(i0 + r);
        for (std::int64_t c = 0; c < d; ++c) oi[c] = O[r * d + c] / l[r];
        lse[head.lse_index(i0 + r)] = m[r] + std::log(l[r]);
      }
    }
  }
}

template <std::int64_t Br = 64, std::int64_t Bc = 64, class T>
void flash_attention_backward(const T* q, const T* k, const T* v, const T* out, const T* lse, const T* dout, T* dq,
                              T* dk, T* dv, std::int64_t batch, std::int64_t tq, std::int64_t tk, std::int64_t hq,
                              std::int64_t hkv, std::int64_t d) {
  static_assert(Br >= 1 && Bc >= 1, "tile sizes must be positive");
  const std::int64_t group = hq / hkv;
  const T scale = T(1) / std::sqrt(T(d));
#pragma omp parallel if (qlora::cpu::worth_parallel(3 * batch * hq * tq * tk * d))
  {
    std::vector<T> D(group * tq), P(Br * Bc), dS(Br * Bc), dK(Bc * d), dV(Bc * d);
#pragma omp for
    for (std::int64_t bk = 0; bk < batch * hkv; ++bk) {  // one thread owns a kv head: its dk, dv and dq rows
      const std::int64_t b = bk / hkv, hk = bk % hkv;
      auto head_of = [&](std::int64_t h) { return detail::FlashHead{b, h, hk, tq, tk, hq, hkv, d}; };
      // D = rowsum(dO * O), once per query row; dq is accumulated over key tiles, so it starts at zero.
      for (std::int64_t g = 0; g < group; ++g) {
        const detail::FlashHead head = head_of(hk * group + g);
        for (std::int64_t t = 0; t < tq; ++t) {
          D[g * tq + t] = detail::flash_dot(dout + head.q_row(t), out + head.q_row(t), d);
          std::fill(dq + head.q_row(t), dq + head.q_row(t) + d, T(0));
        }
      }
      for (std::int64_t j0 = 0; j0 < tk; j0 += Bc) {
        const std::int64_t cols = std::min(Bc, tk - j0);
        std::fill(dK.begin(), dK.end(), T(0));
        std::fill(dV.begin(), dV.end(), T(0));
        // Query t sees key j0 when t >= j0 - (tk - tq): the query tiles before that one are skipped.
        const std::int64_t first_query = std::max<std::int64_t>(0, j0 - (tk - tq));
        for (std::int64_t g = 0; g < group; ++g) {
          const detail::FlashHead head = head_of(hk * group + g);
          for (std::int64_t i0 = first_query / Br * Br; i0 < tq; i0 += Br) {
            const std::int64_t rows = std::min(Br, tq - i0);
            // P = exp(S - lse) and dS = P * (dO V^T - D) for the tile.
            for (std::int64_t r = 0; r < rows; ++r) {
              const T *qi = q + head.q_row(i0 + r), *doi = dout + head.q_row(i0 + r);
              const T row_lse = lse[head.lse_index(i0 + r)];
              for (std::int64_t c = 0; c < cols; ++c) {
                const T* kj = k + head.kv_row(j0 + c);
                const T p = j0 + c <= head.last_key(i0 + r) ? std::exp(scale * detail::flash_dot(qi, kj, d) - row_lse)
                                                             : T(0);
                P[r * Bc + c] = p;
                dS[r * Bc + c] = p * (detail::flash_dot(doi, v + head.kv_row(j0 + c), d) - D[g * tq + i0 + r]);
              }
            }
            // dV += P^T dO,  dK += scale dS^T Q,  dQ += scale dS K.
            for (std::int64_t r = 0; r < rows; ++r) {
              const T *qi = q + head.q_row(i0 + r), *doi = dout + head.q_row(i0 + r);
              T* dqi = dq + head.q_row(i0 + r);
              for (std::int64_t c = 0; c < cols; ++c) {
                const T p = P[r * Bc + c], ds = dS[r * Bc + c];
                const T* kj = k + head.kv_row(j0 + c);
                T *dkj = &dK[c * d], *dvj = &dV[c * d];
                for (std::int64_t e = 0; e < d; ++e) {
                  dvj[e] += p * doi[e];
                  dkj[e] += scale * ds * qi[e];
                  dqi[e] += scale * ds * kj[e];
                }
              }
            }
          }
        }
        const detail::FlashHead any_head = head_of(hk * group);  // kv rows do not depend on the query head
        for (std::int64_t c = 0; c < cols; ++c) {
          T *dkj = dk + any_head.kv_row(j0 + c), *dvj = dv + any_head.kv_row(j0 + c);
          for (std::int64_t e = 0; e < d; ++e) {
            dkj[e] += dK[c * d + e];
            dvj[e] += dV[c * d + e];
          }
        }
      }
    }
  }
}

}  // namespace qlora::cpu
