// Dequantization of the packed formats (qlora/cpu/quant_*.hpp, qlora/cuda/quant.hpp) into a workspace.
// Memory-bound: each shape is paired with a copy moving the same number of bytes (BM_reference_memcpy on
// the CPU, BM_reference_d2d_copy on CUDA), and pct_of_ref is the kernel's bytes per second as a percentage
// of the copy's. Target (docs/design.md): >= 80% of the copy on an H100.
//
// Bytes counted: everything the format stores (packed codes with their row padding, scales, zeros, double
// quantization constants: QuantizedTensor::storage_bytes) read once, plus the output written once
// (f32 on the CPU, bf16 on CUDA: the training workspace). The paired copy moves half that total, so its
// traffic (read + write) equals the kernel's.

#include <string>

#include "bench_util.hpp"
#include "qlora/quant/quant.hpp"

namespace {

using namespace qlora::bench;

// A host weight [rows, cols] of uniform values in [-0.05, 0.05) (Philox; never zeros), quantized.
qlora::quant::QuantizedTensor quantized_weight(std::int64_t rows, std::int64_t cols, const std::string& format) {
  const std::vector<float> w = uniform(rows * cols, 7, -0.05f, 0.05f);
  return qlora::quant::quantize(qlora::Tensor::from(w, qlora::Shape{rows, cols}),
                                qlora::quant::QuantConfig::parse(format));
}

// Bytes the format stores for a rows x cols weight (= QuantizedTensor::storage_bytes, by bits_per_weight).
double stored_bytes(const std::string& format, std::int64_t rows, std::int64_t cols) {
  return qlora::quant::bits_per_weight(qlora::quant::QuantConfig::parse(format), rows, cols) * double(rows) *
         double(cols) / 8.0;
}

// ---- CPU (f32 output, the CPU backend's precision) ---------------------------------------------------------

void register_cpu() {
  const std::int64_t rows = 1024, cols = 4096;
  for (const std::string format : {"nf4", "int4-g64"}) {
    const std::string suffix = "_" + format + args({{"rows", rows}, {"cols", cols}});
    const double out_bytes = double(rows * cols) * sizeof(float);
    const double in_bytes = stored_bytes(format, rows, cols);
    const ReferencePtr ref = add_memcpy_reference(suffix, std::int64_t((in_bytes + out_bytes) / 2));
    add(
        "BM_dequantize_cpu_f32" + suffix,
        [=](benchmark::State& state) {
          const qlora::quant::QuantizedTensor q = quantized_weight(rows, cols, format);
          qlora::Tensor out = qlora::Tensor::empty(qlora::Shape{rows, cols}, qlora::DType::f32);
          const double seconds = time_cpu(state, [&] { qlora::quant::dequantize_rows_into(q, 0, rows, out); });
          report_kernel(state, *ref, in_bytes + out_bytes, seconds);
        },
        benchmark::kMillisecond);
  }
}

// ---- CUDA (bf16 workspace) ------------------------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

void register_cuda_shape(std::int64_t rows, std::int64_t cols, const std::string& format) {
  const std::string suffix = "_" + format + args({{"rows", rows}, {"cols", cols}});
  const double out_bytes = double(rows * cols) * sizeof(qlora::bf16);
  const double in_bytes = stored_bytes(format, rows, cols);
  const ReferencePtr ref = add_d2d_copy_reference(suffix, std::int64_t((in_bytes + out_bytes) / 2) / 16 * 16);
  add(
      "BM_dequantize_cuda_bf16" + suffix,
      [=](benchmark::State& state) {
        const qlora::quant::QuantizedTensor q = quantized_weight(rows, cols, format).to(qlora::Device::cuda(0));
        qlora::cuda::synchronize_device();  // the transfer ran on the library's stream, the kernel runs on stream()
        const qlora::cuda::PackedWeight packed = qlora::quant::packed_weight(q);
        DeviceBuffer<qlora::bf16> out(rows * cols);
        const double seconds =
            time_cuda(state, [&] { qlora::cuda::dequantize_rows(packed, 0, rows, out.get(), stream()); });
        report_kernel(state, *ref, in_bytes + out_bytes, seconds);
      },
      benchmark::kMicrosecond);
}

void register_cuda() {
  // Llama-7B projection shapes (W is [d_out, d_in]): attention 4096 x 4096, MLP up/gate 11008 x 4096, down 4096 x 11008.
  const std::int64_t shapes[][2] = {{4096, 4096}, {4096, 11008}, {11008, 4096}};
  for (const auto& shape : shapes)
    for (const std::string format : {"nf4", "int4-g64", "int3-g64", "int2-g64"})
      register_cuda_shape(shape[0], shape[1], format);
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
