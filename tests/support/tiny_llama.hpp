#pragma once
// The tiny Llama the model tests use on both backends: 2 blocks of width 16, grouped-query attention
// (4 query heads over 2 KV heads of width 4), a vocabulary of 37: small enough for float64 finite
// differences over every adapter parameter.

#include "models/llama/config.hpp"

namespace qlora::test {

inline models::llama::Config tiny_llama_config() {
  models::llama::Config c;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 37;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

}  // namespace qlora::test
