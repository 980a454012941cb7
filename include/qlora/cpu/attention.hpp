#pragma once
// CPU twin of cuda/attention.cu: plain causal grouped-query attention (Ainslie et al. 2023), one query
// row at a time. The reference for the fused GPU kernels, so it favours the obvious loops.
//   q: (batch, tq, hq, d)   k, v: (batch, tk, hkv, d)   out: (batch, tq, hq, d)   lse: (batch, hq, tq)
// Query head h reads kv head h / (hq / hkv). With a KV cache tk >= tq: query t sits at absolute position
// tk - tq + t and sees keys 0 .. tk - tq + t.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

namespace detail {

template <class T>
double attention_dot(const T* a, const T* b, std::int64_t d) {
  double s = 0;
  for (std::int64_t c = 0; c < d; ++c) s += double(a[c]) * double(b[c]);
  return s;
}

}  // namespace detail

// S_j = scale q.k_j (scale = 1/sqrt(d)), P = softmax(S) over visible keys, out = sum_j P_j v_j,
// lse = logsumexp(S), saved so the backward can rebuild P = exp(S - lse) without a second softmax.
template <class T>
void attention_forward(const T* q, const T* k, const T* v, T* out, T* lse, std::int64_t batch, std::int64_t tq,
                       std::int64_t tk, std::int64_t hq, std::int64_t hkv, std::int64_t d) {
  const std::int64_t group = hq / hkv;
  const double scale = 1.0 / std::sqrt(double(d));
#pragma omp parallel if (qlora::cpu::worth_parallel(batch * hq * tq * tk * d))
  {
    std::vector<double> p(tk), acc(d);
#pragma omp for
    for (std::int64_t row = 0; row < batch * tq * hq; ++row) {
      const std::int64_t b = row / (tq * hq), t = row / hq % tq, h = row % hq, hk = h / group;
      const T* qi = q + row * d;  // row enumerates (b, t, h) in q's layout
      const std::int64_t last = tk - tq + t;
      double max = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j <= last; ++j) {
        p[j] = scale * detail::attention_dot(qi, k + ((b * tk + j) * hkv + hk) * d, d);
        max = std::max(max, p[j]);
      }
      double sum = 0;
      for (std::int64_t j = 0; j <= last; ++j) {
        p[j] = std::exp(p[j] - max);
        sum += p[j];
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::int64_t j = 0; j <= last; ++j) {
        const T* vj = v + ((b * tk + j) * hkv + hk) * d;
        for (std::int64_t c = 0; c < d; ++c) acc[c] += p[j] * double(vj[c]);
      }
      T* oi = out + row * d;
      for (std::int64_t c = 0; c < d; ++c) oi[c] = T(acc[c] / sum);
      lse[(b * hq + h) * tq + t] = T(max + std::log(sum));
    }
  }
}

// FlashAttention-2's backward (Dao 2023, Alg. 2) one query row at a time, with D_i = dO_i . O_i:
//   P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = scale dS K, dK += scale dS^T Q.
// dq is overwritten; dk and dv accumulate. One thread owns one (batch, kv head): every query head of its
// group writes only that kv head's dk/dv rows, so there are no races.
template <class T>
void attention_backward(const T* q, const T* k, const T* v, const T* out, const T* lse, const T* dout, T* dq,
                        T* dk, T* dv, std::int64_t batch, std::int64_t tq, std::int64_t tk, std::int64_t hq,
                        std::int64_t hkv, std::int64_t d) {
  const std::int64_t group = hq / hkv;
  const double scale = 1.0 / std::sqrt(double(d));
#pragma omp parallel if (qlora::cpu::worth_parallel(3 * batch * hq * tq * tk * d))
  {
    std::vector<double> dq_acc(d);
#pragma omp for
    for (std::int64_t bk = 0; bk < batch * hkv; ++bk) {
      const std::int64_t b = bk / hkv, hk = bk % hkv;
      for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (std::int64_t t = 0; t < tq; ++t) {
          const std::int64_t qrow = ((b * tq + t) * hq + h) * d;
          const T *qi = q + qrow, *oi = out + qrow, *doi = dout + qrow;
          const double lse_i = double(lse[(b * hq + h) * tq + t]);
          const double D = detail::attention_dot(doi, oi, d);
          std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
          for (std::int64_t j = 0; j <= tk - tq + t; ++j) {
            const std::int64_t kvrow = ((b * tk + j) * hkv + hk) * d;
            const T *kj = k + kvrow, *vj = v + kvrow;
            T *dkj = dk + kvrow, *dvj = dv + kvrow;
            const double p = std::exp(scale * detail::attention_dot(qi, kj, d) - lse_i);
            const double ds = p * (detail::attention_dot(doi, vj, d) - D);
            for (std::int64_t c = 0; c < d; ++c) {
              dq_acc[c] += ds * double(kj[c]);
              dkj[c] += T(scale * ds * double(qi[c]));
              dvj[c] += T(p * double(doi[c]));
            }
          }
          for (std::int64_t c = 0; c < d; ++c) dq[qrow + c] = T(scale * dq_acc[c]);
        }
      }
    }
  }
}

}  // namespace qlora::cpu
