// Fused dequantize-and-multiply GEMV / skinny GEMM for generation (qlora/cuda/quant.hpp, CPU twin
// qlora/cpu/quant_gemv.hpp): y [batch, rows] = x [batch, cols] deq(W)^T, batch 1, 4, 16.
//
// Two comparisons per shape, both measured in this program:
// * pct_of_ref: against cuBLAS (cublasGemmEx, bf16 inputs, f32 compute) on the dense bf16 W of the same
//   shape, as FLOP/s (same 2 * batch * rows * cols work): above 100 the fused kernel is faster than the
//   bf16 GEMV it replaces.
// * packed_B/s and pct_of_hbm: the packed weight bytes (QuantizedTensor::storage_bytes; x and y are
//   negligible) per second, and that as a percentage of a device-to-device copy's bandwidth
//   (BM_reference_d2d_copy of 256 MiB). Target (docs/design.md): >= 70% at batch 1 on an H100.
// The CPU side times the CPU twin at one small shape against Eigen's f32 GEMM of the dense weight.

#include <memory>
#include <string>

#include "bench_util.hpp"
#include "qlora/quant/quant.hpp"

namespace {

using namespace qlora::bench;

qlora::quant::QuantizedTensor quantized_weight(std::int64_t rows, std::int64_t cols, const std::string& format) {
  const std::vector<float> w = uniform(rows * cols, 7, -0.05f, 0.05f);
  return qlora::quant::quantize(qlora::Tensor::from(w, qlora::Shape{rows, cols}),
                                qlora::quant::QuantConfig::parse(format));
}

double gemv_flops(std::int64_t batch, std::int64_t rows, std::int64_t cols) {
  return 2.0 * double(batch) * double(rows) * double(cols);
}

// ---- CPU (f32) -------------------------------------------------------------------------------------------

void register_cpu() {
  const std::int64_t rows = 1024, cols = 4096, batch = 1;
  const std::string suffix = args({{"batch", batch}, {"rows", rows}, {"cols", cols}});
  auto ref = make_reference("BM_reference_eigen_gemv_f32" + suffix, Work::flops);
  add(
      ref->name,
      [=](benchmark::State& state) {
        const std::vector<float> w = uniform(rows * cols, 7, -0.05f, 0.05f), x = uniform(batch * cols, 8);
        std::vector<float> y = zeros(batch * rows);
        const double seconds = time_cpu(state, [&] {
          eigen_gemm(x.data(), w.data(), y.data(), batch, rows, cols, false, true, 1, 0, 0, 0);
        });
        report_reference(state, *ref, gemv_flops(batch, rows, cols), seconds);
      },
      benchmark::kMillisecond);
  for (const std::string format : {"nf4", "int4-g64"}) {
    add(
        "BM_quant_gemv_cpu_f32_" + format + suffix,
        [=](benchmark::State& state) {
          const qlora::quant::QuantizedTensor q = quantized_weight(rows, cols, format);
          const qlora::Tensor x = qlora::Tensor::from(uniform(batch * cols, 8), qlora::Shape{batch, cols});
          const double seconds = time_cpu(state, [&] { benchmark::DoNotOptimize(qlora::quant::gemv(q, x)); });
          report_kernel(state, *ref, gemv_flops(batch, rows, cols), seconds);
        },
        benchmark::kMillisecond);
  }
}

// ---- CUDA (x bf16, y f32) -----------------------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

void register_cuda_shape(std::int64_t batch, std::int64_t rows, std::int64_t cols, const ReferencePtr& hbm) {
  const std::string suffix = args({{"batch", batch}, {"rows", rows}, {"cols", cols}});
  auto ref = make_reference("BM_reference_cublas_bf16" + suffix, Work::flops);
  add(
      ref->name,
      [=](benchmark::State& state) {
        DeviceBuffer<qlora::bf16> w(rows * cols), x(batch * cols), y(batch * rows);
        fill_uniform(w, 7, -0.05f, 0.05f);
        fill_uniform(x, 8);
        const double seconds = time_cuda(state, [&] {
          cublas_gemm(x.get(), w.get(), y.get(), batch, rows, cols, false, true, 1, 0, 0, 0);
        });
        report_reference(state, *ref, gemv_flops(batch, rows, cols), seconds);
      },
      benchmark::kMicrosecond);

  for (const std::string format : {"nf4", "int4-g64"}) {
    add(
        "BM_quant_gemv_cuda_" + format + suffix,
        [=](benchmark::State& state) {
          const qlora::quant::QuantizedTensor q = quantized_weight(rows, cols, format).to(qlora::Device::cuda(0));
          qlora::cuda::synchronize_device();  // the transfer ran on the library's stream, the kernel runs on stream()
          const qlora::cuda::PackedWeight packed = qlora::quant::packed_weight(q);
          DeviceBuffer<qlora::bf16> x(batch * cols);
          DeviceBuffer<float> y(batch * rows);
          fill_uniform(x, 8);
          const double seconds =
              time_cuda(state, [&] { qlora::cuda::gemv(packed, x.get(), batch, y.get(), stream()); });
          report_kernel(state, *ref, gemv_flops(batch, rows, cols), seconds);
          const double packed_bytes = double(q.storage_bytes());
          state.counters["packed_B/s"] = benchmark::Counter(packed_bytes, benchmark::Counter::kIsIterationInvariantRate,
                                                            benchmark::Counter::OneK::kIs1000);
          if (hbm->rate > 0 && seconds > 0)
            state.counters["pct_of_hbm"] = 100.0 * packed_bytes * double(state.iterations()) / seconds / hbm->rate;
        },
        benchmark::kMicrosecond);
  }
}

void register_cuda() {
  const ReferencePtr hbm = add_d2d_copy_reference("_256MiB", std::int64_t(256) << 20);
  // Llama-7B projection shapes (W is [d_out, d_in]): attention 4096 x 4096, MLP up/gate 11008 x 4096, down 4096 x 11008.
  const std::int64_t shapes[][2] = {{4096, 4096}, {4096, 11008}, {11008, 4096}};
  for (const auto& shape : shapes)
    for (const std::int64_t batch : {1, 4, 16}) register_cuda_shape(batch, shape[0], shape[1], hbm);
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
