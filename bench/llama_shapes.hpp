#pragma once
// Llama shapes shared by the model-level benchmarks (bench/llama.cpp, bench/train_step.cpp): the Llama-2-7B
// configuration and a weight source that draws one random tensor per kind of weight and serves it to every
// layer (drawing all 6.7e9 values would take longer than the benchmark).

#include <map>
#include <memory>
#include <string>

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

}  // namespace qlora::bench
