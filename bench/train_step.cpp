// One QLoRA optimizer step of a Llama model with random weights: forward, backward (activation checkpointing
// per block, chunked LM-head cross-entropy) and AdamW over every adapter, NF4 base, LoRA r = 64 on all seven
// block linears, micro-batch 1..4. Counters:
//   tokens/s     batch * seq per step over the step's time
//   peak_bytes   the allocator's peak during the timed steps (CUDA: the caching allocator's peak allocated
//                bytes, weights included; CPU: the aligned host allocator's), peak_reserved_bytes beside it
//   FLOP/s, pct_of_ref: 4 FLOP per base weight per token (the forward GEMM and the input-gradient GEMM; the
//                checkpointing recompute, the adapters and attention are not credited) against the vendor
//                GEMM at the MLP's up-projection shape for the step's tokens (Eigen f32 / cuBLAS bf16).
// Shapes: Llama-2-7B at seq 2048 on CUDA (the design target: >= 2x PyTorch + PEFT tokens/s, <= 8 GB peak;
// tools/reference/peft_train_step.py and scripts/compare-train-step measure the other side); on the CPU a
// tiny model (hidden 128, 2 layers, MLP 384, 4 heads of 32, vocabulary 512) at seq 256, named in the
// benchmark, so the program runs in seconds.

#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "llama_shapes.hpp"
#include "qlora/core/cpu_allocator.hpp"
#include "qlora/train/adamw.hpp"

using namespace qlora;
using namespace qlora::bench;
namespace ml = qlora::models::llama;

namespace {

constexpr int kLoraRank = 64;
constexpr int kMaxBatch = 4;

// A model with its optimizer and training context, built once per program and shared by the batch sizes.
struct Trainee {
  std::unique_ptr<ml::Model> model;
  std::unique_ptr<train::AdamW> optimizer;
  nn::Context ctx;
};

// The NF4 base with LoRA r = 64 on all seven block linears.
ml::LoadOptions qlora_options(Device device) {
  ml::LoadOptions o = nf4_options(device);
  o.adapter = nn::AdapterConfig{nn::AdapterKind::lora, kLoraRank, 16.f};
  o.adapter.init = nn::AdapterInit::kaiming;
  o.targets = ml::all_block_linears();
  return o;
}

std::unique_ptr<Trainee> make_trainee(ml::Model model) {
  auto t = std::make_unique<Trainee>();
  t->model = std::make_unique<ml::Model>(std::move(model));
  t->model->checkpointing = true;
  // LoRA's B starts at zero; a step of AdamW moves it, so the later steps run on non-trivial adapters.
  t->optimizer = std::make_unique<train::AdamW>(t->model->params(), train::AdamWOptions{1e-4, 0.9, 0.999, 1e-8, 0.0});
  t->ctx.training = true;
  return t;
}

// Next-token ids and targets (batch, seq) on `device`, spread over the vocabulary (never all one token).
std::pair<Tensor, Tensor> batch_of(std::int64_t batch, std::int64_t seq, std::int64_t vocab, Device device) {
  const std::vector<std::int32_t> ids = spread_token_ids(batch * (seq + 1), vocab, 17);
  std::vector<std::int32_t> in, out;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t t = 0; t < seq; ++t) {
      in.push_back(ids[std::size_t(b * (seq + 1) + t)]);
      out.push_back(ids[std::size_t(b * (seq + 1) + t + 1)]);
    }
  return {Tensor::from(in, {batch, seq}).to(device), Tensor::from(out, {batch, seq}).to(device)};
}

void train_step(Trainee& t, const Tensor& ids, const Tensor& targets) {
  t.optimizer->zero_grad();
  (void)t.model->forward_backward(t.ctx, ids, targets);
  t.optimizer->step();
  ++t.ctx.step;
}

// 4 FLOP per base weight per token: forward GEMM + input-gradient GEMM (the base gets no weight gradient).
double credited_flops_per_token(const ml::Config& c) { return 4.0 * base_weights_per_token(c); }

void report_step(benchmark::State& state, std::int64_t tokens, std::size_t peak, std::size_t peak_reserved) {
  state.counters["tokens/s"] = benchmark::Counter(double(tokens), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_bytes"] = double(peak);
  state.counters["peak_reserved_bytes"] = double(peak_reserved);
  state.counters["lora_rank"] = kLoraRank;
}

// ---- CPU ------------------------------------------------------------------------------------------------------

ml::Config tiny_config() {
  ml::Config c;
  c.hidden_size = 128, c.intermediate_size = 384, c.num_hidden_layers = 2, c.num_attention_heads = 4;
  c.num_key_value_heads = 4, c.head_dim = 32, c.vocab_size = 512, c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  return c;
}

Trainee& cpu_trainee() {
  static std::unique_ptr<Trainee> t = make_trainee(ml::random_model(tiny_config(), qlora_options(Device::cpu())));
  return *t;
}

void register_cpu() {
  const ml::Config c = tiny_config();
  const std::int64_t seq = 256;
  for (std::int64_t batch = 1; batch <= kMaxBatch; ++batch) {
    const std::int64_t tokens = batch * seq;
    const std::string suffix = "/tiny_h128_l2_nf4_r64" + args({{"batch", batch}, {"seq", seq}});
    const ReferencePtr gemm = add_mlp_gemm_reference_cpu(suffix, c, tokens, true);
    add(
        "BM_train_step_cpu_f32" + suffix,
        [=](benchmark::State& state) {
          Trainee& t = cpu_trainee();
          const auto [ids, targets] = batch_of(batch, seq, c.vocab_size, Device::cpu());
          train_step(t, ids, targets);  // untimed: first touch, gradients and optimizer state exist after it
          CpuAllocator::instance().reset_peak();
          const double seconds = time_cpu(state, [&] { train_step(t, ids, targets); });
          const MemoryStats m = CpuAllocator::instance().stats();
          report_kernel(state, *gemm, credited_flops_per_token(c) * double(tokens), seconds);
          report_step(state, tokens, m.peak_allocated_bytes, m.peak_reserved_bytes);
        },
        benchmark::kMillisecond);
  }
}

// ---- CUDA -----------------------------------------------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

Trainee& cuda_trainee() {
  static std::unique_ptr<Trainee> t = make_trainee(random_llama2_7b(qlora_options(Device::cuda(0))));
  return *t;
}

void register_cuda() {
  cuda::set_current_stream(stream());  // the model's work is what the events time
  const ml::Config c = llama2_7b_config();
  const std::int64_t seq = 2048;
  for (std::int64_t batch = 1; batch <= kMaxBatch; ++batch) {
    const std::int64_t tokens = batch * seq;
    const std::string suffix = "/llama2_7b_shape_nf4_r64" + args({{"batch", batch}, {"seq", seq}});
    const ReferencePtr gemm = add_mlp_gemm_reference_cuda(suffix, c, tokens);
    add(
        "BM_train_step_cuda_bf16" + suffix,
        [=](benchmark::State& state) {
          Trainee& t = cuda_trainee();
          const auto [ids, targets] = batch_of(batch, seq, c.vocab_size, Device::cuda(0));
          cuda::synchronize_device();
          cuda::reset_peak_memory(0);  // the warm-up step below counts: its allocations are the steady state's
          const double seconds = time_cuda(state, [&] { train_step(t, ids, targets); }, 1);
          const MemoryStats m = cuda::memory_stats(0);
          report_kernel(state, *gemm, credited_flops_per_token(c) * double(tokens), seconds);
          report_step(state, tokens, m.peak_allocated_bytes, m.peak_reserved_bytes);
        },
        benchmark::kMillisecond)
        ->Iterations(3);
  }
}

#else
void register_cuda() {}
#endif

}  // namespace

int main(int argc, char** argv) { return bench_main(argc, argv, register_cpu, register_cuda); }
