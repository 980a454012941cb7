// Matrix multiply (qlora/cpu/matmul.hpp through Eigen, qlora/cuda/matmul.hpp through cuBLASLt) on both
// backends, in the three layouts of a Linear layer y = x W^T with W stored (out, in):
//   nt: forward       y (tokens, out)  = x (tokens, in) W^T          m = tokens, n = out, k = in
//   nn: input grad    dx (tokens, in)  = dy (tokens, out) W          m = tokens, n = in,  k = out
//   tn: weight grad   dW (out, in)     = dy^T (out, tokens) x        m = out,    n = in,  k = tokens
// FLOP counted: 2 m n k per product. Each shape and layout is paired with the vendor GEMM of the same shape,
// layout and dtype: BM_reference_eigen_gemm (CPU, a plain Eigen product) and BM_reference_cublas_gemm (CUDA,
// cublasGemmEx with f32 accumulation: bf16 on tensor cores, f32 in full f32, no TF32 on either side);
// pct_of_ref compares FLOP per second.

#include "qlora/cpu/matmul.hpp"

#include "bench_util.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/matmul.hpp"
#endif

namespace {

using namespace qlora::bench;

struct Shape {
  std::int64_t m, n, k;
  bool trans_a, trans_b;
};

double flops(const Shape& s) { return 2.0 * double(s.m) * double(s.n) * double(s.k); }

std::string suffix(const Shape& s) {
  return std::string("/") + (s.trans_a ? "t" : "n") + (s.trans_b ? "t" : "n") +
         args({{"m", s.m}, {"n", s.n}, {"k", s.k}});
}

// ---- CPU (f32) -----------------------------------------------------------------------------------------------

void register_cpu() {
  // 512 tokens through a 2048-wide projection (4.3 GFLOP per product): the forward layout only, to stay short.
  for (const Shape s : {Shape{512, 2048, 2048, false, true}}) {
    const std::string name = suffix(s);
    const ReferencePtr ref = make_reference("BM_reference_eigen_gemm_f32" + name, Work::flops);
    add(
        ref->name,
        [=](benchmark::State& state) {
          const std::vector<float> a = uniform(s.m * s.k, 1), b = uniform(s.k * s.n, 2);
          std::vector<float> c = zeros(s.m * s.n);
          const double seconds = time_cpu(state, [&] {
            eigen_gemm(a.data(), b.data(), c.data(), s.m, s.n, s.k, s.trans_a, s.trans_b, 1, 0, 0, 0);
          });
          report_reference(state, *ref, flops(s), seconds);
        },
        benchmark::kMillisecond);
    add(
        "BM_matmul_cpu_f32" + name,
        [=](benchmark::State& state) {
          const std::vector<float> a = uniform(s.m * s.k, 1), b = uniform(s.k * s.n, 2);
          std::vector<float> c = zeros(s.m * s.n);
          const double seconds = time_cpu(state, [&] {
            qlora::cpu::matmul(a.data(), b.data(), c.data(), s.m, s.n, s.k, s.trans_a, s.trans_b, 1.0f, 0.0f, 1, 0, 0,
                               0);
          });
          report_kernel(state, *ref, flops(s), seconds);
        },
        benchmark::kMillisecond);
  }
}

// ---- CUDA (bf16 in and out, and f32) ---------------------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

template <class T>
void register_cuda_shape(const Shape& s) {
  const std::string name = std::string(dtype_name<T>()) + suffix(s);
  const ReferencePtr ref = make_reference("BM_reference_cublas_gemm_" + name, Work::flops);
  add(
      ref->name,
      [=](benchmark::State& state) {
        DeviceBuffer<T> a(s.m * s.k), b(s.k * s.n), c(s.m * s.n);
        fill_uniform(a, 1);
        fill_uniform(b, 2);
        const double seconds = time_cuda(
            state, [&] { cublas_gemm(a.get(), b.get(), c.get(), s.m, s.n, s.k, s.trans_a, s.trans_b, 1, 0, 0, 0); });
        report_reference(state, *ref, flops(s), seconds);
      },
      benchmark::kMicrosecond);
  add(
      "BM_matmul_cuda_" + name,
      [=](benchmark::State& state) {
        DeviceBuffer<T> a(s.m * s.k), b(s.k * s.n), c(s.m * s.n);
        fill_uniform(a, 1);
        fill_uniform(b, 2);
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::matmul<T, T, T>(a.get(), b.get(), c.get(), s.m, s.n, s.k, s.trans_a, s.trans_b, 1.0f, 0.0f, 1, 0,
                                       0, 0, stream());
        });
        report_kernel(state, *ref, flops(s), seconds);
      },
      benchmark::kMicrosecond);
}

void register_cuda() {
  // Llama-7B training shapes at 4096 tokens (2 sequences of 2048): the attention projections (4096 -> 4096) in
  // all three layouts, and the MLP's up projection (4096 -> 11008) forward.
  const Shape shapes[] = {
      {4096, 4096, 4096, false, true},   // nt: q/k/v/o forward
      {4096, 4096, 4096, false, false},  // nn: input gradient
      {4096, 4096, 4096, true, false},   // tn: weight gradient
      {4096, 11008, 4096, false, true},  // nt: gate/up forward
  };
  for (const Shape& s : shapes) register_cuda_shape<qlora::bf16>(s);
  for (const Shape& s : shapes) register_cuda_shape<float>(s);
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
