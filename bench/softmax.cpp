// Softmax over the last axis, forward and backward (qlora/cpu/softmax.hpp, qlora/cuda/softmax.hpp), on both
// backends. Memory-bound, so each shape is paired with a copy of one (rows, cols) array of the same dtype:
// BM_reference_memcpy (CPU) / BM_reference_d2d_copy (CUDA); pct_of_ref compares bytes per second.
//
// Bytes counted (the least each pass must move): forward reads x and writes y = 2 rows cols s; backward
// reads y, dy and writes dx = 3 rows cols s (s = element size).

#include "qlora/cpu/softmax.hpp"

#include "bench_util.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/softmax.hpp"
#endif

namespace {

using namespace qlora::bench;

double forward_bytes(std::int64_t rows, std::int64_t cols, double elem) { return 2.0 * double(rows * cols) * elem; }
double backward_bytes(std::int64_t rows, std::int64_t cols, double elem) { return 3.0 * double(rows * cols) * elem; }

// ---- CPU (f32) -----------------------------------------------------------------------------------------------

void register_cpu() {
  const std::int64_t rows = 512, cols = 2048;  // attention-score rows of a 2048-token sequence, 4 MiB
  const std::string suffix = args({{"rows", rows}, {"cols", cols}});
  const ReferencePtr ref = add_memcpy_reference("_f32" + suffix, rows * cols * std::int64_t(sizeof(float)));

  add(
      "BM_softmax_forward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> x = uniform(rows * cols, 1, -8.0f, 8.0f);
        std::vector<float> y = zeros(rows * cols);
        const double seconds = time_cpu(state, [&] { qlora::cpu::softmax_forward(x.data(), y.data(), rows, cols); });
        report_kernel(state, *ref, forward_bytes(rows, cols, 4), seconds);
      },
      benchmark::kMillisecond);

  add(
      "BM_softmax_backward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> x = uniform(rows * cols, 1, -8.0f, 8.0f), dy = uniform(rows * cols, 2);
        std::vector<float> y = zeros(rows * cols), dx = zeros(rows * cols);
        qlora::cpu::softmax_forward(x.data(), y.data(), rows, cols);
        const double seconds =
            time_cpu(state, [&] { qlora::cpu::softmax_backward(y.data(), dy.data(), dx.data(), rows, cols); });
        report_kernel(state, *ref, backward_bytes(rows, cols, 4), seconds);
      },
      benchmark::kMillisecond);
}

// ---- CUDA (bf16 and f32) ---------------------------------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

template <class T>
void register_cuda_shape(std::int64_t rows, std::int64_t cols) {
  const std::string suffix = args({{"rows", rows}, {"cols", cols}});
  const std::string type = dtype_name<T>();
  const ReferencePtr ref = add_d2d_copy_reference("_" + type + suffix, rows * cols * std::int64_t(sizeof(T)));
  const double elem = double(sizeof(T));

  add(
      "BM_softmax_forward_cuda_" + type + suffix,
      [=](benchmark::State& state) {
        DeviceBuffer<T> x(rows * cols), y(rows * cols);
        fill_uniform(x, 1, -8.0f, 8.0f);
        const double seconds =
            time_cuda(state, [&] { qlora::cuda::softmax_forward<T>(x.get(), y.get(), rows, cols, stream()); });
        report_kernel(state, *ref, forward_bytes(rows, cols, elem), seconds);
      },
      benchmark::kMicrosecond);

  add(
      "BM_softmax_backward_cuda_" + type + suffix,
      [=](benchmark::State& state) {
        DeviceBuffer<T> x(rows * cols), y(rows * cols), dy(rows * cols), dx(rows * cols);
        fill_uniform(x, 1, -8.0f, 8.0f);
        fill_uniform(dy, 2);
        qlora::cuda::softmax_forward<T>(x.get(), y.get(), rows, cols, stream());
        const double seconds = time_cuda(
            state, [&] { qlora::cuda::softmax_backward<T>(y.get(), dy.get(), dx.get(), rows, cols, stream()); });
        report_kernel(state, *ref, backward_bytes(rows, cols, elem), seconds);
      },
      benchmark::kMicrosecond);
}

void register_cuda() {
  // Attention-score rows (32 heads x 2048 queries, 2048 keys) and vocabulary rows (4096 tokens, Llama-2's
  // 32000-word vocabulary): 256 and 250 MiB per bf16 array, far above the 50 MiB L2.
  for (const auto& [rows, cols] : {std::pair<std::int64_t, std::int64_t>{65536, 2048}, {4096, 32000}}) {
    register_cuda_shape<qlora::bf16>(rows, cols);
    register_cuda_shape<float>(rows, cols);
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
