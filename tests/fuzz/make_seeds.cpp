// qlora_fuzz_seeds OUT_DIR: writes the generated seed corpora of the fuzz targets (OUT_DIR/<target>/...):
// small valid files made with the project's own writers (so every field the readers check is present and
// consistent), and, where ../shared/data is present, small files derived from the real ones (a few hundred
// tokens of the llama.cpp vocabulary GGUF, the first records of the Alpaca data, the real tokenizer.bin and
// tok512.model, the stories260K header). scripts/fuzz adds the hand-written seeds of tests/fuzz/seeds/.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "models/llama/calibration.hpp"
#include "models/llama/load.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/train/adamw.hpp"
#include "qlora/train/checkpoint.hpp"
#include "qlora/train/export_quantized.hpp"

namespace fs = std::filesystem;
using namespace qlora;

namespace {

const fs::path kData = QLORA_SHARED_DATA;

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_all(const fs::path& p, std::string_view bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
}
// Deterministic non-zero values.
Tensor ramp(Shape shape, float scale = 0.01f) {
  Tensor t = Tensor::empty(shape);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * float((i * 7919) % 61 - 30);
  return t;
}

void safetensors_seeds(const fs::path& dir) {
  io::write_safetensors(dir / "f32.safetensors", {{"w", ramp({2, 3})}, {"b", ramp({3})}}, {{"format", "pt"}});
  io::write_safetensors(dir / "mixed.safetensors",
                        {{"h", ramp({4, 2}).to(DType::bf16)}, {"f", ramp({2, 2}).to(DType::f16)},
                         {"i", Tensor::zeros({5}, DType::i8)}, {"e", Tensor::empty({0, 3})}});
}

void llama_gguf_seed(const fs::path& path) {
  using V = io::GgufValue;
  io::GgufWriter w;
  w.set("general.architecture", V::string("llama"));
  w.set("llama.vocab_size", V::u32(8));
  w.set("llama.context_length", V::u32(16));
  w.set("llama.embedding_length", V::u32(32));
  w.set("llama.block_count", V::u32(1));
  w.set("llama.feed_forward_length", V::u32(32));
  w.set("llama.attention.head_count", V::u32(2));
  w.set("llama.attention.head_count_kv", V::u32(1));
  w.set("llama.attention.layer_norm_rms_epsilon", V::f32(1e-5f));
  w.set("llama.rope.freq_base", V::f32(10000.f));
  w.set("tokenizer.ggml.model", V::string("llama"));
  w.set("tokenizer.ggml.tokens", V::strings({"<unk>", "<s>", "</s>", "\xE2\x96\x81h", "e", "l", "o", "<0x0A>"}));
  w.set("tokenizer.ggml.scores", V::f32s({0, 0, 0, -1, -2, -3, -4, 0}));
  w.set("tokenizer.ggml.token_type", V::i32s({2, 3, 3, 1, 1, 1, 1, 6}));
  w.set("tokenizer.ggml.bos_token_id", V::u32(1));
  w.set("tokenizer.ggml.eos_token_id", V::u32(2));
  w.add_tensor("token_embd.weight", ramp({8, 32}), io::GgmlType::F32);
  w.add_tensor("blk.0.attn_norm.weight", ramp({32}), io::GgmlType::F32);
  w.add_tensor("blk.0.attn_q.weight", ramp({32, 32}), io::GgmlType::Q8_0);
  w.add_tensor("blk.0.attn_k.weight", ramp({16, 32}), io::GgmlType::Q4_1);
  w.add_tensor("blk.0.attn_v.weight", ramp({16, 32}), io::GgmlType::F16);
  w.add_tensor("blk.0.attn_output.weight", ramp({32, 32}), io::GgmlType::BF16);
  w.add_tensor("blk.0.ffn_norm.weight", ramp({32}), io::GgmlType::F32);
  w.add_tensor("blk.0.ffn_gate.weight", ramp({32, 32}), io::GgmlType::Q4_1);
  w.add_tensor("blk.0.ffn_up.weight", ramp({32, 32}), io::GgmlType::Q8_0);
  w.add_tensor("blk.0.ffn_down.weight", ramp({32, 32}), io::GgmlType::Q8_0);
  w.add_tensor("output_norm.weight", ramp({32}), io::GgmlType::F32);
  w.write(path);
}

// The first `n` tokens of a real vocabulary GGUF, with its other metadata (merges cut to match).
void vocab_gguf_seed(const fs::path& real, const fs::path& path, std::size_t n) {
  const io::GgufFile f(real);
  io::GgufWriter w;
  for (const auto& key : f.keys()) {
    io::GgufValue v = f.get(key);
    if (v.type == io::GgufType::array && v.elements.size() > n) v.elements.resize(n);
    w.set(key, std::move(v));
  }
  w.write(path);
}

// A valid llama2.c checkpoint: dim 4, hidden 4, 1 layer, 2 heads of 2, 1 KV head, vocab 4, seq_len 2.
std::string llama2c_seed(bool shared) {
  const std::int32_t header[7] = {4, 4, 1, 2, 1, shared ? 4 : -4, 2};
  std::string bytes(reinterpret_cast<const char*>(header), sizeof header);
  // tok 16, rms 4, wq 16, wk 8, wv 8, wo 16, rms 4, w1 16, w2 16, w3 16, rms 4, freq 2 + 2 (+ wcls 16)
  const int floats = 16 + 4 + 16 + 8 + 8 + 16 + 4 + 16 + 16 + 16 + 4 + 2 + 2 + (shared ? 0 : 16);
  for (int i = 0; i < floats; ++i) {
    const float v = 0.125f * float(i % 9 - 4);
    bytes.append(reinterpret_cast<const char*>(&v), 4);
  }
  return bytes;
}

void config_seeds(const fs::path& dir) {
  io::LlamaConfig c;
  c.hidden_size = 64, c.intermediate_size = 172, c.num_hidden_layers = 5, c.num_attention_heads = 8;
  c.num_key_value_heads = 4, c.head_dim = 8, c.vocab_size = 512, c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  io::write_hf_config(dir / "stories260k.json", c);
  c.rope_scaling = io::RopeScaling{"llama3", 8.0, 1.0, 4.0, 8192};
  c.eos_token_ids = {2, 3};
  c.tie_word_embeddings = true;
  c.torch_dtype = "bfloat16";
  io::write_hf_config(dir / "llama3-scaling.json", c);
}

void checkpoint_seeds(const fs::path& dir) {
  const fs::path out = dir / ".run";
  autograd::Param a{"layers.0.lora_A", ramp({2, 3})}, b{"layers.0.lora_B", ramp({3})};
  std::vector<autograd::Param*> params{&a, &b};
  train::AdamW optimizer(params);
  train::TrainerState state;
  state.step = 3;
  state.data = {1, 7};
  state.run = {{"lr", 0.001}, {"rank", 4}};
  train::save_checkpoint(out, params, optimizer, state);
  const char* names[3] = {"state.json", "adapter.safetensors", "optimizer.safetensors"};
  for (int i = 0; i < 3; ++i)  // the target's first byte picks the file the rest replaces
    write_all(dir / names[i], std::string(1, char(i)) + read_all(train::checkpoint_dir(out, 3) / names[i]));
  fs::remove_all(out);
}

void data_seeds(const fs::path& dir) {
  // The first byte picks the format: even alpaca, odd jsonl.
  write_all(dir / "alpaca.json", std::string(1, '\0') +
                                     R"([{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Hello"}])");
  write_all(dir / "alpaca.jsonl", std::string(1, '\0') + "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"c\", \"input\": \"d\", \"output\": \"e\"}\n");
  write_all(dir / "prompt.jsonl", std::string(1, '\1') + "{\"prompt\": \"a\", \"completion\": \"b\"}\r\n{\"prompt\": \"\xC3\xA9\", \"completion\": \"\\u00e9\"}\n");
  const fs::path alpaca = kData / "sft/alpaca/alpaca_small.json";
  if (fs::exists(alpaca)) {
    const auto all = nlohmann::json::parse(read_all(alpaca));
    nlohmann::json first = nlohmann::json::array();
    for (std::size_t i = 0; i < 3 && i < all.size(); ++i) first.push_back(all[i]);
    write_all(dir / "alpaca_small-3.json", std::string(1, '\0') + first.dump(1));
  }
}

// quantized_model: a u32 length, config.json, then model.safetensors of a tiny model written by
// export_quantized, in the given format.
void quantized_model_seed(const fs::path& dir, const char* format_name) {
  models::llama::Config c;
  c.hidden_size = 16, c.intermediate_size = 24, c.num_hidden_layers = 1, c.num_attention_heads = 2;
  c.num_key_value_heads = 1, c.head_dim = 8, c.vocab_size = 8, c.max_position_embeddings = 16;
  models::llama::Model m = models::llama::random_model(c, models::llama::LoadOptions{}, 5, 0.3f);
  const quant::QuantConfig format = quant::QuantConfig::parse(format_name);
  (void)models::llama::quantize_model_weights(
      m, [&](const std::string&, const Tensor& w, const Tensor&) { return quant::quantize(w, format); });
  io::QuantizationInfo info;
  info.format = format;
  info.method = "rtn";
  info.tool_version = "seed";
  const fs::path out = dir / ".model";
  (void)train::export_quantized(m, out, info);
  const std::string config = read_all(out / "config.json");
  std::string bytes(4, '\0');
  const auto n = std::uint32_t(config.size());
  std::memcpy(bytes.data(), &n, 4);
  write_all(dir / (std::string(format_name) + ".bin"), bytes + config + read_all(out / "model.safetensors"));
  fs::remove_all(out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: qlora_fuzz_seeds OUT_DIR\n");
    return 2;
  }
  const fs::path out = argv[1];
  try {
    for (const char* t : {"safetensors", "gguf", "llama2c", "tokenizer_bin", "tokenizer_model", "tokenizer_json",
                          "config_json", "dataset", "checkpoint", "quantized_model"})
      fs::create_directories(out / t);
    safetensors_seeds(out / "safetensors");
    llama_gguf_seed(out / "gguf/tiny-llama.gguf");
    write_all(out / "llama2c/shared.bin", llama2c_seed(true));
    write_all(out / "llama2c/unshared.bin", llama2c_seed(false));
    config_seeds(out / "config_json");
    checkpoint_seeds(out / "checkpoint");
    data_seeds(out / "dataset");
    for (const char* format : {"int4-g16", "nf4-g16", "dint4-g16-fz"}) quantized_model_seed(out / "quantized_model", format);

    const bool shared = fs::exists(kData / "models/stories260K/tok512.bin");
    if (shared) {
      const fs::path spm = kData / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-spm.gguf";
      vocab_gguf_seed(spm, out / "gguf/llama-spm-300.gguf", 300);
      const std::string model = read_all(kData / "models/stories260K/stories260K.bin");
      write_all(out / "llama2c/stories260K-header.bin", model.substr(0, 28 + 64));
      write_all(out / "tokenizer_bin/tok512.bin", read_all(kData / "models/stories260K/tok512.bin"));
      write_all(out / "tokenizer_model/tok512.model", read_all(kData / "models/stories260K/tok512.model"));
      // The first 300 lines of the Llama 3 tiktoken file (the 256 byte tokens and the first merges).
      std::ifstream tiktoken(kData / "tokenizers/llama3/tokenizer.model");
      std::string lines, line;
      for (int i = 0; i < 300 && std::getline(tiktoken, line); ++i) lines += line + "\n";
      write_all(out / "tokenizer_model/llama3-300.tiktoken", lines);
      write_all(out / "tokenizer_json/special_tokens_map.json", read_all(kData / "tokenizers/llama3/special_tokens_map.json"));
    } else {
      std::fprintf(stderr, "qlora_fuzz_seeds: %s is absent: generated seeds only\n", kData.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "qlora_fuzz_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
