// Causal grouped-query attention, forward and backward, on both backends: the plain kernels
// (qlora/cpu/attention.hpp, qlora/cuda/attention.hpp) and the fused FlashAttention-2 ones
// (qlora/cpu/flash_attention.hpp, qlora/cuda/flash_attention.hpp).
//
// FLOP counted (the FlashAttention convention; softmax and scaling not counted), with
// visible = sum_t (tk - tq + t + 1) = tq (tk - tq) + tq (tq + 1) / 2 the (query, key) pairs the causal mask keeps
// (about half of tq tk when tq == tk: causal halves the work):
//   forward:  4 batch hq d visible    (S = Q K^T and O = P V, 2 FLOP per multiply-add)
//   backward: 10 batch hq d visible   (S recomputed, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q)
// The reference is the same-shape pair of GEMMs a non-causal attention does, S = Q K^T (tq x tk x d) and
// O = S V (tq x d x tk), batched over batch * hq heads (each query head with its own K and V, whatever hkv
// is), 4 batch hq tq tk d FLOP: BM_reference_eigen_attention_gemms (CPU, Eigen) and
// BM_reference_cublas_attention_gemms (CUDA, cublasGemmStridedBatchedEx with f32 accumulation).
// pct_of_ref compares FLOP per second, forward and backward alike against that one reference (the design's
// target: forward + backward >= 50% of the cuBLAS-GEMM-equivalent rate).
// The backward accumulates into dk and dv across iterations (as it does across micro-batches); the zeroing a
// training step does first is not timed.
// Flash cases at Llama-2-7B shapes (32 heads, d = 128, sequence 2048 and 4096, batch 1, 2, 4): forward, and
// forward + backward (one training step's attention: 14 batch hq d visible FLOP), each beside its same-size
// cuBLAS reference; the FLOP/s counter is the TFLOP/s figure (T/s), pct_of_ref the fraction of cuBLAS's.

#include "qlora/cpu/attention.hpp"
#include "qlora/cpu/flash_attention.hpp"

#include "bench_util.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/attention.hpp"
#include "qlora/cuda/flash_attention.hpp"
#endif

namespace {

using namespace qlora::bench;

struct Shape {
  std::int64_t batch, tq, tk, hq, hkv, d;

  std::int64_t q_size() const { return batch * tq * hq * d; }
  std::int64_t kv_size() const { return batch * tk * hkv * d; }
  std::int64_t lse_size() const { return batch * hq * tq; }
  double visible() const { return double(tq) * double(tk - tq) + double(tq) * double(tq + 1) / 2.0; }
  double forward_flops() const { return 4.0 * double(batch * hq * d) * visible(); }
  double backward_flops() const { return 10.0 * double(batch * hq * d) * visible(); }
  double reference_flops() const { return 4.0 * double(batch * hq * d) * double(tq) * double(tk); }
  std::string suffix() const {
    return args({{"batch", batch}, {"tq", tq}, {"tk", tk}, {"hq", hq}, {"hkv", hkv}, {"d", d}});
  }
};

// ---- CPU (f32) -----------------------------------------------------------------------------------------------

void register_cpu() {
  // A small GQA layer (8 query heads sharing 2 kv heads, head dim 64) over 256 tokens: the CPU twin is the plain
  // reference loop, so the shape is kept small enough for seconds on 2 cores.
  const Shape s{1, 256, 256, 8, 2, 64};
  const std::string suffix = s.suffix();
  const ReferencePtr ref = make_reference("BM_reference_eigen_attention_gemms_f32" + suffix, Work::flops);

  add(
      ref->name,
      [=](benchmark::State& state) {
        const std::int64_t heads = s.batch * s.hq;
        const std::vector<float> q = uniform(heads * s.tq * s.d, 1), k = uniform(heads * s.tk * s.d, 2),
                                 v = uniform(heads * s.tk * s.d, 3);
        std::vector<float> scores = zeros(heads * s.tq * s.tk), out = zeros(heads * s.tq * s.d);
        const double seconds = time_cpu(state, [&] {
          eigen_gemm(q.data(), k.data(), scores.data(), s.tq, s.tk, s.d, false, true, heads, s.tq * s.d, s.tk * s.d,
                     s.tq * s.tk);
          eigen_gemm(scores.data(), v.data(), out.data(), s.tq, s.d, s.tk, false, false, heads, s.tq * s.tk, s.tk * s.d,
                     s.tq * s.d);
        });
        report_reference(state, *ref, s.reference_flops(), seconds);
      },
      benchmark::kMillisecond);

  add(
      "BM_attention_forward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> q = uniform(s.q_size(), 1), k = uniform(s.kv_size(), 2), v = uniform(s.kv_size(), 3);
        std::vector<float> out = zeros(s.q_size()), lse = zeros(s.lse_size());
        const double seconds = time_cpu(state, [&] {
          qlora::cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq,
                                        s.hkv, s.d);
        });
        report_kernel(state, *ref, s.forward_flops(), seconds);
      },
      benchmark::kMillisecond);

  add(
      "BM_flash_attention_forward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> q = uniform(s.q_size(), 1), k = uniform(s.kv_size(), 2), v = uniform(s.kv_size(), 3);
        std::vector<float> out = zeros(s.q_size()), lse = zeros(s.lse_size());
        const double seconds = time_cpu(state, [&] {
          qlora::cpu::flash_attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq,
                                              s.tk, s.hq, s.hkv, s.d);
        });
        report_kernel(state, *ref, s.forward_flops(), seconds);
      },
      benchmark::kMillisecond);

  add(
      "BM_attention_backward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> q = uniform(s.q_size(), 1), k = uniform(s.kv_size(), 2), v = uniform(s.kv_size(), 3),
                                 dout = uniform(s.q_size(), 4);
        std::vector<float> out = zeros(s.q_size()), lse = zeros(s.lse_size()), dq = zeros(s.q_size()),
                           dk = zeros(s.kv_size()), dv = zeros(s.kv_size());
        qlora::cpu::attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), s.batch, s.tq, s.tk, s.hq,
                                      s.hkv, s.d);
        const double seconds = time_cpu(state, [&] {
          qlora::cpu::attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), dout.data(), dq.data(),
                                         dk.data(), dv.data(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d);
        });
        report_kernel(state, *ref, s.backward_flops(), seconds);
      },
      benchmark::kMillisecond);
}

// ---- CUDA (bf16; lse, dk, dv f32) -------------------------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

// The plain kernels take milliseconds (the backward's per-channel atomics far more), so one warm-up call.
constexpr int kWarmup = 1;

// BM_reference_cublas_attention_gemms_<name>: the same-size pair of cuBLAS GEMMs, registered before the kernels
// it is paired with.
template <class T>
ReferencePtr add_cublas_reference(const Shape& s, const std::string& name) {
  const ReferencePtr ref = make_reference("BM_reference_cublas_attention_gemms_" + name, Work::flops);
  add(
      ref->name,
      [=](benchmark::State& state) {
        const std::int64_t heads = s.batch * s.hq;
        DeviceBuffer<T> q(heads * s.tq * s.d), k(heads * s.tk * s.d), v(heads * s.tk * s.d),
            scores(heads * s.tq * s.tk), out(heads * s.tq * s.d);
        fill_uniform(q, 1);
        fill_uniform(k, 2);
        fill_uniform(v, 3);
        const double seconds = time_cuda(state, [&] {
          cublas_gemm(q.get(), k.get(), scores.get(), s.tq, s.tk, s.d, false, true, heads, s.tq * s.d, s.tk * s.d,
                      s.tq * s.tk);
          cublas_gemm(scores.get(), v.get(), out.get(), s.tq, s.d, s.tk, false, false, heads, s.tq * s.tk, s.tk * s.d,
                      s.tq * s.d);
        });
        report_reference(state, *ref, s.reference_flops(), seconds);
      },
      benchmark::kMicrosecond);
  return ref;
}

template <class T>
ReferencePtr register_cuda_shape(const Shape& s) {
  const std::string name = std::string(dtype_name<T>()) + s.suffix();
  const ReferencePtr ref = add_cublas_reference<T>(s, name);

  add(
      "BM_attention_forward_cuda_" + name,
      [=](benchmark::State& state) {
        DeviceBuffer<T> q(s.q_size()), k(s.kv_size()), v(s.kv_size()), out(s.q_size());
        DeviceBuffer<float> lse(s.lse_size());
        fill_uniform(q, 1);
        fill_uniform(k, 2);
        fill_uniform(v, 3);
        const double seconds = time_cuda(
            state,
            [&] {
              qlora::cuda::attention_forward<T>(q.get(), k.get(), v.get(), out.get(), lse.get(), s.batch, s.tq, s.tk,
                                                s.hq, s.hkv, s.d, stream());
            },
            kWarmup);
        report_kernel(state, *ref, s.forward_flops(), seconds);
      },
      benchmark::kMicrosecond);

  add(
      "BM_attention_backward_cuda_" + name,
      [=](benchmark::State& state) {
        DeviceBuffer<T> q(s.q_size()), k(s.kv_size()), v(s.kv_size()), out(s.q_size()), dout(s.q_size()),
            dq(s.q_size());
        DeviceBuffer<float> lse(s.lse_size()), dk(s.kv_size()), dv(s.kv_size());
        fill_uniform(q, 1);
        fill_uniform(k, 2);
        fill_uniform(v, 3);
        fill_uniform(dout, 4);
        fill_uniform(dk, 5);
        fill_uniform(dv, 6);
        qlora::cuda::attention_forward<T>(q.get(), k.get(), v.get(), out.get(), lse.get(), s.batch, s.tq, s.tk, s.hq,
                                          s.hkv, s.d, stream());
        const double seconds = time_cuda(
            state,
            [&] {
              qlora::cuda::attention_backward<T>(q.get(), k.get(), v.get(), out.get(), lse.get(), dout.get(), dq.get(),
                                                 dk.get(), dv.get(), s.batch, s.tq, s.tk, s.hq, s.hkv, s.d, stream());
            },
            kWarmup);
        report_kernel(state, *ref, s.backward_flops(), seconds);
      },
      benchmark::kMicrosecond);
  return ref;
}

// The flash kernels (bf16 only): forward, and forward + backward as a training step runs them.
// `ref`: the shape's reference when the plain kernels registered it already.
void register_flash_shape(const Shape& s, ReferencePtr ref = nullptr) {
  const std::string name = "bf16" + s.suffix();
  if (!ref) ref = add_cublas_reference<qlora::bf16>(s, name);
  using qlora::bf16;

  add(
      "BM_flash_attention_forward_cuda_" + name,
      [=](benchmark::State& state) {
        DeviceBuffer<bf16> q(s.q_size()), k(s.kv_size()), v(s.kv_size()), out(s.q_size());
        DeviceBuffer<float> lse(s.lse_size());
        fill_uniform(q, 1);
        fill_uniform(k, 2);
        fill_uniform(v, 3);
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::flash_attention_forward(q.get(), k.get(), v.get(), out.get(), lse.get(), s.batch, s.tq, s.tk,
                                               s.hq, s.hkv, s.d, stream());
        });
        report_kernel(state, *ref, s.forward_flops(), seconds);
      },
      benchmark::kMicrosecond);

  add(
      "BM_flash_attention_forward_backward_cuda_" + name,
      [=](benchmark::State& state) {
        DeviceBuffer<bf16> q(s.q_size()), k(s.kv_size()), v(s.kv_size()), out(s.q_size()), dout(s.q_size()),
            dq(s.q_size());
        DeviceBuffer<float> lse(s.lse_size()), dk(s.kv_size()), dv(s.kv_size()),
            workspace(qlora::cuda::flash_attention_backward_workspace(s.batch, s.tq, s.hq, s.d));
        fill_uniform(q, 1);
        fill_uniform(k, 2);
        fill_uniform(v, 3);
        fill_uniform(dout, 4);
        fill_uniform(dk, 5);
        fill_uniform(dv, 6);
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::flash_attention_forward(q.get(), k.get(), v.get(), out.get(), lse.get(), s.batch, s.tq, s.tk,
                                               s.hq, s.hkv, s.d, stream());
          qlora::cuda::flash_attention_backward(q.get(), k.get(), v.get(), out.get(), lse.get(), dout.get(), dq.get(),
                                                dk.get(), dv.get(), workspace.get(), s.batch, s.tq, s.tk, s.hq, s.hkv,
                                                s.d, stream());
        });
        report_kernel(state, *ref, s.forward_flops() + s.backward_flops(), seconds);
      },
      benchmark::kMicrosecond);
}

void register_cuda() {
  // The plain kernels on one 2048-token sequence: Llama-2-7B (32 heads, multi-head) and Llama-3-8B (32 query
  // heads sharing 8 kv heads), head dim 128.
  const Shape llama2{1, 2048, 2048, 32, 32, 128}, llama3{1, 2048, 2048, 32, 8, 128};
  const ReferencePtr llama2_ref = register_cuda_shape<qlora::bf16>(llama2);
  const ReferencePtr llama3_ref = register_cuda_shape<qlora::bf16>(llama3);
  // The flash kernels at Llama-2-7B shapes (sequence 2048 and 4096, batch 1, 2, 4), and the Llama-3-8B one.
  register_flash_shape(llama2, llama2_ref);
  register_flash_shape(llama3, llama3_ref);
  for (const std::int64_t seq : {2048, 4096}) {
    for (const std::int64_t batch : {1, 2, 4})
      if (seq != 2048 || batch != 1) register_flash_shape(Shape{batch, seq, seq, 32, 32, 128});
  }
}

#endif  // QLORA_WITH_CUDA

}  // namespace

int main(int argc, char** argv) {
#if defined(QLORA_WITH_CUDA)
  return bench_main(argc, argv, register_cpu, register_cuda);
#else
  return bench_main(argc, argv, register_cpu, nullptr);
#endif
}
