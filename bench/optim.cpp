// The optimizer step over LoRA adapters: the multi-tensor AdamW (qlora/cpu/multi_tensor_adamw.hpp,
// qlora/cuda/multi_tensor_adamw.hpp) over the adapter tensors of Llama-7B with LoRA on every linear layer
// (q, k, v, o: 4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 -> 4096; 32 layers; A is r x in, B is
// out x r; 448 tensors). Rank 16 gives 40.0M parameters, rank 64 (the QLoRA paper's) 159.9M.
//
// Memory-bound: bytes counted per parameter = read p, g, m, v + write p, m, v = 7 x 4 = 28 B (f32 everywhere).
// The reference is a copy of 14 B per parameter (traffic 28 B per parameter, the same bytes):
// BM_reference_d2d_copy (CUDA) / BM_reference_memcpy (CPU); pct_of_ref is the step's bandwidth as a
// percentage of the copy's. BM_adamw_per_tensor_cuda_f32 is the unfused alternative, one launch of
// cuda::adamw_step per tensor, on the same tensors.

#include <cstdint>
#include <vector>

#include "bench_util.hpp"
#include "qlora/cpu/multi_tensor_adamw.hpp"

#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/adamw.hpp"
#include "qlora/cuda/multi_tensor_adamw.hpp"
#endif

namespace {

using namespace qlora::bench;

constexpr double kBytesPerParameter = 28.0;

// Element counts of the LoRA A and B matrices of the first `layers` decoder layers of Llama-7B at rank r.
std::vector<std::int64_t> llama7b_lora_sizes(std::int64_t rank, int layers) {
  constexpr std::int64_t hidden = 4096, mlp = 11008;
  const std::int64_t linears[7][2] = {{hidden, hidden}, {hidden, hidden}, {hidden, hidden}, {hidden, hidden},
                                      {hidden, mlp},    {hidden, mlp},    {mlp, hidden}};  // (in, out)
  std::vector<std::int64_t> sizes;
  for (int l = 0; l < layers; ++l)
    for (const auto& [in, out] : linears) {
      sizes.push_back(rank * in);   // A
      sizes.push_back(out * rank);  // B
    }
  return sizes;
}

std::int64_t total(const std::vector<std::int64_t>& sizes) {
  std::int64_t n = 0;
  for (const std::int64_t s : sizes) n += s;
  return n;
}

const auto factors_at = [](std::int64_t step) {
  return qlora::cpu::adamw_factors<float>(2e-4, 0.9, 0.999, 1e-8, 0.0, step, 1.0);
};

// ---- CPU (f32): 4 layers at rank 16 (5.0M parameters, 140 MB moved per step) --------------------------------

void register_cpu() {
  const std::int64_t rank = 16;
  const int layers = 4;
  const auto sizes = llama7b_lora_sizes(rank, layers);
  const std::int64_t n = total(sizes);
  const std::string suffix = args({{"layers", layers}, {"rank", rank}, {"params", n}});
  const ReferencePtr ref = add_memcpy_reference("_f32" + suffix, 14 * n);

  add(
      "BM_adamw_multi_tensor_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        std::vector<float> p = uniform(n, 1), g = uniform(n, 2), m = uniform(n, 3, -1e-3f, 1e-3f),
                           v = uniform(n, 4, 0.0f, 1e-6f);
        std::vector<qlora::cpu::AdamWTensor<float>> tensors;
        std::int64_t at = 0;
        for (const std::int64_t s : sizes) {
          tensors.push_back({p.data() + at, g.data() + at, m.data() + at, v.data() + at, s});
          at += s;
        }
        const auto chunks = qlora::cpu::make_tensor_chunks(sizes);
        std::int64_t step = 1;
        const double seconds = time_cpu(state, [&] {
          qlora::cpu::multi_tensor_adamw(tensors.data(), chunks.data(), std::int64_t(chunks.size()), factors_at(step++));
        });
        report_kernel(state, *ref, kBytesPerParameter * double(n), seconds);
      },
      benchmark::kMillisecond);
}

// ---- CUDA (f32 master weights, gradients and state): all 32 layers -------------------------------------------

#if defined(QLORA_WITH_CUDA)

// The four arrays of every tensor packed back to back (all sizes are multiples of 64: every tensor aligned).
struct DeviceAdapters {
  std::vector<std::int64_t> sizes;
  std::int64_t n;
  DeviceBuffer<float> p, g, m, v;
  std::vector<qlora::cpu::AdamWTensor<float>> tensors;  // device pointers

  explicit DeviceAdapters(const std::vector<std::int64_t>& s) : sizes(s), n(total(s)), p(n), g(n), m(n), v(n) {
    fill_uniform(p, 1);
    fill_uniform(g, 2);
    fill_uniform(m, 3, -1e-3f, 1e-3f);
    fill_uniform(v, 4, 0.0f, 1e-6f);
    std::int64_t at = 0;
    for (const std::int64_t size : sizes) {
      tensors.push_back({p.get() + at, g.get() + at, m.get() + at, v.get() + at, size});
      at += size;
    }
  }
};

void register_cuda_rank(std::int64_t rank) {
  const auto sizes = llama7b_lora_sizes(rank, 32);
  const std::int64_t n = total(sizes);
  const std::string suffix = args({{"layers", 32}, {"rank", rank}, {"params", n}});
  const ReferencePtr ref = add_d2d_copy_reference("_f32" + suffix, 14 * n);

  add(
      "BM_adamw_multi_tensor_cuda_f32" + suffix,
      [=](benchmark::State& state) {
        DeviceAdapters a(sizes);
        const auto chunks = qlora::cpu::make_tensor_chunks(sizes);
        DeviceBuffer<qlora::cpu::AdamWTensor<float>> table(std::int64_t(a.tensors.size()));
        DeviceBuffer<qlora::cpu::TensorChunk> chunk_table(std::int64_t(chunks.size()));
        upload(table, a.tensors);
        upload(chunk_table, chunks);
        std::int64_t step = 1;
        const double seconds = time_cuda(state, [&] {
          qlora::cuda::multi_tensor_adamw(table.get(), chunk_table.get(), std::int64_t(chunks.size()),
                                          factors_at(step++), stream());
        });
        state.counters["launches"] = 1;
        state.counters["tensors"] = double(sizes.size());
        report_kernel(state, *ref, kBytesPerParameter * double(n), seconds);
      },
      benchmark::kMicrosecond);

  add(
      "BM_adamw_per_tensor_cuda_f32" + suffix,
      [=](benchmark::State& state) {
        DeviceAdapters a(sizes);
        std::int64_t step = 1;
        const double seconds = time_cuda(state, [&] {
          for (const auto& t : a.tensors)
            qlora::cuda::adamw_step(t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.numel, 2e-4f, 0.9f, 0.999f, 1e-8f,
                                    0.0f, step, 1.0f, stream());
          ++step;
        });
        state.counters["launches"] = double(sizes.size());
        state.counters["tensors"] = double(sizes.size());
        report_kernel(state, *ref, kBytesPerParameter * double(n), seconds);
      },
      benchmark::kMicrosecond);
}

void register_cuda() {
  register_cuda_rank(16);  // 40.0M parameters, 1.1 GB moved per step
  register_cuda_rank(64);  // 159.9M parameters, 4.5 GB moved per step
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
