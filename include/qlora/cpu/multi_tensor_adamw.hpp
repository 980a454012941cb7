#pragma once
// CPU twin of cuda/train/multi_tensor_adamw.cu: one AdamW step over many tensors at once, walking the same
// table of (tensor, [begin, end)) chunks that the CUDA kernel walks with one block per chunk (the
// multi_tensor_apply scheme of apex and PyTorch's fused optimizers, with the table in device memory so a
// launch has no limit on the number of tensors).
//
// The update is torch.optim.AdamW's (decoupled weight decay before the moments, eps after the
// bias-corrected sqrt); the per-step factors are formed once in double, as PyTorch does in Python floats:
//   g = grad_scale * grad
//   p *= 1 - lr * wd
//   m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p -= (lr / (1 - b1^step)) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)
// adamw_update_moments + adamw_updated_param are the single definition of that arithmetic: the CUDA kernel
// calls them too.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#if !defined(__CUDACC__)  // the .cu files need the types and the arithmetic only; Eigen stays out of nvcc
#include <Eigen/Core>
#endif

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"  // QLORA_HD
#include "qlora/cpu/parallel.hpp"

namespace qlora::cpu {

// One parameter tensor of the table: pointers to its value, gradient and the two moments, all of numel.
template <class T>
struct AdamWTensor {
  T* param = nullptr;
  const T* grad = nullptr;
  T* exp_avg = nullptr;     // m, the first moment
  T* exp_avg_sq = nullptr;  // v, the second moment
  std::int64_t numel = 0;
};

// Elements [begin, end) of tensor `tensor` of the table: the unit of work (one CUDA block, one OpenMP item).
struct TensorChunk {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  std::int32_t tensor = 0;
  std::int32_t unused = 0;  // keeps the struct 24 bytes with no implicit padding
};

// 16 Ki elements: 64 KiB of each f32 array per chunk, a multiple of the kernel's 4-wide vector loads, and
// small enough that the LoRA tensors of a 7B model (0.26M to 0.7M elements each) give thousands of chunks,
// several waves of blocks on a 132-SM GPU.
inline constexpr std::int64_t kAdamWChunkElements = 16384;

// The chunk table of tensors with these element counts: each tensor cut into chunk_size pieces (the last
// one shorter), in tensor order; empty tensors give no chunk.
inline std::vector<TensorChunk> make_tensor_chunks(std::span<const std::int64_t> numels,
                                                   std::int64_t chunk_size = kAdamWChunkElements) {
  QLORA_CHECK(chunk_size > 0, "make_tensor_chunks: chunk size " + std::to_string(chunk_size) + " is not positive");
  QLORA_CHECK(numels.size() < (std::size_t(1) << 31),
              "make_tensor_chunks: " + std::to_string(numels.size()) + " tensors do not fit an int32 index");
  std::vector<TensorChunk> chunks;
  for (std::size_t t = 0; t < numels.size(); ++t) {
    QLORA_CHECK(numels[t] >= 0, "make_tensor_chunks: tensor " + std::to_string(t) + " has " +
                                    std::to_string(numels[t]) + " elements");
    for (std::int64_t begin = 0; begin < numels[t]; begin += chunk_size)
      chunks.push_back({begin, std::min(numels[t], begin + chunk_size), std::int32_t(t), 0});
  }
  return chunks;
}

// The per-step factors of the update, in the element type (f32 on the device).
template <class T>
struct AdamWFactors {
  T beta1, beta2, eps;
  T decay;                  // 1 - lr * wd
  T step_size;              // lr / (1 - beta1^step)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  T grad_scale;
};

// step is 1-based (the count of updates including this one).
template <class T>
AdamWFactors<T> adamw_factors(double lr, double beta1, double beta2, double eps, double weight_decay,
                              std::int64_t step, double grad_scale) {
  QLORA_CHECK(step >= 1, "adamw: step " + std::to_string(step) + " is not 1-based");
  const double bias_correction1 = 1.0 - std::pow(beta1, double(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, double(step));
  return {T(beta1),
          T(beta2),
          T(eps),
          T(1.0 - lr * weight_decay),
          T(lr / bias_correction1),
          T(std::sqrt(bias_correction2)),
          T(grad_scale)};
}

// One element of the update, in two halves (host and device): the moments, then the parameter from the new
// moments and sqrt(v). The CUDA kernel calls both with sqrtf; the CPU twin takes the square roots of a chunk
// through Eigen, which vectorises them (GCC will not vectorise std::sqrt while it may have to set errno).
template <class T>
QLORA_HD void adamw_update_moments(T grad, T& exp_avg, T& exp_avg_sq, const AdamWFactors<T>& f) {
  const T g = f.grad_scale * grad;
  exp_avg = f.beta1 * exp_avg + (T(1) - f.beta1) * g;
  exp_avg_sq = f.beta2 * exp_avg_sq + (T(1) - f.beta2) * g * g;
}
template <class T>
QLORA_HD T adamw_updated_param(T param, T exp_avg, T sqrt_exp_avg_sq, const AdamWFactors<T>& f) {
  return param * f.decay - f.step_size * exp_avg / (sqrt_exp_avg_sq / f.bias_correction2_sqrt + f.eps);
}

#if !defined(__CUDACC__)
// One AdamW step over every chunk of the table (chunks from make_tensor_chunks over the tensors' numels).
// Each chunk in three passes, all over data the first pass brought into cache: moments, sqrt(v), parameter.
template <class T>
void multi_tensor_adamw(const AdamWTensor<T>* tensors, const TensorChunk* chunks, std::int64_t num_chunks,
                        const AdamWFactors<T>& factors) {
  using Array = Eigen::Array<T, Eigen::Dynamic, 1>;
  std::int64_t longest = 0, total = 0;
  for (std::int64_t c = 0; c < num_chunks; ++c) {
    longest = std::max(longest, chunks[c].end - chunks[c].begin);
    total += chunks[c].end - chunks[c].begin;
  }
#pragma omp parallel if (qlora::cpu::worth_parallel(total))
  {
    Array sqrt_v(longest);
#pragma omp for schedule(static)
    for (std::int64_t c = 0; c < num_chunks; ++c) {
      const TensorChunk chunk = chunks[c];
      const AdamWTensor<T>& t = tensors[chunk.tensor];
      const std::int64_t begin = chunk.begin, len = chunk.end - chunk.begin;
      T* param = t.param + begin;
      const T* grad = t.grad + begin;
      T* m = t.exp_avg + begin;
      T* v = t.exp_avg_sq + begin;
#pragma omp simd  // the four arrays never overlap (a requirement of the table)
      for (std::int64_t i = 0; i < len; ++i) adamw_update_moments(grad[i], m[i], v[i], factors);
      Eigen::Map<Array>(sqrt_v.data(), len) = Eigen::Map<const Array>(v, len).sqrt();
      const T* root = sqrt_v.data();
#pragma omp simd
      for (std::int64_t i = 0; i < len; ++i) param[i] = adamw_updated_param(param[i], m[i], root[i], factors);
    }
  }
}
#endif  // !__CUDACC__

}  // namespace qlora::cpu
