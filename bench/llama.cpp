// Llama inference throughput: prefill tokens/s (one forward over the prompt through the KV cache) and
// decode tokens/s (one token per step), each against a reference measured in the same process:
//   prefill: GEMM FLOP/s (Eigen on the CPU, cuBLAS bf16 on CUDA) at the MLP's up-projection shape; the
//            model's rate counts 2 FLOP per base weight per token (attention scores excluded).
//   decode:  the bandwidth-bound ideal: bytes of weights read per token (the frozen bases, norms, LM head)
//            over the measured copy bandwidth (parallel memcpy on the CPU, device-to-device on CUDA).
// CPU: stories260K from ../shared/data when present, else a random model of its shape. CUDA: Llama-2-7B
// shapes with random weights, NF4 base, bf16 activations, batch 1, prompt 512, decode 128.

#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "llama_shapes.hpp"
#include "models/llama/generate.hpp"
#include "models/llama/load.hpp"

using namespace qlora;
using namespace qlora::bench;
namespace ml = qlora::models::llama;

namespace {

// 2 FLOP per base weight per token (block linears + LM head).
double forward_flops_per_token(const ml::Config& c) { return 2.0 * base_weights_per_token(c); }

// Bytes of weights one decode step reads: everything stored except the embedding table (one row per token),
// plus the head when it is tied to the embedding.
double weight_bytes_per_token(const ml::Model& m) {
  double bytes = double(m.base_bytes()) - double(m.embedding().nbytes());
  if (m.tied_head()) bytes += double(m.embedding().nbytes());
  return bytes;
}

// BOS, then ids spread over the vocabulary.
std::vector<std::int32_t> prompt_ids(std::int64_t n, std::int64_t vocab) {
  std::vector<std::int32_t> ids = spread_token_ids(n, vocab, 0);
  if (n > 0) ids[0] = 1;
  return ids;
}

// Prefill `prompt` tokens into a fresh cache per iteration; returns seconds.
template <class Timer>
double time_prefill(benchmark::State& state, ml::Model& m, std::int64_t prompt, Timer timer) {
  ml::KvCache cache(m.config(), 1, prompt, m.dtype(), m.device());
  const Tensor ids = Tensor::from(prompt_ids(prompt, m.config().vocab_size), {1, prompt});
  return timer(state, [&] {
    cache.reset();
    (void)m.logits(ids, &cache, true);
  });
}

// Per iteration: prefill untimed, then `steps` single-token steps timed. Returns seconds.
template <class Clock>
double time_decode(benchmark::State& state, ml::Model& m, std::int64_t prompt, std::int64_t steps, Clock now) {
  ml::KvCache cache(m.config(), 1, prompt + steps, m.dtype(), m.device());
  const Tensor ids = Tensor::from(prompt_ids(prompt, m.config().vocab_size), {1, prompt});
  const Tensor one = Tensor::from(std::vector<std::int32_t>{5}, {1, 1});
  double total = 0;
  for (auto _ : state) {
    cache.reset();
    (void)m.logits(ids, &cache, true);
    const double start = now();
    for (std::int64_t s = 0; s < steps; ++s) {
      const Tensor logits = m.logits(one, &cache, true).to(Device::cpu());  // the sampler reads them on the host
      benchmark::DoNotOptimize(logits.data());
    }
    const double seconds = now() - start;
    state.SetIterationTime(seconds);
    total += seconds;
  }
  return total;
}

double wall_now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// ---- CPU ------------------------------------------------------------------------------------------------------

ml::Model& cpu_model(std::string* label) {
  static std::string name;
  static std::unique_ptr<ml::Model> model = [] {
    const std::filesystem::path bin =
        std::filesystem::path(__FILE__).parent_path() / "../../shared/data/models/stories260K/stories260K.bin";
    if (std::filesystem::exists(bin)) {
      name = "stories260K";
      return std::make_unique<ml::Model>(ml::load_model(bin));
    }
    name = "random_stories260K_shape";
    ml::Config c;
    c.hidden_size = 64, c.intermediate_size = 172, c.num_hidden_layers = 5, c.num_attention_heads = 8;
    c.num_key_value_heads = 4, c.head_dim = 8, c.vocab_size = 512, c.max_position_embeddings = 512;
    c.tie_word_embeddings = true;
    return std::make_unique<ml::Model>(ml::random_model(c, ml::LoadOptions{}));
  }();
  *label = name;
  return *model;
}

void register_cpu() {
  std::string name;
  ml::Model& m = cpu_model(&name);
  const ml::Config& c = m.config();
  const std::int64_t prompt = 256, steps = 128;
  const std::string suffix = "/" + name + args({{"prompt", prompt}, {"decode", steps}});

  const ReferencePtr gemm = add_mlp_gemm_reference_cpu(suffix, c, prompt, false);
  add(
      "BM_llama_prefill_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        std::string unused;
        ml::Model& model = cpu_model(&unused);
        const double seconds = time_prefill(state, model, prompt, [](benchmark::State& s, auto op) { return time_cpu(s, op); });
        report_kernel(state, *gemm, forward_flops_per_token(c) * double(prompt), seconds);
        state.counters["tokens/s"] = benchmark::Counter(double(prompt), benchmark::Counter::kIsIterationInvariantRate);
      },
      benchmark::kMillisecond);

  const std::int64_t weight_bytes = std::int64_t(weight_bytes_per_token(m));
  const ReferencePtr copy = add_memcpy_reference(suffix, std::max<std::int64_t>(weight_bytes, 64 << 20));
  add(
      "BM_llama_decode_cpu_f32" + suffix,
      [=](benchmark::State& state) {
        std::string unused;
        ml::Model& model = cpu_model(&unused);
        const double seconds = time_decode(state, model, prompt, steps, wall_now);
        // Work: the weight bytes each token reads; pct_of_ref = this rate / copy bandwidth (the ideal).
        report_kernel(state, *copy, double(weight_bytes) * double(steps), seconds);
        state.counters["tokens/s"] = benchmark::Counter(double(steps), benchmark::Counter::kIsIterationInvariantRate);
      },
      benchmark::kMillisecond);
}

// ---- CUDA -----------------------------------------------------------------------------------------------------

#if defined(QLORA_WITH_CUDA)

// Random weights, one draw per tensor kind reused by every layer (drawing 6.7e9 values would dominate).
ml::Model& cuda_model() {
  static std::unique_ptr<ml::Model> model = std::make_unique<ml::Model>(random_llama2_7b(nf4_options(Device::cuda(0))));
  return *model;
}

double cuda_now() {
  check(cudaStreamSynchronize(stream()), "cudaStreamSynchronize");
  return wall_now();
}

void register_cuda() {
  cuda::set_current_stream(stream());  // the model's work is what the events time
  const ml::Config c = llama2_7b_config();
  const std::int64_t prompt = 512, steps = 128;
  const std::string suffix = "/llama2_7b_shape_nf4" + args({{"batch", 1}, {"prompt", prompt}, {"decode", steps}});

  const ReferencePtr gemm = add_mlp_gemm_reference_cuda(suffix, c, prompt);
  add(
      "BM_llama_prefill_cuda_bf16" + suffix,
      [=](benchmark::State& state) {
        ml::Model& m = cuda_model();
        const double seconds =
            time_prefill(state, m, prompt, [](benchmark::State& s, auto op) { return time_cuda(s, op, 1); });
        report_kernel(state, *gemm, forward_flops_per_token(c) * double(prompt), seconds);
        state.counters["tokens/s"] = benchmark::Counter(double(prompt), benchmark::Counter::kIsIterationInvariantRate);
      },
      benchmark::kMillisecond)
      ->Iterations(3);

  const ReferencePtr copy = add_d2d_copy_reference(suffix, std::int64_t(1) << 30);
  add(
      "BM_llama_decode_cuda_bf16" + suffix,
      [=](benchmark::State& state) {
        ml::Model& m = cuda_model();
        const double bytes = weight_bytes_per_token(m);
        const double seconds = time_decode(state, m, prompt, steps, cuda_now);
        report_kernel(state, *copy, bytes * double(steps), seconds);
        state.counters["tokens/s"] = benchmark::Counter(double(steps), benchmark::Counter::kIsIterationInvariantRate);
        state.counters["ideal_tokens/s"] = copy->rate > 0 ? copy->rate / bytes : 0.0;
      },
      benchmark::kMillisecond)
      ->Iterations(2);
}

#else
void register_cuda() {}
#endif

}  // namespace

int main(int argc, char** argv) { return bench_main(argc, argv, register_cpu, register_cuda); }
