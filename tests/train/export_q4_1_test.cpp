// GGUF Q4_1 export of a model on an INT base (train/export.hpp, exact_q4_1_blocks): QA-BLoRA on an INT4
// group-32 base merges exactly into Q4_1's per-block minimum (methods/qblora.md, "Mergeability condition";
// issue 7 item 3). The file is read back by raw bytes and dequantized here with ggml's formula
// (x = d * nibble + m, ggml-common.h block_q4_1: byte j holds value j low and value j + 16 high), independently
// of the writer, and compared with the merged model that stays in memory.

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <vector>

#include "models/llama/load.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/int_codes.hpp"
#include "qlora/train/export.hpp"
#include "support/files.hpp"

namespace fs = std::filesystem;
namespace ml = qlora::models::llama;
using namespace qlora;

namespace {

// Every matrix has rows of a multiple of 32 values, so every block linear can be Q4_1.
ml::Config q4_1_config() {
  ml::Config c;
  c.hidden_size = 64;
  c.intermediate_size = 128;  // QA-BLoRA pools p = g inputs: 64 and 128 take groups of 32 and 64
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 64;
  c.max_position_embeddings = 32;
  c.rope_theta = 10000.0;
  return c;
}

ml::Model model_with(nn::AdapterKind kind, const char* base, std::uint64_t seed) {
  ml::LoadOptions o;
  o.quant = quant::QuantConfig::parse(base);
  o.adapter.kind = kind;
  o.adapter.rank = 4;
  o.adapter.alpha = 8;
  ml::Model m = ml::random_model(q4_1_config(), o, seed);
  // As after training: every adapter parameter random (B starts at zero, which would merge nothing).
  std::uint64_t i = 0;
  for (autograd::Param* p : m.params()) p->value.copy_from(ops::randn(p->value.shape(), seed + 100 + i++, Device::cpu(), 0.f, 0.05f));
  return m;
}

struct Q4_1Matrix {
  std::vector<float> values;        // [rows, cols], HF row order
  std::vector<std::uint8_t> codes;  // the nibbles, same order
  std::vector<float> d, m;          // per block, same order
};

// A Q4_1 tensor of the file, dequantized by ggml's formula in f32, rows put back in HF's q/k order.
Q4_1Matrix read_q4_1(const io::GgufFile& file, const std::string& name, std::int64_t rope_heads) {
  const io::GgufTensorInfo& info = file.tensor(name);
  REQUIRE(info.type == std::uint32_t(io::GgmlType::Q4_1));
  const std::int64_t rows = info.dims()[0], cols = info.dims()[1], blocks_per_row = cols / 32;
  const auto bytes = file.tensor_bytes(name);
  REQUIRE(bytes.size() == std::size_t(rows * blocks_per_row * 20));
  // One f32 row per matrix row: values, then codes, d, m as floats, so one row permutation moves them all.
  const std::int64_t width = cols + cols + 2 * blocks_per_row;
  Tensor table = Tensor::empty(Shape{rows, width}, DType::f32);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t b = 0; b < blocks_per_row; ++b) {
      std::uint16_t d_bits, m_bits;
      const std::byte* block = bytes.data() + (r * blocks_per_row + b) * 20;
      std::memcpy(&d_bits, block, 2);
      std::memcpy(&m_bits, block + 2, 2);
      const float d = to_float(std::bit_cast<f16>(d_bits)), m = to_float(std::bit_cast<f16>(m_bits));
      float* row = table.data<float>() + r * width;
      row[2 * cols + b] = d;
      row[2 * cols + blocks_per_row + b] = m;
      for (int j = 0; j < 16; ++j) {
        const auto byte = std::uint8_t(block[4 + j]);
        const int lo = byte & 0x0f, hi = byte >> 4;
        row[b * 32 + j] = d * float(lo) + m;
        row[b * 32 + j + 16] = d * float(hi) + m;
        row[cols + b * 32 + j] = float(lo);
        row[cols + b * 32 + j + 16] = float(hi);
      }
    }
  if (rope_heads > 0) table = io::rope_rows_interleaved_to_half(table, rope_heads, name);
  Q4_1Matrix out;
  const float* t = table.data<float>();
  for (std::int64_t r = 0; r < rows; ++r) {
    out.values.insert(out.values.end(), t + r * width, t + r * width + cols);
    for (std::int64_t i = 0; i < cols; ++i) out.codes.push_back(std::uint8_t(t[r * width + cols + i]));
    out.d.insert(out.d.end(), t + r * width + 2 * cols, t + r * width + 2 * cols + blocks_per_row);
    out.m.insert(out.m.end(), t + r * width + 2 * cols + blocks_per_row, t + r * width + width);
  }
  return out;
}

std::string gguf_linear_name(std::int64_t layer, ml::DecoderBlock::Proj p) {
  static const char* names[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
  return "blk." + std::to_string(layer) + "." + names[p] + ".weight";
}

}  // namespace

TEST_CASE("export gguf q4_1: QA-BLoRA on an INT4 group-32 base is written exactly from its codes") {
  // Group 64 too (each Q4_1 block lies inside one group). Control: ggml's re-quantization of the same merged
  // weights (the path taken before) misses this bound by far, so the bound does tell the two paths apart.
  for (const std::string base_format : {"int4-g32", "int4-g64"}) {
    INFO(base_format);
    ml::Model model = model_with(nn::AdapterKind::qablora, base_format.c_str(), 11);
    const test::TempDir dir;
    const train::GgufExportSummary summary = train::export_gguf(model, dir / "m.gguf", io::GgmlType::Q4_1);
    CHECK(summary.exact_q4_1 == 2 * ml::DecoderBlock::kProjCount);
    CHECK(summary.f16_fallback == 0);
    const io::GgufFile file(dir / "m.gguf");
    const ml::Config c = q4_1_config();
    double worst_exact = 0, worst_requantized = 0;
    for (std::int64_t layer = 0; layer < 2; ++layer)
      for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
        const auto proj = ml::DecoderBlock::Proj(p);
        const nn::Linear& linear = model.block(layer).linear(proj);
        INFO(linear.name());
        REQUIRE(linear.adapter_shape().kind == nn::AdapterKind::qablora);
        const std::int64_t heads = proj == ml::DecoderBlock::q_proj ? c.num_attention_heads
                                   : proj == ml::DecoderBlock::k_proj ? c.num_key_value_heads : 0;
        const Q4_1Matrix got = read_q4_1(file, gguf_linear_name(layer, proj), heads);
        // The merged model in memory: base (scale (code - zero)) + the adapter's dW, dense f32.
        const Tensor merged = linear.merged_weight(DType::f32);
        const quant::IntCodes base = quant::unpack_int_codes(*linear.quantized_weight(), "test");
        const std::int64_t rows = linear.out_features(), blocks_per_row = linear.in_features() / 32;
        // Exact where it must be: the nibbles are the INT4 codes and d is the f16 scale, bit for bit.
        CHECK(got.codes == base.codes);
        bool d_exact = true;
        for (std::int64_t r = 0; r < rows; ++r)
          for (std::int64_t b = 0; b < blocks_per_row; ++b)
            d_exact &= got.d[std::size_t(r * blocks_per_row + b)] ==
                       base.grids[std::size_t(r * base.groups_per_row + b * 32 / base.group)].scale;
        CHECK(d_exact);
        // m = -scale * zero' carries the merged adapter; its rounding to f16 is the only loss: |m| 2^-11 (half
        // an f16 ulp), plus the f32 rounding of both sides (d q + m here, base + dW in memory): 1e-6 of the
        // magnitudes involved.
        const float* w = merged.data<float>();
        const auto tolerance = [&](std::size_t block) {
          const double m = std::fabs(got.m[block]);
          return m * 0x1p-11 + 1e-6 * (15 * got.d[block] + m);
        };
        // Control: ggml's reference quantizer on the merged weights.
        std::vector<cpu::BlockQ4_1> requantized(std::size_t(merged.numel() / 32));
        cpu::quantize_q4_1(w, requantized.data(), std::int64_t(requantized.size()));
        std::vector<float> back(std::size_t(merged.numel()));
        cpu::dequantize_q4_1(requantized.data(), back.data(), std::int64_t(requantized.size()));
        for (std::int64_t i = 0; i < merged.numel(); ++i) {
          const std::size_t at = std::size_t(i), block = std::size_t(i / 32);
          worst_exact = std::max(worst_exact, std::fabs(double(got.values[at]) - w[i]) / tolerance(block));
          worst_requantized = std::max(worst_requantized, std::fabs(double(back[at]) - w[i]) / tolerance(block));
        }
      }
    MESSAGE(base_format << ": worst |gguf - merged| / tolerance " << worst_exact << " (ggml re-quantization: "
                        << worst_requantized << ")");
    CHECK(worst_exact <= 1.0);
    CHECK(worst_requantized > 10.0);
  }
}

TEST_CASE("export gguf q4_1: what cannot be exact is re-quantized from the merged weights") {
  const test::TempDir dir;
  // Q-BLoRA pools p = 2 < g = 32: its update is not constant on a group, so no zero point can absorb it.
  ml::Model qblora = model_with(nn::AdapterKind::qblora, "int4-g32", 12);
  train::GgufExportSummary s = train::export_gguf(qblora, dir / "qblora.gguf", io::GgmlType::Q4_1);
  CHECK(s.exact_q4_1 == 0);
  CHECK(s.requantized >= 2 * ml::DecoderBlock::kProjCount);  // and the embedding (and head)
  // INT4 group 16: two groups (two scales) in one 32-value block.
  ml::Model g16 = model_with(nn::AdapterKind::none, "int4-g16", 13);
  s = train::export_gguf(g16, dir / "g16.gguf", io::GgmlType::Q4_1);
  CHECK(s.exact_q4_1 == 0);
  // NF4 has no uniform grid; a symmetric INT4 base without adapter has one (m = -8 d): exact.
  ml::Model nf4 = model_with(nn::AdapterKind::none, "nf4", 14);
  CHECK(train::export_gguf(nf4, dir / "nf4.gguf", io::GgmlType::Q4_1).exact_q4_1 == 0);
  ml::Model sym = model_with(nn::AdapterKind::none, "int4-g64-sym", 15);
  CHECK(train::export_gguf(sym, dir / "sym.gguf", io::GgmlType::Q4_1).exact_q4_1 == 2 * ml::DecoderBlock::kProjCount);
  // Q8_0 never takes the INT path.
  ml::Model qa = model_with(nn::AdapterKind::qablora, "int4-g32", 16);
  CHECK(train::export_gguf(qa, dir / "q8.gguf", io::GgmlType::Q8_0).exact_q4_1 == 0);
}

TEST_CASE("export gguf: a model without a vocabulary gives a valid file without tokenizer metadata") {
  ml::Model model = model_with(nn::AdapterKind::none, "int4-g32", 17);
  const test::TempDir dir;
  train::export_gguf(model, dir / "plain.gguf", io::GgmlType::F16, std::nullopt, "plain");
  const io::GgufFile file(dir / "plain.gguf");
  CHECK(file.get_string("general.architecture") == "llama");
  CHECK_FALSE(file.has("tokenizer.ggml.model"));
  CHECK_FALSE(file.has("tokenizer.ggml.tokens"));
  ml::Model back = ml::load_model(dir / "plain.gguf");
  CHECK(back.config().vocab_size == 64);
  CHECK(train::gguf_vocabulary_of(dir.path()) == std::nullopt);  // a directory without tokenizer.bin: none
}
