// Cross-entropy over a vocabulary, forward and backward (qlora/cpu/cross_entropy.hpp,
// qlora/cuda/cross_entropy.hpp), on both backends. Memory-bound (one exp per logit), so each shape is paired
// with a copy of one (rows, vocab) logits array of the same dtype: BM_reference_memcpy (CPU) /
// BM_reference_d2d_copy (CUDA); pct_of_ref compares bytes per second.
//
// Bytes counted (the least each pass must move; s = logit size, f = loss/lse size, f32 on CUDA, T on CPU):
//   forward:  read logits, targets; write losses, lse        = rows vocab s + 4 rows + 2 rows f
//   backward: read logits, targets, lse; write dlogits       = 2 rows vocab s + 4 rows + rows f
// The backward writes a separate dlogits buffer here (the kernels also allow dlogits == logits, in place; the
// bytes are the same, and a separate buffer keeps every timed iteration on identical inputs).
// Every target is a valid class (no ignored rows), so every row does the full work.

#include "qlora/cpu/cross_entropy.hpp"

#include "bench_util.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/cross_entropy.hpp"
#endif

namespace {

using namespace qlora::bench;

double forward_bytes(std::int64_t rows, std::int64_t vocab, double elem, double stat) {
  return double(rows * vocab) * elem + 4.0 * double(rows) + 2.0 * double(rows) * stat;
}
double backward_bytes(std::int64_t rows, std::int64_t vocab, double elem, double stat) {
  return 2.0 * double(rows * vocab) * elem + 4.0 * double(rows) + double(rows) * stat;
}

// ---- CPU (f32) -----------------------------------------------------------------------------------------------

void register_cpu() {
  const std::int64_t rows = 128, vocab = 32000;  // a chunk of 128 tokens over Llama-2's vocabulary, 15.6 MiB
  const std::string suffix = args({{"rows", rows}, {"vocab", vocab}});
  const ReferencePtr ref = add_memcpy_reference("_f32" + suffix, rows * vocab * std::int64_t(sizeof(float)));

  add(
      "BM_cross_entropy_forward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> logits = uniform(rows * vocab, 1, -8.0f, 8.0f);
        const std::vector<std::int32_t> targets = random_targets(rows, vocab, 2);
        std::vector<float> losses = zeros(rows), lse = zeros(rows);
        const double seconds = time_cpu(state, [&] {
          qlora::cpu::cross_entropy_forward(logits.data(), targets.data(), losses.data(), lse.data(), rows, vocab);
        });
        report_kernel(state, *ref, forward_bytes(rows, vocab, 4, 4), seconds);
      },
      benchmark::kMillisecond);

  add(
      "BM_cross_entropy_backward_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        const std::vector<float> logits = uniform(rows * vocab, 1, -8.0f, 8.0f);
        const std::vector<std::int32_t> targets = random_targets(rows, vocab, 2);
        std::vector<float> losses = zeros(rows), lse = zeros(rows), dlogits = zeros(rows * vocab);
        qlora::cpu::cross_entropy_forward(logits.data(), targets.data(), losses.data(), lse.data(), rows, vocab);
        const float grad_scale = 1.0f / float(rows);
        const double seconds = time_cpu(state, [&] {
          qlora::cpu::cross_entropy_backward(logits.data(), targets.data(), lse.data(), grad_scale, dlogits.data(),
                                             rows, vocab);
        });
        report_kernel(state, *ref, backward_bytes(rows, vocab, 4, 4), seconds);
      },
      benchmark::kMillisecond);
}

// ---- CUDA (bf16 and f32 logits; losses and lse f32) -------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

template <class T>
void register_cuda_shape(std::int64_t rows, std::int64_t vocab) {
  const std::string suffix = args({{"rows", rows}, {"vocab", vocab}});
  const std::string type = dtype_name<T>();
  const ReferencePtr ref = add_d2d_copy_reference("_" + type + suffix, rows * vocab * std::int64_t(sizeof(T)));
  const double elem = double(sizeof(T));

  add(
      "BM_cross_entropy_forward_cuda_" + type + suffix,
      [=](benchmark::State& state) {
        DeviceBuffer<T> logits(rows * vocab);
        DeviceBuffer<std::int32_t> targets(rows);
        DeviceBuffer<float> losses(rows), lse(rows);
        fill_uniform(logits, 1, -8.0f, 8.0f);
        upload(targets, random_targets(rows, vocab, 2));
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::cross_entropy_forward<T>(logits.get(), targets.get(), losses.get(), lse.get(), rows, vocab,
                                                stream());
        });
        report_kernel(state, *ref, forward_bytes(rows, vocab, elem, 4), seconds);
      },
      benchmark::kMicrosecond);

  add(
      "BM_cross_entropy_backward_cuda_" + type + suffix,
      [=](benchmark::State& state) {
        DeviceBuffer<T> logits(rows * vocab), dlogits(rows * vocab);
        DeviceBuffer<std::int32_t> targets(rows);
        DeviceBuffer<float> losses(rows), lse(rows);
        fill_uniform(logits, 1, -8.0f, 8.0f);
        upload(targets, random_targets(rows, vocab, 2));
        qlora::cuda::cross_entropy_forward<T>(logits.get(), targets.get(), losses.get(), lse.get(), rows, vocab,
                                              stream());
        const float grad_scale = 1.0f / float(rows);
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::cross_entropy_backward<T>(logits.get(), targets.get(), lse.get(), grad_scale, dlogits.get(),
                                                 rows, vocab, stream());
        });
        report_kernel(state, *ref, backward_bytes(rows, vocab, elem, 4), seconds);
      },
      benchmark::kMicrosecond);
}

void register_cuda() {
  // 4096 tokens (2 sequences of 2048) over Llama-2's 32000 and Llama-3's 128256 words: 250 MiB and 1002 MiB
  // of bf16 logits, far above the 50 MiB L2 (the training loop chunks rows; the kernel sees one chunk).
  for (const std::int64_t vocab : {32000, 128256}) {
    register_cuda_shape<qlora::bf16>(4096, vocab);
    register_cuda_shape<float>(4096, vocab);
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
