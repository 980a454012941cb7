#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "qlora/cpu/rope.hpp"
#include "qlora/io/llama2c.hpp"
#include "qlora/io/model_files.hpp"
#include "support/random.hpp"
#include "support/shared_data.hpp"

using qlora::DType;
using qlora::Shape;
using qlora::Tensor;
using qlora::io::Llama2cCheckpoint;
using qlora::test::TempDir;
using qlora::test::append_value;
using qlora::test::check_names;
using qlora::test::error_of;
using qlora::test::kStories260K;
namespace fs = std::filesystem;

namespace {

// A small llama2.c file made by hand: header, then every array filled with the float index of its value
// in the file (0, 1, 2, ...), so each tensor's expected content is known from the layout alone.
struct TinyLlama2c {
  std::int32_t dim = 16, hidden = 24, layers = 2, heads = 4, kv_heads = 2, vocab = 10, seq = 6;
  bool shared = false;
  std::int64_t floats() const {
    const std::int64_t hs = dim / heads, kv = kv_heads * hs;
    std::int64_t n = vocab * dim + layers * (dim + dim * dim + 2 * kv * dim + dim * dim + dim + 3 * hidden * dim) + dim +
                     seq * hs;
    return shared ? n : n + vocab * dim;
  }
  std::string bytes() const {
    std::string s;
    for (std::int32_t v : {dim, hidden, layers, heads, kv_heads, shared ? vocab : -vocab, seq}) append_value(s, v);
    for (std::int64_t i = 0; i < floats(); ++i) append_value(s, float(i));
    return s;
  }
};

}  // namespace

TEST_CASE("llama2c: stories260K.bin header, config, parameter count and values at known offsets") {
  if (!qlora::test::shared_file_present(kStories260K)) return;
  const Llama2cCheckpoint ck(kStories260K);
  const auto& h = ck.header();
  // Header (64, 172, 5, 8, 4, 512, 512): shared/data/MANIFEST.md.
  CHECK(h.dim == 64);
  CHECK(h.hidden_dim == 172);
  CHECK(h.n_layers == 5);
  CHECK(h.n_heads == 8);
  CHECK(h.n_kv_heads == 4);
  CHECK(h.vocab_size == 512);
  CHECK(h.seq_len == 512);
  CHECK(h.shared_classifier);
  const auto& c = ck.config();
  CHECK(c.head_dim == 8);
  CHECK(c.kv_dim() == 32);
  CHECK(c.tie_word_embeddings);
  // 264,128 floats in the file (MANIFEST.md) less the two RoPE tables of 512 x 4 each.
  CHECK(ck.parameter_count() == 264128 - 2 * 512 * 4);
  CHECK(ck.names().size() == 1 + 5 * 9 + 1);

  // Values read with Python's struct module straight from the file at 28 + 4 * index (independent of
  // this reader): tok_embeddings[0, 0..2], tok_embeddings[511, 63], rms_att[0][0], rms_final[63], ...
  const auto emb = ck.load("model.embed_tokens.weight");
  CHECK(emb.shape() == Shape{512, 64});
  CHECK(emb.data<float>()[0] == -0.29474878311157227f);
  CHECK(emb.data<float>()[1] == 0.5618956089019775f);
  CHECK(emb.data<float>()[2] == 0.1754225343465805f);
  CHECK(emb.data<float>()[511 * 64 + 63] == -0.424032598733902f);
  CHECK(ck.load("model.layers.0.input_layernorm.weight").data<float>()[0] == 0.9722429513931274f);
  CHECK(ck.load("model.norm.weight").data<float>()[63] == 1.7077769041061401f);
  CHECK(ck.load("model.layers.2.mlp.gate_proj.weight").data<float>()[100 * 64 + 7] == 0.008348328061401844f);    // w1
  CHECK(ck.load("model.layers.4.mlp.down_proj.weight").data<float>()[63 * 172 + 171] == -0.0035068716388195753f);  // w2
  CHECK(ck.load("model.layers.0.mlp.up_proj.weight").data<float>()[0] == 0.07037118822336197f);                    // w3
  CHECK(ck.load("model.layers.2.mlp.down_proj.weight").shape() == Shape{64, 172});
  // q/k rows are permuted to HF order: within a head of 8, file row 2i + j is HF row 4j + i.
  const auto wq1 = ck.load("model.layers.1.self_attn.q_proj.weight");
  CHECK(wq1.data<float>()[4 * 64 + 2] == -0.18377874791622162f);  // file row 1 (i 0, j 1) -> HF row 4
  CHECK(wq1.data<float>()[0 * 64 + 2] == -0.06554408371448517f);  // file row 0 stays row 0
  const auto wk0 = ck.load("model.layers.0.self_attn.k_proj.weight");
  CHECK(wk0.shape() == Shape{32, 64});
  CHECK(wk0.data<float>()[5 * 64 + 5] == 0.20592665672302246f);  // file row 3 (i 1, j 1) -> HF row 5

  // The stored RoPE tables are cos / sin of pos * 10000^(-2i / head_size) (llama2.c model.py precompute_freqs_cis).
  const Tensor re = ck.freq_cis_real(), im = ck.freq_cis_imag();
  REQUIRE(re.shape() == Shape{512, 4});
  double worst = 0;
  for (int pos = 0; pos < 512; ++pos)
    for (int i = 0; i < 4; ++i) {
      const double angle = pos * std::pow(10000.0, -2.0 * i / 8.0);
      worst = std::max(worst, std::abs(re.data<float>()[pos * 4 + i] - std::cos(angle)));
      worst = std::max(worst, std::abs(im.data<float>()[pos * 4 + i] - std::sin(angle)));
    }
  CHECK(worst < 1e-4);  // float32 tables computed by PyTorch; angles up to 511 rad
  CHECK(re.data<float>()[4 + 1] == 0.9950041770935059f);

  const auto any = qlora::io::open_model_files(kStories260K);
  CHECK(any->config() == c);
  CHECK(any->load("model.layers.1.self_attn.q_proj.weight").to_vector<float>() == wq1.to_vector<float>());
}

TEST_CASE("llama2c: a hand-made file maps every array to its HF tensor, with an unshared classifier") {
  TempDir dir;
  const TinyLlama2c tiny;
  qlora::test::write_raw(dir / "tiny.bin", tiny.bytes());
  const Llama2cCheckpoint ck(dir / "tiny.bin");
  CHECK_FALSE(ck.config().tie_word_embeddings);
  CHECK(ck.config().vocab_size == 10);
  // Offsets in floats: tok 0, rms_att 160, wq 192, wk 704, wv 960, wo 1216, rms_ffn 1728, w1 1760, w2 2528,
  // w3 3296, rms_final 4064, freq tables 4080 and 4092, wcls 4104.
  const auto first = [&](const std::string& name) { return ck.load(name).data<float>()[0]; };
  CHECK(first("model.embed_tokens.weight") == 0.0f);
  CHECK(first("model.layers.1.input_layernorm.weight") == 160.0f + 16);
  CHECK(first("model.layers.0.self_attn.v_proj.weight") == 960.0f);
  CHECK(first("model.layers.1.self_attn.o_proj.weight") == 1216.0f + 256);
  CHECK(first("model.layers.0.post_attention_layernorm.weight") == 1728.0f);
  CHECK(first("model.layers.1.mlp.gate_proj.weight") == 1760.0f + 384);
  CHECK(first("model.layers.0.mlp.down_proj.weight") == 2528.0f);
  CHECK(first("model.layers.0.mlp.up_proj.weight") == 3296.0f);
  CHECK(first("model.norm.weight") == 4064.0f);
  CHECK(ck.freq_cis_imag().data<float>()[0] == 4092.0f);
  CHECK(first("lm_head.weight") == 4104.0f);
  CHECK(ck.load("lm_head.weight").shape() == Shape{10, 16});
  // k of layer 1, head 1 (head_dim 4): HF rows 4..7 hold file rows 4, 6, 5, 7.
  const auto wk = ck.load("model.layers.1.self_attn.k_proj.weight");
  const float base = 704 + 8 * 16;
  CHECK(wk.data<float>()[4 * 16] == base + 4 * 16);
  CHECK(wk.data<float>()[5 * 16] == base + 6 * 16);
  CHECK(wk.data<float>()[6 * 16] == base + 5 * 16);
  CHECK(wk.data<float>()[7 * 16] == base + 7 * 16);
  CHECK(ck.load("model.layers.0.mlp.up_proj.weight", DType::bf16).dtype() == DType::bf16);
}

TEST_CASE("llama2c: interleaved RoPE on the file's weights equals HF rotate-half RoPE on the permuted weights") {
  // What the permutation is for: llama2.c's run.c rotates pairs (2i, 2i+1) of q = W_q x; qlora's rope kernel
  // rotates (i, i + head_dim/2) of q = W_q' x with W_q' the permuted rows. Both must give the same numbers.
  const std::int64_t heads = 3, head_dim = 8, half = 4, in = 5, rows = heads * head_dim, pos = 7;
  const Tensor w = Tensor::from(qlora::test::random_vector<float>(rows * in, 5), Shape{rows, in});
  const auto x = qlora::test::random_vector<float>(in, 6);
  const Tensor w_hf = qlora::io::rope_rows_interleaved_to_half(w, heads);
  const auto matvec = [&](const Tensor& m) {
    std::vector<float> y(rows, 0.0f);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t k = 0; k < in; ++k) y[r] += m.data<float>()[r * in + k] * x[k];
    return y;
  };
  std::vector<float> q_file = matvec(w), q_hf = matvec(w_hf);
  std::vector<float> inv_freq(half);
  for (std::int64_t i = 0; i < half; ++i) inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / double(head_dim)));
  for (std::int64_t h = 0; h < heads; ++h)  // run.c: for i in 0, 2, 4, ...: rotate (v0, v1) by pos * freq
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = float(pos) * inv_freq[i];
      float& a = q_file[h * head_dim + 2 * i];
      float& b = q_file[h * head_dim + 2 * i + 1];
      const float a0 = a, b0 = b;
      a = a0 * std::cos(angle) - b0 * std::sin(angle);
      b = a0 * std::sin(angle) + b0 * std::cos(angle);
    }
  qlora::cpu::rope_forward(q_hf.data(), inv_freq.data(), 1, 1, heads, head_dim, pos);
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < half; ++i)
      for (std::int64_t j = 0; j < 2; ++j)
        CHECK(q_hf[h * head_dim + j * half + i] == doctest::Approx(q_file[h * head_dim + 2 * i + j]).epsilon(1e-5));
  // And the inverse permutation gives the stored rows back.
  CHECK(qlora::io::rope_rows_half_to_interleaved(w_hf, heads).to_vector<float>() == w.to_vector<float>());
}

TEST_CASE("llama2c: truncated, padded or corrupt files are refused naming the file and both sizes") {
  TempDir dir;
  const TinyLlama2c tiny;
  const std::string good = tiny.bytes();
  const auto p = dir / "bad.bin";
  qlora::test::write_raw(p, good.substr(0, good.size() - 4));
  check_names(error_of([&] { Llama2cCheckpoint ck(p); }),
              {"bad.bin", "has " + std::to_string(good.size() - 4) + " bytes", "implies " + std::to_string(good.size())});
  qlora::test::write_raw(p, good + "xxxx");
  check_names(error_of([&] { Llama2cCheckpoint ck(p); }), {"bad.bin", "implies " + std::to_string(good.size())});
  qlora::test::write_raw(p, good.substr(0, 20));
  check_names(error_of([&] { Llama2cCheckpoint ck(p); }), {"bad.bin", "28-byte"});
  std::string corrupt = good;
  const std::int32_t zero_heads = 0;
  std::memcpy(corrupt.data() + 12, &zero_heads, 4);
  qlora::test::write_raw(p, corrupt);
  check_names(error_of([&] { Llama2cCheckpoint ck(p); }), {"bad.bin", "n_heads is 0"});
  check_names(error_of([&] { Llama2cCheckpoint ck(dir / "absent.bin"); }), {"cannot open", "absent.bin"});
  if (fs::exists(kStories260K)) {  // the real checkpoint cut short
    const std::string real = qlora::test::read_raw(kStories260K);
    qlora::test::write_raw(p, real.substr(0, real.size() / 2));
    check_names(error_of([&] { Llama2cCheckpoint ck(p); }), {"bad.bin", "implies 1056540 bytes"});
  }
}
