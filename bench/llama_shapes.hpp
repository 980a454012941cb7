#pragma once
// What the model-level benchmarks (bench/llama.cpp, bench/train_step.cpp) share: the Llama-2-7B configuration
// and a random-weight model of it (a weight source that draws one random tensor per kind of weight and serves
// it to every layer: drawing all 6.7e9 values would take longer than the benchmark), the NF4 load options,
// token ids spread over the vocabulary, the FLOP count per token through the base weights, and the vendor
// GEMM reference at the MLP's up-projection shape.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "models/llama/load.hpp"

namespace qlora::bench {

inline models::llama::Config llama2_7b_config() {
  models::llama::Config c;  // meta-llama/Llama-2-7b-hf config.json
  c.hidden_size = 4096, c.intermediate_size = 11008, c.num_hidden_layers = 32, c.num_attention_heads = 32;
  c.num_key_value_heads = 32, c.head_dim = 128, c.vocab_size = 32000, c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  return c;
}

// Norm weights uniform in [0.8, 1.2), matrices N(0, 0.02^2); layer i's q_proj is layer 0's q_proj.
inline models::llama::TensorSource shared_random_weights(const models::llama::Config& c) {
  auto drawn = std::make_shared<std::map<std::string, Tensor>>();
  return [c, drawn](const std::string& name) {
    const std::string kind = name.rfind("model.layers.", 0) == 0 ? name.substr(name.find('.', 13) + 1) : name;
    auto it = drawn->find(kind);
    if (it != drawn->end()) return it->second;
    Shape shape;
    for (const auto& s : io::llama_tensor_specs(c))
      if (s.name == name) shape = s.shape;
    const Tensor t = shape.rank() == 1 ? ops::rand(shape, drawn->size() + 1, Device::cpu(), 0.8f, 1.2f)
                                       : ops::randn(shape, drawn->size() + 1, Device::cpu(), 0.f, 0.02f);
    (*drawn)[kind] = t;
    return t;
  };
}

// Llama-2-7B shapes with shared_random_weights, loaded as `options` say.
inline models::llama::Model random_llama2_7b(const models::llama::LoadOptions& options) {
  const models::llama::Config c = llama2_7b_config();
  return models::llama::build_model(c, shared_random_weights(c), options);
}

// The QLoRA paper's frozen base: NF4 (double-quantized scales, group 64) on `device`, no adapter.
inline models::llama::LoadOptions nf4_options(Device device) {
  models::llama::LoadOptions o;
  o.device = device;
  o.quant = quant::QuantConfig::parse("nf4");
  return o;
}

// n token ids 3 + (i * 7919 + offset) mod (vocab - 3): past the special ids 0..2 and spread over the
// vocabulary (never all one token, so no embedding row or softmax column is special).
inline std::vector<std::int32_t> spread_token_ids(std::int64_t n, std::int64_t vocab, std::int64_t offset) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) ids[std::size_t(i)] = std::int32_t(3 + (i * 7919 + offset) % (vocab - 3));
  return ids;
}

// Base weights one token multiplies through: the block linears and the LM head (attention scores excluded).
// A forward is 2 FLOP per such weight; a training step with a frozen base 4 (forward and input gradient).
inline double base_weights_per_token(const models::llama::Config& c) {
  const double h = double(c.hidden_size);
  const double block = h * double(c.q_dim()) * 2 + h * double(c.kv_dim()) * 2 + 3 * h * double(c.intermediate_size);
  return double(c.num_hidden_layers) * block + double(c.vocab_size) * h;
}

// BM_reference_eigen_gemm_f32<suffix>: the MLP's up-projection GEMM for `tokens` rows, (tokens, hidden) times
// (hidden, intermediate), the CPU FLOP/s reference. `weight_transposed`: the weight stored (intermediate,
// hidden) as the model stores it, else (hidden, intermediate). Registered now; returns the reference.
inline ReferencePtr add_mlp_gemm_reference_cpu(const std::string& suffix, const models::llama::Config& c,
                                               std::int64_t tokens, bool weight_transposed) {
  const ReferencePtr gemm = make_reference("BM_reference_eigen_gemm_f32" + suffix, Work::flops);
  add(
      gemm->name,
      [=](benchmark::State& state) {
        const std::int64_t M = tokens, N = c.intermediate_size, K = c.hidden_size;
        const std::vector<float> a = uniform(M * K, 1), b = uniform(K * N, 2);
        std::vector<float> out = zeros(M * N);
        const double seconds = time_cpu(
            state, [&] { eigen_gemm(a.data(), b.data(), out.data(), M, N, K, false, weight_transposed, 1, 0, 0, 0); });
        report_reference(state, *gemm, 2.0 * double(M * N * K), seconds);
      },
      benchmark::kMicrosecond);
  return gemm;
}

#if defined(QLORA_WITH_CUDA)

// BM_reference_cublas_gemm_bf16<suffix>: the same GEMM in bf16 through cuBLAS, the weight stored
// (intermediate, hidden). Registered now; returns the reference.
inline ReferencePtr add_mlp_gemm_reference_cuda(const std::string& suffix, const models::llama::Config& c,
                                                std::int64_t tokens) {
  const ReferencePtr gemm = make_reference("BM_reference_cublas_gemm_bf16" + suffix, Work::flops);
  add(
      gemm->name,
      [=](benchmark::State& state) {
        const std::int64_t M = tokens, N = c.intermediate_size, K = c.hidden_size;
        DeviceBuffer<bf16> a(M * K), b(N * K), out(M * N);
        fill_uniform(a, 1);
        fill_uniform(b, 2);
        const double seconds =
            time_cuda(state, [&] { cublas_gemm(a.get(), b.get(), out.get(), M, N, K, false, true, 1, 0, 0, 0); });
        report_reference(state, *gemm, 2.0 * double(M * N * K), seconds);
      },
      benchmark::kMicrosecond);
  return gemm;
}

#endif

}  // namespace qlora::bench
