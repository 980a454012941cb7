// RMSNorm forward and backward (qlora/cpu/rmsnorm.hpp, qlora/cuda/rmsnorm.hpp) on both backends.
// RMSNorm is memory-bound (a handful of flops per element), so each shape is paired with a copy of one
// (rows, cols) array of the same dtype: BM_reference_memcpy (CPU) / BM_reference_d2d_copy (CUDA), and
// pct_of_ref is the kernel's bytes per second as a percentage of the copy's.
//
// Bytes counted (the least each pass must move; a kernel that reads a row twice gets no credit for it):
//   forward:  read x, w; write y, rstd                       = (2 rows cols + cols) s + rows r
//   backward: read x, dy, w, rstd; write dx; dw += (r/w)     = (3 rows cols + cols) s + rows r + 2 cols g
// with s the element size, r the size of rstd (f32 on CUDA, T on CPU), g the size of dw (f32 on CUDA).

#include "qlora/cpu/rmsnorm.hpp"

#include "bench_util.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/rmsnorm.hpp"
#endif

namespace {

using namespace qlora::bench;

constexpr float kEps = 1e-5f;

double forward_bytes(std::int64_t rows, std::int64_t cols, double elem, double stat) {
  return (2.0 * double(rows) * double(cols) + double(cols)) * elem + double(rows) * stat;
}
double backward_bytes(std::int64_t rows, std::int64_t cols, double elem, double stat, double grad) {
  return (3.0 * double(rows) * double(cols) + double(cols)) * elem + double(rows) * stat + 2.0 * double(cols) * grad;
}

// ---- CPU (f32, the CPU backend's precision) --------------------------------------------------------------

void register_cpu() {
  const std::int64_t rows = 512, cols = 2048;  // 4 MiB per array: a Llama-ish row width, short on 2 cores
  const std::string suffix = args({{"rows", rows}, {"cols", cols}});
  const ReferencePtr ref = add_memcpy_reference("_f32" + suffix, rows * cols * std::int64_t(sizeof(float)));

  add(
      "BM_rmsnorm_forward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> x = uniform(rows * cols, 1), w = uniform(cols, 2, 0.5f, 1.5f);
        std::vector<float> y = zeros(rows * cols), rstd = zeros(rows);
        const double seconds = time_cpu(
            state, [&] { qlora::cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, cols, kEps); });
        report_kernel(state, *ref, forward_bytes(rows, cols, 4, 4), seconds);
      },
      benchmark::kMillisecond);

  add(
      "BM_rmsnorm_backward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> x = uniform(rows * cols, 1), w = uniform(cols, 2, 0.5f, 1.5f),
                                 dy = uniform(rows * cols, 3);
        std::vector<float> y = zeros(rows * cols), rstd = zeros(rows), dx = zeros(rows * cols), dw = uniform(cols, 4);
        qlora::cpu::rmsnorm_forward(x.data(), w.data(), y.data(), rstd.data(), rows, cols, kEps);
        const double seconds = time_cpu(state, [&] {
          qlora::cpu::rmsnorm_backward(x.data(), w.data(), rstd.data(), dy.data(), dx.data(), dw.data(), rows, cols);
        });
        report_kernel(state, *ref, backward_bytes(rows, cols, 4, 4, 4), seconds);
      },
      benchmark::kMillisecond);
}

// ---- CUDA (bf16 and f32 storage; rstd and dw are f32) ------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

template <class T>
void register_cuda_shape(std::int64_t rows, std::int64_t cols) {
  const std::string suffix = args({{"rows", rows}, {"cols", cols}});
  const std::string type = dtype_name<T>();
  const ReferencePtr ref = add_d2d_copy_reference("_" + type + suffix, rows * cols * std::int64_t(sizeof(T)));
  const double elem = double(sizeof(T));

  add(
      "BM_rmsnorm_forward_cuda_" + type + suffix,
      [=](benchmark::State& state) {
        DeviceBuffer<T> x(rows * cols), w(cols), y(rows * cols);
        DeviceBuffer<float> rstd(rows);
        fill_uniform(x, 1);
        fill_uniform(w, 2, 0.5f, 1.5f);
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::rmsnorm_forward<T>(x.get(), w.get(), y.get(), rstd.get(), rows, cols, kEps, stream());
        });
        report_kernel(state, *ref, forward_bytes(rows, cols, elem, 4), seconds);
      },
      benchmark::kMicrosecond);

  add(
      "BM_rmsnorm_backward_cuda_" + type + suffix,
      [=](benchmark::State& state) {
        DeviceBuffer<T> x(rows * cols), w(cols), y(rows * cols), dy(rows * cols), dx(rows * cols);
        DeviceBuffer<float> rstd(rows), dw(cols);
        fill_uniform(x, 1);
        fill_uniform(w, 2, 0.5f, 1.5f);
        fill_uniform(dy, 3);
        fill_uniform(dw, 4);  // accumulated into, as in training
        qlora::cuda::rmsnorm_forward<T>(x.get(), w.get(), y.get(), rstd.get(), rows, cols, kEps, stream());
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::rmsnorm_backward<T>(x.get(), w.get(), rstd.get(), dy.get(), dx.get(), dw.get(), rows, cols,
                                           stream());
        });
        report_kernel(state, *ref, backward_bytes(rows, cols, elem, 4, 4), seconds);
      },
      benchmark::kMicrosecond);
}

void register_cuda() {
  // Llama-7B hidden size; 4096 tokens (64 MiB bf16 working set, just above the H100's 50 MiB L2) and 16384
  // tokens (8 sequences of 2048: 128 MiB per bf16 array, never L2-resident).
  for (const std::int64_t rows : {4096, 16384}) {
    register_cuda_shape<qlora::bf16>(rows, 4096);
    register_cuda_shape<float>(rows, 4096);
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
