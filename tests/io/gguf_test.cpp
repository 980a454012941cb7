#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/model_files.hpp"
#include "support/random.hpp"
#include "support/shared_data.hpp"

using qlora::DType;
using qlora::Shape;
using qlora::Tensor;
using qlora::io::GgmlType;
using qlora::io::GgufFile;
using qlora::io::GgufType;
using qlora::io::GgufValue;
using qlora::test::GgufBytes;
using qlora::test::TempDir;
using qlora::test::append_value;
using qlora::test::check_names;
using qlora::test::error_of;
namespace fs = std::filesystem;

namespace {

const fs::path kVocabGguf = qlora::test::kSharedData / "tokenizers/llamacpp-vocab-tests/ggml-vocab-llama-spm.gguf";

// A small file: scalars of every type, an array of strings, a nested array, alignment 64, and two tensors:
// t.f32 (ne {3, 2}: row-major [2, 3]) and t.q8 (one Q8_0 block, ne {32}).
std::string hand_made_gguf() {
  GgufBytes g;
  g.header(2, 12);
  g.key("general.alignment", GgufType::u32);
  append_value<std::uint32_t>(g.s, 64);
  g.key("k.u8", GgufType::u8);
  append_value<std::uint8_t>(g.s, 200);
  g.key("k.i8", GgufType::i8);
  append_value<std::int8_t>(g.s, -100);
  g.key("k.u16", GgufType::u16);
  append_value<std::uint16_t>(g.s, 60000);
  g.key("k.i16", GgufType::i16);
  append_value<std::int16_t>(g.s, -30000);
  g.key("k.i32", GgufType::i32);
  append_value<std::int32_t>(g.s, -2000000000);
  g.key("k.f32", GgufType::f32);
  append_value<float>(g.s, 0.15625f);
  g.key("k.bool", GgufType::boolean);
  append_value<std::uint8_t>(g.s, 1);
  g.key("k.u64", GgufType::u64);
  append_value<std::uint64_t>(g.s, 1ull << 40);
  g.key("k.f64", GgufType::f64);
  append_value<double>(g.s, -2.5e-300);
  g.key("k.strings", GgufType::array);
  append_value<std::uint32_t>(g.s, std::uint32_t(GgufType::string));
  append_value<std::uint64_t>(g.s, 3);
  g.str("alpha");
  g.str("");
  g.str("\xe2\x96\x81\x62");  // "▁b"
  g.key("k.nested", GgufType::array);  // [[1, 2], [3]] of i64
  append_value<std::uint32_t>(g.s, std::uint32_t(GgufType::array));
  append_value<std::uint64_t>(g.s, 2);
  append_value<std::uint32_t>(g.s, std::uint32_t(GgufType::i64));
  append_value<std::uint64_t>(g.s, 2);
  append_value<std::int64_t>(g.s, 1);
  append_value<std::int64_t>(g.s, 2);
  append_value<std::uint32_t>(g.s, std::uint32_t(GgufType::i64));
  append_value<std::uint64_t>(g.s, 1);
  append_value<std::int64_t>(g.s, 3);
  g.tensor_info("t.f32", {3, 2}, GgmlType::F32, 0);
  g.tensor_info("t.q8", {32}, GgmlType::Q8_0, 64);
  g.pad(64);
  for (float v : {1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.5f}) append_value(g.s, v);
  g.pad(64);
  append_value<std::uint16_t>(g.s, qlora::to_f16(0.25f).bits);
  for (int j = 0; j < 32; ++j) append_value<std::int8_t>(g.s, std::int8_t(j - 16));
  return g.s;
}

}  // namespace

TEST_CASE("gguf: a hand-made file: every metadata type, nested arrays, alignment 64, F32 and Q8_0 tensors") {
  TempDir dir;
  qlora::test::write_raw(dir / "h.gguf", hand_made_gguf());
  const GgufFile f(dir / "h.gguf");
  CHECK(f.version() == 3);
  CHECK(f.alignment() == 64);
  CHECK(f.keys().size() == 12);
  CHECK(f.get_int("k.u8") == 200);
  CHECK(f.get_int("k.i8") == -100);
  CHECK(f.get_int("k.u16") == 60000);
  CHECK(f.get_int("k.i16") == -30000);
  CHECK(f.get_int("k.i32") == -2000000000);
  CHECK(f.get_double("k.f32") == 0.15625);
  CHECK(f.get_bool("k.bool"));
  CHECK(f.get_int("k.u64") == (1ll << 40));
  CHECK(f.get_double("k.f64") == -2.5e-300);
  CHECK(f.get("k.strings").as_strings("k.strings") == std::vector<std::string>{"alpha", "", "\xe2\x96\x81\x62"});
  const auto& nested = f.get("k.nested").as_array("k.nested");
  REQUIRE(nested.size() == 2);
  CHECK(nested[0].as_ints("inner") == std::vector<std::int64_t>{1, 2});
  CHECK(nested[1].as_ints("inner") == std::vector<std::int64_t>{3});
  check_names(error_of([&] { (void)f.get_string("k.u8"); }), {"h.gguf", "k.u8", "expected a string"});
  check_names(error_of([&] { (void)f.get_int("absent.key"); }), {"h.gguf", "absent.key"});

  CHECK(f.data_start() % 64 == 0);
  const auto& info = f.tensor("t.f32");
  CHECK(info.ne == std::vector<std::uint64_t>{3, 2});
  CHECK(info.shape() == Shape{2, 3});  // ne reversed
  const Tensor t = f.load("t.f32");
  CHECK(t.to_vector<float>() == std::vector<float>{1, 2, 3, 4, 5, 6.5f});
  CHECK(f.load("t.f32", DType::bf16).dtype() == DType::bf16);
  const Tensor q = f.load("t.q8");
  REQUIRE(q.shape() == Shape{32});
  for (int j = 0; j < 32; ++j) CHECK(q.data<float>()[j] == 0.25f * float(j - 16));
}

TEST_CASE("gguf: the llama.cpp SentencePiece vocabulary file (vocab-only, GGUF v3)") {
  if (!qlora::test::shared_file_present(kVocabGguf)) return;
  const GgufFile f(kVocabGguf);
  // Expected values from a separate Python parse of the file with the struct module (see docs/model-files.md).
  CHECK(f.version() == 3);
  CHECK(f.tensors().empty());
  CHECK(f.keys().size() == 22);
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get_string("general.name") == "llama-spm");
  CHECK(f.get_int("llama.rope.dimension_count") == 128);

  const auto tok = qlora::io::gguf_tokenizer(f);
  CHECK(tok.model == "llama");
  CHECK(tok.pre == "default");
  REQUIRE(tok.tokens.size() == 32000);
  REQUIRE(tok.scores.size() == 32000);
  REQUIRE(tok.token_types.size() == 32000);
  CHECK(tok.merges.empty());
  CHECK(tok.tokens[0] == "<unk>");
  CHECK(tok.tokens[1] == "<s>");
  CHECK(tok.tokens[2] == "</s>");
  CHECK(tok.tokens[3] == "<0x00>");
  CHECK(tok.tokens[13] == "<0x0A>");
  CHECK(tok.tokens[29871] == "\xe2\x96\x81");            // "▁"
  CHECK(tok.tokens[450] == "\xe2\x96\x81The");            // "▁The"
  CHECK(tok.tokens[10994] == "Hello");
  CHECK(tok.tokens[31999] == "\xe7\xbb\x99");             // "给"
  CHECK(tok.scores[450] == -191.0f);
  CHECK(tok.scores[10994] == -10735.0f);
  CHECK(tok.scores[29871] == -1e9f);
  CHECK(tok.token_types[0] == 2);   // unknown
  CHECK(tok.token_types[1] == 3);   // control
  CHECK(tok.token_types[3] == 6);   // byte
  CHECK(tok.token_types[450] == 1); // normal
  CHECK(tok.bos_id == 1);
  CHECK(tok.eos_id == 2);
  CHECK(tok.unknown_id == 0);
  CHECK_FALSE(tok.padding_id.has_value());
  CHECK(tok.add_bos == true);
  CHECK(tok.add_eos == false);

  const auto c = qlora::io::gguf_llama_config(f);  // Llama-2-7B hyperparameters
  CHECK(c.hidden_size == 4096);
  CHECK(c.intermediate_size == 11008);
  CHECK(c.num_hidden_layers == 32);
  CHECK(c.num_attention_heads == 32);
  CHECK(c.num_key_value_heads == 32);
  CHECK(c.head_dim == 128);
  CHECK(c.max_position_embeddings == 4096);
  CHECK(c.rms_norm_eps == 1e-5);  // the f32 in the file, read as the shortest decimal that gives it back
  CHECK(c.rope_theta == 10000.0);
  CHECK(c.vocab_size == 32000);
  CHECK(c.bos_token_id == 1);
  CHECK(c.eos_token_ids == std::vector<std::int64_t>{2});
}

TEST_CASE("gguf: tensor names map between GGUF and HF both ways") {
  using qlora::io::gguf_to_hf_name;
  using qlora::io::hf_to_gguf_name;
  CHECK(gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight");
  CHECK(gguf_to_hf_name("output.weight") == "lm_head.weight");
  CHECK(gguf_to_hf_name("output_norm.weight") == "model.norm.weight");
  CHECK(gguf_to_hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight");
  CHECK(gguf_to_hf_name("blk.0.ffn_gate.weight") == "model.layers.0.mlp.gate_proj.weight");
  CHECK(gguf_to_hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight");
  CHECK_FALSE(gguf_to_hf_name("blk.x.attn_q.weight").has_value());
  CHECK_FALSE(gguf_to_hf_name("rope_freqs.weight").has_value());
  qlora::io::LlamaConfig c;
  c.num_hidden_layers = 3;
  for (const auto& spec : qlora::io::llama_tensor_specs(c)) {
    const auto g = hf_to_gguf_name(spec.name);
    REQUIRE(g.has_value());
    CHECK(gguf_to_hf_name(*g) == spec.name);
  }
}

TEST_CASE("gguf: writer -> reader round trip of a llama model, with llama.cpp's q/k permutation undone") {
  TempDir dir;
  qlora::io::LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 40;
  c.max_position_embeddings = 128;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 50000.0;
  c.tie_word_embeddings = false;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};

  std::vector<std::string> tokens;
  for (int i = 0; i < 40; ++i) tokens.push_back("tok" + std::to_string(i));
  const auto write_model = [&](const fs::path& path, GgmlType matrix_type, std::uint32_t block_count = 2) {
    qlora::io::GgufWriter w;
    w.set("general.architecture", GgufValue::string("llama"));
    w.set("llama.context_length", GgufValue::u32(128));
    w.set("llama.embedding_length", GgufValue::u32(64));
    w.set("llama.block_count", GgufValue::u32(block_count));
    w.set("llama.feed_forward_length", GgufValue::u32(96));
    w.set("llama.attention.head_count", GgufValue::u32(4));
    w.set("llama.attention.head_count_kv", GgufValue::u32(2));
    w.set("llama.attention.layer_norm_rms_epsilon", GgufValue::f32(1e-5f));
    w.set("llama.rope.freq_base", GgufValue::f32(50000.0f));
    w.set("tokenizer.ggml.model", GgufValue::string("llama"));
    w.set("tokenizer.ggml.tokens", GgufValue::strings(tokens));
    w.set("tokenizer.ggml.scores", GgufValue::f32s(std::vector<float>(40, -1.5f)));
    w.set("tokenizer.ggml.token_type", GgufValue::i32s(std::vector<std::int32_t>(40, 1)));
    w.set("tokenizer.ggml.bos_token_id", GgufValue::u32(1));
    w.set("tokenizer.ggml.eos_token_id", GgufValue::u32(2));
    std::vector<std::pair<std::string, Tensor>> hf;
    std::uint64_t seed = 100;
    for (const auto& spec : qlora::io::llama_tensor_specs(c)) {
      Tensor t = Tensor::from(qlora::test::random_vector<float>(spec.shape.numel(), seed++, -1.0, 1.0), spec.shape);
      hf.emplace_back(spec.name, t);
      // As convert_hf_to_gguf.py: q over head_count heads, k over head_count_kv heads, into interleaved pairs.
      if (spec.name.ends_with("q_proj.weight")) t = qlora::io::rope_rows_half_to_interleaved(t, 4);
      if (spec.name.ends_with("k_proj.weight")) t = qlora::io::rope_rows_half_to_interleaved(t, 2);
      w.add_tensor(*qlora::io::hf_to_gguf_name(spec.name), t, spec.shape.rank() == 2 ? matrix_type : GgmlType::F32);
    }
    w.write(path);
    return hf;
  };

  SUBCASE("F32: exact") {
    const auto hf = write_model(dir / "m.gguf", GgmlType::F32);
    const qlora::io::GgufLlama m(dir / "m.gguf");
    CHECK(m.config() == c);
    CHECK(m.file().version() == 3);
    for (const auto& [name, t] : hf) CHECK(m.load(name).to_vector<float>() == t.to_vector<float>());
    const auto tok = qlora::io::gguf_tokenizer(m.file());
    CHECK(tok.tokens == tokens);
    CHECK(tok.scores == std::vector<float>(40, -1.5f));
    const auto any = qlora::io::open_model_files(dir / "m.gguf");
    CHECK(any->load("model.layers.1.self_attn.k_proj.weight").to_vector<float>() == hf[12].second.to_vector<float>());
  }
  SUBCASE("a block_count the file's tensors cannot hold is refused before the expected tensors are listed") {
    // Fuzz smoke regression: block_count 10^8 once built a list of 9 x 10^8 names and ran out of memory.
    (void)write_model(dir / "m.gguf", GgmlType::F32, 3);
    check_names(error_of([&] { qlora::io::GgufLlama m(dir / "m.gguf"); }),
                {"m.gguf", "llama.block_count 3", "holds 21 tensors"});
    (void)write_model(dir / "m.gguf", GgmlType::F32, 100000000);
    check_names(error_of([&] { qlora::io::GgufLlama m(dir / "m.gguf"); }), {"m.gguf", "beyond any Llama"});
  }
  SUBCASE("F16, Q8_0 and Q4_1: within each format's rounding") {
    for (auto [type, tol] : {std::pair{GgmlType::F16, 1e-3}, std::pair{GgmlType::Q8_0, 1e-2}, std::pair{GgmlType::Q4_1, 0.12}}) {
      const auto hf = write_model(dir / "m.gguf", type);
      const qlora::io::GgufLlama m(dir / "m.gguf");
      CHECK(m.file().tensor("blk.0.attn_q.weight").type == std::uint32_t(type));
      for (const auto& [name, t] : hf) {
        INFO(name << " as " << qlora::io::ggml_type_name(std::uint32_t(type)));
        CHECK(qlora::test::rel_error(m.load(name).to_vector<float>(), t.to_vector<float>()) < tol);
      }
    }
  }
}

TEST_CASE("gguf: writer refuses NaN, bad block shapes and unsupported types, naming the tensor") {
  qlora::io::GgufWriter w;
  const Tensor nan = Tensor::from(std::vector<float>{1.0f, std::nanf("")}, Shape{2});
  check_names(error_of([&] { w.add_tensor("blk.0.attn_norm.weight", nan, GgmlType::F32); }),
              {"blk.0.attn_norm.weight", "non-finite"});
  const Tensor odd = Tensor::from(qlora::test::random_vector<float>(2 * 48, 3), Shape{2, 48});
  check_names(error_of([&] { w.add_tensor("w", odd, GgmlType::Q8_0); }), {"tensor w", "multiple of 32"});
  check_names(error_of([&] { w.add_tensor("w", odd, GgmlType::Q4_K); }), {"tensor w", "Q4_K", "not supported"});
  w.add_tensor("w", odd, GgmlType::F16);
  check_names(error_of([&] { w.add_tensor("w", odd, GgmlType::F16); }), {"tensor w", "twice"});
}

TEST_CASE("gguf: truncated or corrupt files are refused naming the file (and tensor)") {
  TempDir dir;
  const std::string good = hand_made_gguf();
  const auto p = dir / "bad.gguf";
  SUBCASE("tensor data cut short") {
    qlora::test::write_raw(p, good.substr(0, good.size() - 10));
    check_names(error_of([&] { GgufFile f(p); }), {"bad.gguf", "tensor t.q8", "runs past the end", "truncated"});
  }
  SUBCASE("cut inside the metadata") {
    qlora::test::write_raw(p, good.substr(0, 100));
    check_names(error_of([&] { GgufFile f(p); }), {"bad.gguf", "truncated"});
  }
  SUBCASE("not GGUF") {
    qlora::test::write_raw(p, "GGML and more bytes");
    check_names(error_of([&] { GgufFile f(p); }), {"bad.gguf", "not a GGUF file"});
  }
  SUBCASE("unsupported version") {
    std::string s = good;
    const std::uint32_t v1 = 1;
    std::memcpy(s.data() + 4, &v1, 4);
    qlora::test::write_raw(p, s);
    check_names(error_of([&] { GgufFile f(p); }), {"bad.gguf", "version 1"});
  }
  SUBCASE("a huge string length") {
    GgufBytes g;
    g.header(0, 1);
    append_value<std::uint64_t>(g.s, 1ull << 60);
    g.s += "key" + std::string(64, 'x');
    qlora::test::write_raw(p, g.s);
    check_names(error_of([&] { GgufFile f(p); }), {"bad.gguf", "truncated"});
  }
  SUBCASE("an unreadable tensor type is refused on load, by name") {
    GgufBytes g;
    g.header(1, 0);
    g.tensor_info("blk.0.ffn_up.weight", {256}, GgmlType::Q4_K, 0);
    g.pad(32);
    g.s.append(144, '\x01');
    qlora::test::write_raw(p, g.s);
    const GgufFile f(p);
    check_names(error_of([&] { (void)f.load("blk.0.ffn_up.weight"); }), {"blk.0.ffn_up.weight", "bad.gguf", "Q4_K"});
  }
  SUBCASE("a missing file") {
    check_names(error_of([&] { GgufFile f(dir / "absent.gguf"); }), {"cannot open", "absent.gguf"});
  }
  if (fs::exists(kVocabGguf)) {  // the real vocabulary file cut in its token array
    const std::string real = qlora::test::read_raw(kVocabGguf);
    qlora::test::write_raw(p, real.substr(0, real.size() / 2));
    check_names(error_of([&] { GgufFile f(p); }), {"bad.gguf", "truncated", "tokenizer.ggml"});
  }
}
