// One AdamW step over all adapter parameters in a single launch (the multi_tensor_apply scheme of apex and
// PyTorch's fused AdamW): the host uploads a table of tensors (param, grad, m, v pointers and sizes) and of
// 16 Ki-element chunks once; block b updates chunk b. Unlike apex, the table lives in device memory rather
// than in the kernel's parameter space, so there is no limit on tensors per launch and no re-launching.
//
// Memory-bound: 7 f32 accesses per element (read p, g, m, v; write p, m, v). Each thread keeps
// kVectorsPerThread float4 loads of every array in flight before computing, for memory-level parallelism;
// a chunk whose pointers are not 16-byte aligned (a tensor view at an odd offset) and the tail of a tensor
// whose size is not a multiple of 4 take a scalar loop. The arithmetic is the CPU twin's
// (cpu::adamw_update_moments, cpu::adamw_updated_param); results differ from it only where nvcc contracts a
// multiply and an add into an FMA.
// Not done: bf16 parameters or gradients, a fused gradient-norm pass.

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "qlora/cuda/multi_tensor_adamw.hpp"

namespace qlora::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int kVectorsPerThread = 4;
static_assert(cpu::kAdamWChunkElements % (4 * kThreads) == 0, "chunks hold whole float4 rows of the block");

// The update of one element: the CPU twin's two halves, with sqrtf (IEEE round-to-nearest, as std::sqrt).
__device__ __forceinline__ void update(float& p, float g, float& m, float& v, const AdamWFactors<float>& f) {
  cpu::adamw_update_moments(g, m, v, f);
  p = cpu::adamw_updated_param(p, m, sqrtf(v), f);
}

__device__ __forceinline__ void update4(float4& p, const float4& g, float4& m, float4& v,
                                        const AdamWFactors<float>& f) {
  update(p.x, g.x, m.x, v.x, f);
  update(p.y, g.y, m.y, v.y, f);
  update(p.z, g.z, m.z, v.z, f);
  update(p.w, g.w, m.w, v.w, f);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

__global__ void __launch_bounds__(kThreads)
    multi_tensor_adamw_kernel(const AdamWTensor<float>* __restrict__ tensors, const TensorChunk* __restrict__ chunks,
                              std::int64_t num_chunks, AdamWFactors<float> f) {
  for (std::int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const TensorChunk chunk = chunks[c];
    const AdamWTensor<float> t = tensors[chunk.tensor];
    std::int64_t scalar_begin = chunk.begin;
    // Chunk begins are multiples of the chunk size (a multiple of 4), so 16-byte aligned bases suffice.
    if (aligned16(t.param) && aligned16(t.grad) && aligned16(t.exp_avg) && aligned16(t.exp_avg_sq) &&
        chunk.begin % 4 == 0) {
      const std::int64_t vector_begin = chunk.begin / 4, vector_end = vector_begin + (chunk.end - chunk.begin) / 4;
      float4* p4 = reinterpret_cast<float4*>(t.param);
      const float4* g4 = reinterpret_cast<const float4*>(t.grad);
      float4* m4 = reinterpret_cast<float4*>(t.exp_avg);
      float4* v4 = reinterpret_cast<float4*>(t.exp_avg_sq);
      for (std::int64_t base = vector_begin + threadIdx.x; base < vector_end;
           base += std::int64_t(kThreads) * kVectorsPerThread) {
        float4 p[kVectorsPerThread], g[kVectorsPerThread], m[kVectorsPerThread], v[kVectorsPerThread];
#pragma unroll
        for (int k = 0; k < kVectorsPerThread; ++k) {
          const std::int64_t i = base + std::int64_t(k) * kThreads;
          if (i < vector_end) {
            p[k] = p4[i];
            g[k] = __ldg(g4 + i);
            m[k] = m4[i];
            v[k] = v4[i];
          }
        }
#pragma unroll
        for (int k = 0; k < kVectorsPerThread; ++k) {
          const std::int64_t i = base + std::int64_t(k) * kThreads;
          if (i < vector_end) {
            update4(p[k], g[k], m[k], v[k], f);
            p4[i] = p[k];
            m4[i] = m[k];
            v4[i] = v[k];
          }
        }
      }
      scalar_begin = vector_end * 4;
    }
    for (std::int64_t i = scalar_begin + threadIdx.x; i < chunk.end; i += kThreads)
      update(t.param[i], t.grad[i], t.exp_avg[i], t.exp_avg_sq[i], f);
  }
}

}  // namespace

void multi_tensor_adamw(const AdamWTensor<float>* tensors, const TensorChunk* chunks, std::int64_t num_chunks,
                        const AdamWFactors<float>& factors, Stream stream) {
  if (num_chunks <= 0) return;
  const auto grid = unsigned(std::min<std::int64_t>(num_chunks, std::int64_t(1) << 30));
  multi_tensor_adamw_kernel<<<grid, kThreads, 0, stream>>>(tensors, chunks, num_chunks, factors);
  check_launch("multi_tensor_adamw_kernel");
}

}  // namespace qlora::cuda
