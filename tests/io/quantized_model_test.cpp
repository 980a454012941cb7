// Quantized model directories (io/quantized_model.hpp, train/export_quantized.hpp, QuantizedModelFiles):
// written from a quantized model and loaded back, the stored codes, scales, zeros and double-quantization
// constants are the in-memory ones byte for byte and the logits are identical (no re-quantization on
// load); damaged directories (truncated file, missing or misshapen member, foreign quantization_config)
// are refused with the file and the tensor named.

#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "support/files.hpp"
#include "support/random.hpp"
#include "support/tiny_llama.hpp"

#include "models/llama/calibration.hpp"
#include "models/llama/load.hpp"
#include "qlora/io/model_files.hpp"
#include "qlora/train/export_quantized.hpp"

namespace fs = std::filesystem;
namespace ml = qlora::models::llama;
using namespace qlora;

namespace {

ml::Model quantized_tiny(const quant::QuantConfig& format) {
  ml::Model m = ml::random_model(test::tiny_llama_config(), ml::LoadOptions{}, 21, 0.3f);
  (void)ml::quantize_model_weights(m, [&](const std::string&, const Tensor& w, const Tensor&) { return quant::quantize(w, format); });
  return m;
}

io::QuantizationInfo info_of(const quant::QuantConfig& format) {
  io::QuantizationInfo info;
  info.format = format;
  info.method = "rtn";
  info.tool_version = "test";
  return info;
}

std::vector<float> logits_of(ml::Model& m) {
  std::vector<std::int32_t> ids = {1, 5, 9, 30, 2, 17, 36, 4, 11};
  const Tensor l = m.logits(Tensor::from(ids, Shape{1, std::int64_t(ids.size())}));
  return {l.data<float>(), l.data<float>() + l.numel()};
}

template <class T>
std::vector<T> bytes_of(const Tensor& t) {
  return t.defined() ? t.to(Device::cpu()).to_vector<T>() : std::vector<T>{};
}

// Rewrites dir/model.safetensors through `edit` (a list of tensors to change in place).
void rewrite(const fs::path& dir, const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  {
    const io::SafetensorsFile file(dir / "model.safetensors");
    for (const auto& name : file.names()) tensors.emplace_back(name, file.load(name).clone());
  }
  edit(tensors);
  io::write_safetensors(dir / "model.safetensors", tensors);
}

}  // namespace

TEST_CASE("quantized model directory: save and load round trip is exact for every scheme") {
  for (const char* name : {"int4-g16", "int3-g16-sym", "dint4-g16-fz", "int2-g0", "nf4-g16", "nf4-g16-nodq"}) {
    CAPTURE(name);
    const quant::QuantConfig format = quant::QuantConfig::parse(name);
    ml::Model model = quantized_tiny(format);
    test::TempDir dir;
    const fs::path out = dir / "q";
    io::QuantizationInfo info = info_of(format);
    info.calibration = io::CalibrationRecord{"calib.txt", 128, 512, 9};
    (void)train::export_quantized(model, out, info);

    const auto files = io::open_model_files(out);
    REQUIRE(files->quantization() != nullptr);
    CHECK(files->quantization()->format == format);
    CHECK(files->quantization()->calibration == info.calibration);
    CHECK(files->quantization()->act_bits == 0);
    ml::Model loaded = ml::build_model(*files, ml::LoadOptions{});
    CHECK(loaded.options().quant == format);
    for (std::int64_t i = 0; i < model.num_layers(); ++i)
      for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
        const auto proj = ml::DecoderBlock::Proj(p);
        const quant::QuantizedTensor* a = model.block(i).linear(proj).quantized_weight();
        const quant::QuantizedTensor* b = loaded.block(i).linear(proj).quantized_weight();
        REQUIRE(a != nullptr);
        REQUIRE(b != nullptr);
        CHECK(b->config == a->config);
        CHECK(bytes_of<std::uint8_t>(b->codes) == bytes_of<std::uint8_t>(a->codes));
        if (a->scales.defined() && a->scales.dtype() == DType::f16) {
          CHECK(bytes_of<f16>(b->scales).size() == bytes_of<f16>(a->scales).size());
          CHECK(std::memcmp(b->scales.data(), a->scales.data(), a->scales.nbytes()) == 0);
        } else if (a->scales.defined()) {
          CHECK(bytes_of<float>(b->scales) == bytes_of<float>(a->scales));
        }
        if (a->zeros.defined()) CHECK(std::memcmp(b->zeros.data(), a->zeros.data(), a->zeros.nbytes()) == 0);
        CHECK(bytes_of<std::uint8_t>(b->absmax_codes) == bytes_of<std::uint8_t>(a->absmax_codes));
        CHECK(bytes_of<float>(b->absmax_scales) == bytes_of<float>(a->absmax_scales));
        CHECK(b->absmax_mean == a->absmax_mean);
      }
    CHECK(logits_of(loaded) == logits_of(model));
    // Dense readers (export, info) get the dequantized weight.
    const Tensor w = files->load("model.layers.1.mlp.down_proj.weight");
    CHECK(bytes_of<float>(w) == bytes_of<float>(quant::dequantize(*model.block(1).linear(ml::DecoderBlock::down_proj).quantized_weight())));
  }
}

TEST_CASE("quantized model directory: act_bits becomes the loaded model's activation fake-quant") {
  const quant::QuantConfig format = quant::QuantConfig::parse("int4-g16");
  ml::Model model = quantized_tiny(format);
  test::TempDir dir;
  io::QuantizationInfo info = info_of(format);
  info.act_bits = 8;
  (void)train::export_quantized(model, dir / "q", info);
  ml::Model loaded = ml::load_model(dir / "q");
  CHECK(loaded.options().activation_bits == 8);
  const std::vector<float> w4a8 = logits_of(loaded);
  CHECK(w4a8 != logits_of(model));  // the inputs of every base are now rounded to 8 bits per token
  CHECK(test::rel_error(w4a8, logits_of(model)) < 5e-2);
}

TEST_CASE("quantized model directory: config.json carries the HF config and quantization_config") {
  const quant::QuantConfig format = quant::QuantConfig::parse("int4-g16-sym");
  ml::Model model = quantized_tiny(format);
  test::TempDir dir;
  io::QuantizationInfo info = info_of(format);
  info.method = "gptq";
  info.magr = true;
  info.method_options = {{"damp", 0.01}};
  (void)train::export_quantized(model, dir / "q", info, {DType::f16, {}});
  const auto j = nlohmann::json::parse(test::read_raw(dir / "q" / "config.json"));
  CHECK(j["model_type"] == "llama");
  CHECK(j["hidden_size"] == 16);
  CHECK(j["torch_dtype"] == "float16");
  const auto& q = j["quantization_config"];
  CHECK(q["quant_method"] == "qlora");
  CHECK(q["format"] == "int4-g16-sym");
  CHECK(q["method"] == "gptq");
  CHECK(q["bits"] == 4);
  CHECK(q["group_size"] == 16);
  CHECK(q["sym"] == true);
  CHECK(q["act_bits"] == 0);
  CHECK(q["magr"] == true);
  CHECK(q["calibration"].is_null());
  CHECK(q["method_options"]["damp"] == 0.01);
  CHECK(q["qlora_version"] == "test");

  // f16 dense tensors: the loaded embedding is the f16 rounding of the original.
  ml::Model loaded = ml::load_model(dir / "q");
  const Tensor e16 = model.embedding().to(DType::f16).to(DType::f32);
  CHECK(bytes_of<float>(loaded.embedding()) == bytes_of<float>(e16));
  const io::SafetensorsFile st(dir / "q" / "model.safetensors");
  CHECK(st.entry("model.embed_tokens.weight").dtype_name == "F16");
  CHECK(st.entry("model.layers.0.self_attn.q_proj.qweight").dtype_name == "U8");
  CHECK(st.entry("model.layers.0.self_attn.q_proj.scales").dtype_name == "F16");
  CHECK_FALSE(st.contains("model.layers.0.self_attn.q_proj.zeros"));
}

TEST_CASE("quantized model directory: --quant must match, adapters attach on top") {
  const quant::QuantConfig format = quant::QuantConfig::parse("int4-g16");
  ml::Model model = quantized_tiny(format);
  test::TempDir dir;
  (void)train::export_quantized(model, dir / "q", info_of(format));

  ml::LoadOptions same;
  same.quant = format;
  ml::Model a = ml::load_model(dir / "q", same);
  CHECK(logits_of(a) == logits_of(model));

  ml::LoadOptions other;
  other.quant = quant::QuantConfig::parse("nf4");
  const std::string e = test::error_of([&] { (void)ml::load_model(dir / "q", other); });
  CHECK(e.find((dir / "q").string()) != std::string::npos);
  CHECK(e.find("already quantized as int4-g16") != std::string::npos);

  ml::LoadOptions lora;
  lora.adapter.kind = nn::AdapterKind::lora;
  lora.adapter.rank = 2;
  lora.adapter.alpha = 4;
  ml::Model adapted = ml::load_model(dir / "q", lora);
  CHECK(adapted.trainable_parameter_count() > 0);
  CHECK(adapted.block(0).linear(ml::DecoderBlock::q_proj).quantized_weight() != nullptr);
  CHECK(logits_of(adapted) == logits_of(model));  // B starts at zero
  // A model with an adapter is not written as a base-only directory.
  CHECK(test::error_of([&] { (void)train::export_quantized(adapted, dir / "q2", info_of(format)); }).find("adapter") !=
        std::string::npos);
  CHECK_FALSE(fs::exists(dir / "q2"));
}

TEST_CASE("quantized model directory: a dense or mismatched model is not written") {
  test::TempDir dir;
  ml::Model dense = ml::random_model(test::tiny_llama_config(), ml::LoadOptions{}, 21, 0.3f);
  const quant::QuantConfig format = quant::QuantConfig::parse("int4-g16");
  std::string e = test::error_of([&] { (void)train::export_quantized(dense, dir / "q", info_of(format)); });
  CHECK(e.find("model.layers.0.self_attn.q_proj has a dense base") != std::string::npos);
  ml::Model q = quantized_tiny(format);
  e = test::error_of([&] { (void)train::export_quantized(q, dir / "q", info_of(quant::QuantConfig::parse("int4-g32"))); });
  CHECK(e.find("is int4-g16, but the model is described as int4-g32") != std::string::npos);
  CHECK_FALSE(fs::exists(dir / "q"));
}

TEST_CASE("quantized model directory: damaged files name the file and the tensor") {
  const quant::QuantConfig format = quant::QuantConfig::parse("int4-g16");
  ml::Model model = quantized_tiny(format);
  test::TempDir dir;
  const fs::path good = dir / "good";
  (void)train::export_quantized(model, good, info_of(format));
  const auto copy = [&](const std::string& name) {
    const fs::path p = dir / name;
    fs::copy(good, p, fs::copy_options::recursive);
    return p;
  };

  const fs::path truncated = copy("truncated");
  const std::string bytes = test::read_raw(truncated / "model.safetensors");
  test::write_raw(truncated / "model.safetensors", bytes.substr(0, bytes.size() / 2));
  std::string e = test::error_of([&] { (void)ml::load_model(truncated); });
  CHECK(e.find("model.safetensors") != std::string::npos);

  const fs::path missing = copy("missing");
  rewrite(missing, [](auto& t) {
    std::erase_if(t, [](const auto& p) { return p.first == "model.layers.1.mlp.up_proj.zeros"; });
  });
  e = test::error_of([&] { (void)ml::load_model(missing); });
  CHECK(e.find("model.safetensors") != std::string::npos);
  CHECK(e.find("tensor model.layers.1.mlp.up_proj.zeros is missing") != std::string::npos);

  const fs::path misshapen = copy("misshapen");
  rewrite(misshapen, [](auto& t) {
    for (auto& [name, tensor] : t)
      if (name == "model.layers.0.self_attn.k_proj.scales") tensor = Tensor::zeros(Shape{8, 2}, DType::f16);
  });
  e = test::error_of([&] { (void)ml::load_model(misshapen); });
  CHECK(e.find("model.layers.0.self_attn.k_proj") != std::string::npos);
  CHECK(e.find("'scales' has shape") != std::string::npos);

  const fs::path foreign = copy("foreign");
  auto j = nlohmann::json::parse(test::read_raw(foreign / "config.json"));
  j["quantization_config"] = {{"quant_method", "gptq"}, {"bits", 4}};
  test::write_raw(foreign / "config.json", j.dump());
  e = test::error_of([&] { (void)ml::load_model(foreign); });
  CHECK(e.find("config.json") != std::string::npos);
  CHECK(e.find("\"gptq\" is not supported") != std::string::npos);

  const fs::path bad_format = copy("bad_format");
  j = nlohmann::json::parse(test::read_raw(bad_format / "config.json"));
  j["quantization_config"]["format"] = "int5-g16";
  test::write_raw(bad_format / "config.json", j.dump());
  e = test::error_of([&] { (void)ml::load_model(bad_format); });
  CHECK(e.find("quantization_config") != std::string::npos);
  CHECK(e.find("int5-g16") != std::string::npos);
}
