// qlora export MODEL [--tokenizer F] [--adapter DIR] [--quant FMT] --to peft|hf|gguf-f16|gguf-q8_0|gguf-q4_1|gptq
//              [--gptq-format gptq|gptq_v2] --out PATH
// The model (with the adapter `qlora train` wrote, on the base format it was trained on) as a PEFT adapter,
// a merged Hugging Face checkpoint, a merged llama.cpp GGUF file or a GPTQ checkpoint. Formats:
// include/qlora/train/export.hpp, export_gptq.hpp, docs/export.md. PATH must not exist; it appears only
// when complete.

#include <fmt/core.h>

#include <memory>
#include <string>

#include "commands.hpp"
#include "model_options.hpp"
#include "qlora/io/quantized_model.hpp"
#include "qlora/train/export.hpp"
#include "qlora/train/export_gptq.hpp"

namespace qlora::tool {
namespace {

struct ExportFlags {
  std::string model, adapter, tokenizer, to, out, dtype = "bf16", quant, gptq_format = "gptq";
};

// --to gptq. A quantized directory (qlora quantize) is written from its stored codes; a dense model is
// RTN-quantized into --quant on load; a model with an adapter is loaded on the adapter's own base, merged
// (W + dW, dense) and RTN-quantized into --quant, which it then needs.
void export_gptq(const ExportFlags& f) {
  namespace fs = std::filesystem;
  train::GptqExportOptions options;
  options.checkpoint_format = train::parse_gptq_checkpoint_format(f.gptq_format);
  const bool hf_source = model_format(f.model) == ModelFormat::hf;
  if (hf_source) options.tokenizer_source = f.model;
  models::llama::Model model = [&] {
    if (f.adapter.empty()) return load_with_adapter(f.model, "", models::llama::LoadOptions{}, f.quant);
    if (f.quant.empty() || f.quant == "none")
      throw Error("--to gptq with --adapter needs --quant intB-gG[-sym]: GPTQ stores integer zero points, so the merged "
                  "weights are RTN-quantized into that format");
    options.requantize = quant::QuantConfig::parse(f.quant);
    return load_with_adapter(f.model, f.adapter, models::llama::LoadOptions{}, "");
  }();
  if (hf_source && fs::exists(fs::path(f.model) / "config.json"))
    if (const auto info = io::read_quantization_info(fs::path(f.model) / "config.json"))
      options.damp_percent = info->method_options.value("damp", options.damp_percent);
  const auto result = train::export_gptq(model, f.out, options);
  if (result.tokenizer_files.empty())
    fmt::print(stderr, "note: {} has no Hugging Face tokenizer files; the export has none (copy them by hand)\n", f.model);
  fmt::print("gptq: {} ({} bits, group_size {}, {}, checkpoint_format {})\n", result.format.name(), result.format.bits,
             result.format.group == 0 ? -1 : result.format.group,
             result.format.scheme == quant::Scheme::int_sym ? "sym" : "asym", f.gptq_format);
}

void run_export(const ExportFlags& f) {
  namespace fs = std::filesystem;
  static const char* kTargets[] = {"peft", "hf", "gguf-f16", "gguf-q8_0", "gguf-q4_1", "gptq"};
  if (std::find(std::begin(kTargets), std::end(kTargets), f.to) == std::end(kTargets))
    throw Error("--to '" + f.to + "' is not supported (peft, hf, gguf-f16, gguf-q8_0, gguf-q4_1 or gptq)");
  if (fs::exists(f.out)) throw Error("--out " + f.out + " already exists (export never overwrites)");
  if (!f.adapter.empty() && !fs::is_directory(f.adapter))
    throw Error("--adapter " + f.adapter + ": no such directory");
  if (f.dtype != "bf16" && f.dtype != "f32") throw Error("--dtype must be bf16 or f32, got '" + f.dtype + "'");
  if (f.to != "gptq" && f.gptq_format != "gptq") throw Error("--gptq-format applies to --to gptq only");
  require_model_path(f.model);
  if (f.to == "gptq") {
    export_gptq(f);
    fmt::print("exported {} to {} ({})\n", f.model, f.out, f.to);
    return;
  }
  models::llama::Model model = load_with_adapter(f.model, f.adapter, models::llama::LoadOptions{}, f.quant);

  if (f.to == "peft") {
    std::string base = f.model;
    if (!f.adapter.empty()) {
      const auto description = train::read_adapter_description(f.adapter);
      if (!description.base_model.empty()) base = description.base_model;
    }
    train::export_peft(model, f.out, {base});
  } else if (f.to == "hf") {
    const bool hf_source = model_format(f.model) == ModelFormat::hf;
    const auto copied = train::export_hf(model, f.out, f.dtype == "f32" ? DType::f32 : DType::bf16,
                                         hf_source ? fs::path(f.model) : fs::path());
    if (copied.empty())
      fmt::print(stderr, "note: {} has no Hugging Face tokenizer files; the export has none (copy them by hand)\n", f.model);
  } else {
    const io::GgmlType type = f.to == "gguf-f16" ? io::GgmlType::F16 : f.to == "gguf-q8_0" ? io::GgmlType::Q8_0 : io::GgmlType::Q4_1;
    const auto tokenizer = tokenizer_path(f.model, f.tokenizer);
    const auto vocabulary = tokenizer ? train::gguf_vocabulary_of(*tokenizer) : std::nullopt;
    if (!vocabulary)
      fmt::print(stderr, "warning: no llama2.c or GGUF vocabulary for {} (Hugging Face tokenizers are not converted); the "
                 "GGUF file has no tokenizer.ggml.* and llama.cpp needs one to run it (pass --tokenizer)\n", f.model);
    const train::GgufExportSummary summary =
        train::export_gguf(model, f.out, type, vocabulary, fs::path(f.model).stem().string());
    if (type == io::GgmlType::Q4_1)
      fmt::print("q4_1: {} block linears exact from their INT codes (a mergeable adapter folded into m), {} matrices re-quantized, "
                 "{} in F16 (rows not a multiple of 32)\n", summary.exact_q4_1, summary.requantized, summary.f16_fallback);
  }
  fmt::print("exported {} to {} ({})\n", f.model, f.out, f.to);
}

}  // namespace

void register_export(CLI::App& app) {
  auto f = std::make_shared<ExportFlags>();
  CLI::App* cmd = app.add_subcommand("export", "Export to PEFT, merged Hugging Face safetensors, merged GGUF or GPTQ");
  cmd->add_option("MODEL", f->model, "Hugging Face directory, .gguf file or llama2.c .bin")->required();
  cmd->add_option("--adapter", f->adapter, "Adapter directory written by qlora train (OUT/adapter)");
  cmd->add_option("--tokenizer", f->tokenizer, "Tokenizer file (llama2.c: its tokenizer.bin)");
  cmd->add_option("--to", f->to, "peft, hf, gguf-f16, gguf-q8_0, gguf-q4_1 or gptq")->required();
  cmd->add_option("--out", f->out, "Output directory (peft, hf) or .gguf file; must not exist")->required();
  cmd->add_option("--dtype", f->dtype, "hf: bf16 (default) or f32");
  cmd->add_option("--quant", f->quant,
                  "Base format to load (default: the adapter's, else none); gptq with --adapter: the format the merged "
                  "weights are RTN-quantized into");
  cmd->add_option("--gptq-format", f->gptq_format, "gptq: checkpoint_format gptq (v1, default) or gptq_v2");
  cmd->callback([f] { run_export(*f); });
}

}  // namespace qlora::tool
