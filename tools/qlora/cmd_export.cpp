// qlora export MODEL [--tokenizer F] [--adapter DIR] --to peft|hf|gguf-f16|gguf-q8_0|gguf-q4_1 --out PATH
// The model (with the adapter `qlora train` wrote, on the base format it was trained on) as a PEFT adapter,
// a merged Hugging Face checkpoint or a merged llama.cpp GGUF file. Formats: include/qlora/train/export.hpp,
// docs/export.md. PATH must not exist; it appears only when complete.

#include <fmt/core.h>

#include <memory>
#include <string>

#include "commands.hpp"
#include "model_options.hpp"
#include "qlora/train/export.hpp"

namespace qlora::tool {
namespace {

struct ExportFlags {
  std::string model, adapter, tokenizer, to, out, dtype = "bf16", quant;
};

void run_export(const ExportFlags& f) {
  namespace fs = std::filesystem;
  static const char* kTargets[] = {"peft", "hf", "gguf-f16", "gguf-q8_0", "gguf-q4_1"};
  if (std::find(std::begin(kTargets), std::end(kTargets), f.to) == std::end(kTargets))
    throw Error("--to '" + f.to + "' is not supported (peft, hf, gguf-f16, gguf-q8_0 or gguf-q4_1; gptq is not implemented)");
  if (fs::exists(f.out)) throw Error("--out " + f.out + " already exists (export never overwrites)");
  if (!f.adapter.empty() && !fs::is_directory(f.adapter))
    throw Error("--adapter " + f.adapter + ": no such directory");
  if (f.dtype != "bf16" && f.dtype != "f32") throw Error("--dtype must be bf16 or f32, got '" + f.dtype + "'");
  require_model_path(f.model);
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
    if (!vocabulary) fmt::print(stderr, "note: no llama2.c or GGUF vocabulary for {}; the GGUF file has no tokenizer\n", f.model);
    train::export_gguf(model, f.out, type, vocabulary, fs::path(f.model).stem().string());
  }
  fmt::print("exported {} to {} ({})\n", f.model, f.out, f.to);
}

}  // namespace

void register_export(CLI::App& app) {
  auto f = std::make_shared<ExportFlags>();
  CLI::App* cmd = app.add_subcommand("export", "Export to PEFT, merged Hugging Face safetensors or merged GGUF");
  cmd->add_option("MODEL", f->model, "Hugging Face directory, .gguf file or llama2.c .bin")->required();
  cmd->add_option("--adapter", f->adapter, "Adapter directory written by qlora train (OUT/adapter)");
  cmd->add_option("--tokenizer", f->tokenizer, "Tokenizer file (llama2.c: its tokenizer.bin)");
  cmd->add_option("--to", f->to, "peft, hf, gguf-f16, gguf-q8_0 or gguf-q4_1")->required();
  cmd->add_option("--out", f->out, "Output directory (peft, hf) or .gguf file; must not exist")->required();
  cmd->add_option("--dtype", f->dtype, "hf: bf16 (default) or f32");
  cmd->add_option("--quant", f->quant, "Base format to load (default: the adapter's, else none)");
  cmd->callback([f] { run_export(*f); });
}

}  // namespace qlora::tool
