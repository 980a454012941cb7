#pragma once
// A seeded random Llama written as a Hugging Face directory the way a download has it (model.safetensors and
// config.json from train::export_hf, tokenizer.json, and BOS / EOS in tokenizer_config.json), with the tiny
// BPE tokenizer of tests/io (tokenizer_tiny_bpe.json: 600 tokens, <|endoftext|> = 0, <|im_start|> = 1), and a
// text file to train or score on: the fixture of the tool tests that need a model but not ../shared/data.

#include <cstdint>
#include <filesystem>
#include <string>

#include "models/llama/load.hpp"
#include "qlora/train/export.hpp"
#include "support/files.hpp"
#include "tool_runner.hpp"

namespace qlora::test {

struct TinyHfModel {
  std::filesystem::path model;  // the HF directory
  std::filesystem::path text;   // `text` as a file beside it
};

// Writes under fresh_output_path(name): `config` with the tokenizer's vocabulary (600) and special tokens
// (BOS 1, EOS 0), weights random_model(config, {}, weight_seed, init_std).
inline TinyHfModel write_tiny_hf_model(const std::string& name, models::llama::Config config, std::uint64_t weight_seed,
                                       float init_std, const std::string& text) {
  const std::filesystem::path tokenizer =
      std::filesystem::path(__FILE__).parent_path().parent_path() / "io" / "tokenizer_tiny_bpe.json";
  const std::filesystem::path root = fresh_output_path(name);
  std::filesystem::create_directories(root);
  config.vocab_size = 600;
  config.bos_token_id = 1;
  config.eos_token_ids = {0};
  models::llama::Model m = models::llama::random_model(config, models::llama::LoadOptions{}, weight_seed, init_std);
  TinyHfModel f{root / "model", root / "text.txt"};
  (void)train::export_hf(m, f.model, DType::f32);
  std::filesystem::copy_file(tokenizer, f.model / "tokenizer.json");
  // BOS / EOS from tokenizer_config.json, as a HF download has them (the tokenizer.json has none).
  write_raw(f.model / "tokenizer_config.json",
            R"({"added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": true},)"
            R"( "1": {"content": "<|im_start|>", "special": true}},)"
            R"( "bos_token": "<|im_start|>", "eos_token": "<|endoftext|>"})");
  write_raw(f.text, text);
  return f;
}

}  // namespace qlora::test
