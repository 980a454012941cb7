#include <doctest/doctest.h>

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/io_test_util.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/model_files.hpp"
#include "qlora/io/safetensors.hpp"
#include "support/random.hpp"

using qlora::Shape;
using qlora::Tensor;
using qlora::io::LlamaConfig;
using qlora::test::TempDir;
using qlora::test::check_names;
using qlora::test::error_of;

TEST_CASE("hf_config: a Llama 3.2 style config.json (GQA, llama3 rope scaling, tied, eos list)") {
  // Values of meta-llama/Llama-3.2-1B's config.json (as published on the Hugging Face hub).
  const auto j = nlohmann::json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "attention_bias": false, "mlp_bias": false,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": true, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "torch_dtype": "bfloat16"})");
  const LlamaConfig c = LlamaConfig::from_json(j);
  CHECK(c.hidden_size == 2048);
  CHECK(c.intermediate_size == 8192);
  CHECK(c.num_hidden_layers == 16);
  CHECK(c.num_attention_heads == 32);
  CHECK(c.num_key_value_heads == 8);
  CHECK(c.head_dim == 64);
  CHECK(c.vocab_size == 128256);
  CHECK(c.max_position_embeddings == 131072);
  CHECK(c.rms_norm_eps == 1e-5);
  CHECK(c.rope_theta == 500000.0);
  REQUIRE(c.rope_scaling.has_value());
  CHECK(c.rope_scaling->type == "llama3");
  CHECK(c.rope_scaling->factor == 32.0);
  CHECK(c.rope_scaling->low_freq_factor == 1.0);
  CHECK(c.rope_scaling->high_freq_factor == 4.0);
  CHECK(c.rope_scaling->original_max_position_embeddings == 8192);
  CHECK(c.tie_word_embeddings);
  CHECK(c.bos_token_id == 128000);
  CHECK(c.eos_token_ids == std::vector<std::int64_t>{128001, 128008, 128009});
  CHECK(c.torch_dtype == "bfloat16");
  CHECK(c.q_dim() == 2048);
  CHECK(c.kv_dim() == 512);

  // to_json() reads back to the same config.
  CHECK(LlamaConfig::from_json(nlohmann::json::parse(c.to_json().dump())) == c);
}

TEST_CASE("hf_config: absent keys take transformers' LlamaConfig defaults") {
  const LlamaConfig c = LlamaConfig::from_json(nlohmann::json::parse(
      R"({"hidden_size": 64, "num_attention_heads": 8, "intermediate_size": 172, "num_hidden_layers": 2,
          "vocab_size": 512, "rope_scaling": {"type": "linear", "factor": 2.0}, "eos_token_id": 2})"));
  CHECK(c.num_key_value_heads == 8);  // = num_attention_heads
  CHECK(c.head_dim == 8);             // = hidden_size / num_attention_heads
  CHECK(c.max_position_embeddings == 2048);
  CHECK(c.rms_norm_eps == 1e-6);
  CHECK(c.rope_theta == 10000.0);
  CHECK_FALSE(c.tie_word_embeddings);
  CHECK(c.bos_token_id == 1);
  CHECK(c.eos_token_ids == std::vector<std::int64_t>{2});
  REQUIRE(c.rope_scaling.has_value());
  CHECK(c.rope_scaling->type == "linear");  // the old "type" key
  CHECK(c.rope_scaling->factor == 2.0);
  const LlamaConfig d = LlamaConfig::from_json(nlohmann::json::parse("{}"));
  CHECK(d.hidden_size == 4096);
  CHECK(d.intermediate_size == 11008);
  CHECK(d.num_hidden_layers == 32);
  CHECK(d.vocab_size == 32000);
}

TEST_CASE("hf_config: invalid or unsupported configs are refused naming the key") {
  const auto refuse = [](const std::string& text, std::initializer_list<std::string> parts) {
    check_names(error_of([&] { (void)LlamaConfig::from_json(nlohmann::json::parse(text), "cfg/config.json"); }), parts);
  };
  refuse(R"({"hidden_size": 100, "num_attention_heads": 8})", {"cfg/config.json", "does not divide hidden_size"});
  refuse(R"({"num_attention_heads": 32, "num_key_value_heads": 5})", {"num_key_value_heads 5", "does not divide"});
  refuse(R"({"model_type": "gpt2"})", {"model_type 'gpt2'"});
  refuse(R"({"attention_bias": true})", {"attention_bias"});
  refuse(R"({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})", {"rope_scaling type 'yarn'"});
  refuse(R"({"hidden_size": "big"})", {"hidden_size must be an integer"});
  refuse(R"({"vocab_size": 100, "eos_token_id": [2, 100]})", {"eos_token_id 100", "outside the vocabulary"});
  refuse(R"({"torch_dtype": "float8"})", {"torch_dtype 'float8'"});
  refuse(R"({"hidden_act": "gelu"})", {"hidden_act"});
  refuse(R"({"num_hidden_layers": 0})", {"num_hidden_layers must be positive"});
  // A corrupt count is refused before anything is sized by it (the expected-tensor walk, the model's blocks).
  refuse(R"({"num_hidden_layers": 100000000})", {"num_hidden_layers 100000000", "beyond any Llama"});
}

TEST_CASE("hf_config: config.json files are read, written atomically and read back") {
  TempDir dir;
  LlamaConfig c;
  c.hidden_size = 96;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.intermediate_size = 200;
  c.num_hidden_layers = 3;
  c.vocab_size = 300;
  c.tie_word_embeddings = true;
  c.bos_token_id = std::nullopt;
  c.eos_token_ids = {5, 6};
  qlora::io::write_hf_config(dir / "config.json", c);
  CHECK(qlora::io::read_hf_config(dir / "config.json") == c);
  qlora::test::write_raw(dir / "broken.json", "{\"hidden_size\": ");
  check_names(error_of([&] { (void)qlora::io::read_hf_config(dir / "broken.json"); }), {"broken.json", "not valid JSON"});
  check_names(error_of([&] { (void)qlora::io::read_hf_config(dir / "absent.json"); }), {"cannot open", "absent.json"});
}

TEST_CASE("hf_config: expected tensor names and shapes of an HF Llama") {
  LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 172;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 8;
  c.num_key_value_heads = 4;
  c.head_dim = 8;
  c.vocab_size = 512;
  c.tie_word_embeddings = false;
  const auto specs = qlora::io::llama_tensor_specs(c);
  REQUIRE(specs.size() == 1 + 2 * 9 + 2);
  CHECK(specs[0].name == "model.embed_tokens.weight");
  CHECK(specs[0].shape == Shape{512, 64});
  CHECK(specs[2].name == "model.layers.0.self_attn.q_proj.weight");
  CHECK(specs[2].shape == Shape{64, 64});
  CHECK(specs[3].name == "model.layers.0.self_attn.k_proj.weight");
  CHECK(specs[3].shape == Shape{32, 64});
  CHECK(specs[9].name == "model.layers.0.mlp.down_proj.weight");
  CHECK(specs[9].shape == Shape{64, 172});
  CHECK(specs.back().name == "lm_head.weight");
  c.tie_word_embeddings = true;
  CHECK(qlora::io::llama_tensor_specs(c).back().name == "model.norm.weight");
}

TEST_CASE("hf_config: an HF model directory whose tensor shape disagrees with config.json is refused") {
  TempDir dir;
  LlamaConfig c;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 1;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.vocab_size = 10;
  c.tie_word_embeddings = true;
  c.eos_token_ids = {2};
  qlora::io::write_hf_config(dir / "config.json", c);
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::uint64_t seed = 1;
  for (const auto& spec : qlora::io::llama_tensor_specs(c))
    tensors.emplace_back(spec.name, Tensor::from(qlora::test::random_vector<float>(spec.shape.numel(), seed++), spec.shape));
  qlora::io::write_safetensors(dir / "model.safetensors", tensors);
  {
    const qlora::io::HfModelFiles model(dir.path());
    CHECK(model.config() == c);
    CHECK(model.load("model.layers.0.mlp.up_proj.weight").to_vector<float>() == tensors[8].second.to_vector<float>());
    const auto any = qlora::io::open_model_files(dir.path());
    CHECK(any->names().size() == tensors.size());
    CHECK(any->load("model.norm.weight").to_vector<float>() == tensors.back().second.to_vector<float>());
  }
  // k_proj stored with 4 heads' worth of rows while config.json says 2 KV heads.
  const Tensor good_k = tensors[3].second;
  tensors[3].second = Tensor::from(qlora::test::random_vector<float>(16 * 16, 99), Shape{16, 16});
  qlora::io::write_safetensors(dir / "model.safetensors", tensors);
  check_names(error_of([&] { qlora::io::HfModelFiles model(dir.path()); }),
              {"model.safetensors", "tensor model.layers.0.self_attn.k_proj.weight has shape [16,16]",
               "config.json implies [8,16]"});
  tensors[3].second = good_k;
  tensors.erase(tensors.begin() + 5);
  qlora::io::write_safetensors(dir / "model.safetensors", tensors);
  check_names(error_of([&] { qlora::io::HfModelFiles model(dir.path()); }),
              {"model.safetensors", "tensor model.layers.0.self_attn.o_proj.weight is missing"});
}
