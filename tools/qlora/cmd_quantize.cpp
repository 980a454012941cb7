// qlora quantize MODEL --method rtn|nf4|gptq|comq|awq|aqas [--magr [--magr-beta B]] [--bits B] [--group G] [--sym]
//                      [--format NAME] [--act-bits 8] [--calib FILE] [--calib-samples N] [--calib-seq-len L]
//                      [--seed S] [--damp D] [--act-order] [--device cpu|cuda] --out DIR
// Post-training quantization of every block linear into a quantized model directory that eval, generate,
// train and export load directly (docs/ptq.md). Calibrated methods sample GPTQ-style windows of --calib and
// quantize block by block (models/llama/calibration.hpp); the methods are the table of ptq_methods.hpp.
// DIR must not exist; it appears only when complete.
// Under mpirun every rank runs this with the same flags: the calibration forwards are sharded by window and
// the layer solves dealt over the ranks (docs/distributed.md, "Distributed calibration"); rank 0 alone
// prints and writes DIR, which equals one process's (codes identical, scales to f32 rounding).

#include <fmt/core.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "commands.hpp"
#include "model_options.hpp"
#include "ptq_methods.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/make_communicator.hpp"
#include "qlora/train/export_quantized.hpp"

namespace qlora::tool {
namespace {

struct QuantizeFlags {
  std::string model, method, format, calib, tokenizer, out, device = "cpu", dense_dtype = "f32";
  int bits = 4, group = 128, act_bits = 0;
  bool group_given = false, sym = false, magr = false, act_order = false, no_true_sequential = false, json = false;
  std::int64_t calib_samples = 128, calib_seq_len = 2048;
  std::uint64_t seed = 0;
  double damp = 0.01, magr_beta = 0;  // 0: MagR's default beta for the format
};

// --format wins; otherwise the method's format family with --bits / --group / --sym.
quant::QuantConfig format_of(const QuantizeFlags& f, const PtqMethod& method) {
  if (!f.format.empty()) return quant::QuantConfig::parse(f.format);
  if (method.nf4_only) {
    if (f.bits != 4) throw Error("--method nf4 has 4 bits, not " + std::to_string(f.bits));
    if (f.sym) throw Error("--sym applies to int formats, not nf4");
    return quant::QuantConfig::parse("nf4-g" + std::to_string(f.group_given ? f.group : 64));
  }
  return quant::QuantConfig::parse("int" + std::to_string(f.bits) + "-g" + std::to_string(f.group) + (f.sym ? "-sym" : ""));
}

std::uintmax_t directory_bytes(const std::filesystem::path& dir) {
  std::uintmax_t n = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir))
    if (e.is_regular_file()) n += e.file_size();
  return n;
}

void run_quantize(const QuantizeFlags& f) {
  namespace fs = std::filesystem;
  namespace ml = models::llama;
  // The host communicator even for --device cuda: the ranks exchange Grams and quantized layers on the host.
  const std::unique_ptr<dist::Communicator> comm = dist::make_communicator(Device::cpu());
  const bool root = comm->is_root();
  const auto t0 = std::chrono::steady_clock::now();
  // ---- every rank checks the flags and loads the model; a failure on any rank stops them all ----
  const PtqMethod* method = nullptr;
  std::optional<PtqSettings> settings;
  bool calibrated = false;
  std::optional<ml::Model> loaded;
  std::unique_ptr<io::Tokenizer> tokenizer;
  std::optional<ml::CalibrationSet> calib;
  dist::fail_together(*comm, [&] {
    method = &find_ptq_method(f.method);
    if (!method->make_quantizer) throw Error("method " + method->name + " is not available in this build");
    settings.emplace(PtqSettings{format_of(f, *method), f.damp, f.act_order, f.act_bits, rank_device(f.device)});
    calibrated = method->calibrated || f.magr;  // MagR needs each layer's H
    if (f.magr_beta != 0 && !f.magr) throw Error("--magr-beta needs --magr");
    if (f.magr) settings->grid_shrink = magr_grid_shrink(*method, settings->format, f.magr_beta);
    if (method->nf4_only && settings->format.scheme != quant::Scheme::nf4)
      throw Error("--method nf4 stores NF4; --format " + settings->format.name() + " is not (use --method rtn)");
    if (f.act_bits != 0 && f.act_bits != 8) throw Error("--act-bits must be 0 or 8, got " + std::to_string(f.act_bits));
    if (f.damp <= 0 || !(f.damp < 1)) throw Error("--damp must be in (0, 1), got " + std::to_string(f.damp));
    if (f.dense_dtype != "f32" && f.dense_dtype != "f16") throw Error("--dense-dtype must be f32 or f16, got '" + f.dense_dtype + "'");
    if (calibrated && f.calib.empty())
      throw Error("method " + method->name + (f.magr ? " with --magr" : "") + " needs calibration text: pass --calib FILE (plain text or JSONL of "
                  "{\"text\"}; e.g. WikiText-2's wiki.train.raw, which is not bundled)");
    if (!f.calib.empty() && !fs::exists(f.calib)) throw Error("cannot open --calib " + f.calib + ": no such file or directory");
    if (fs::exists(f.out)) throw Error("--out " + f.out + " already exists (quantize never overwrites)");
    require_model_path(f.model);

    ml::LoadOptions load;
    load.device = settings->device;
    load.dtype = DType::f32;  // the weights the quantizer sees are the file's, not a bf16 rounding of them
    const auto files = io::open_model_files(f.model);
    if (files->quantization())
      throw Error(f.model + " is already quantized (" + files->quantization()->format.name() +
                  "); quantize the original model");
    loaded.emplace(ml::build_model(*files, load));
    if (calibrated) {
      // The same seeded windows on every rank; quantize_model_sequential deals them.
      tokenizer = open_tokenizer(f.model, f.tokenizer);
      const ml::CalibrationSampling sampling{f.calib_samples, f.calib_seq_len, f.seed};
      calib = ml::calibration_windows(*tokenizer, f.calib, sampling, loaded->config().max_position_embeddings);
    }
  });
  ml::Model& model = *loaded;

  ml::LayerQuantizer quantizer = method->make_quantizer(*settings);
  if (f.magr) quantizer = with_magr(std::move(quantizer), *settings);
  const auto progress = [&](const std::string& line) {
    if (root && !f.json) fmt::print(stderr, "{}\n", line);
  };
  io::QuantizationInfo info;
  info.format = settings->format;
  info.method = method->name;
  info.act_bits = f.act_bits != 0 ? f.act_bits : (method->name == "aqas" ? 8 : 0);  // AQAS targets W4A8
  info.magr = f.magr;
  info.tool_version = kToolVersion;
  ml::QuantizationSummary summary;
  if (calibrated) {
    info.method_options = {{"damp", f.damp}, {"act_order", f.act_order}, {"true_sequential", !f.no_true_sequential}};
    if (f.magr) info.method_options["magr_beta"] = settings->grid_shrink;
    if (root)
      for (const std::string& w : calib->warnings) fmt::print(stderr, "warning: {}\n", w);
    if (root && comm->size() > 1 && !f.json)
      fmt::print(stderr, "calibrating on {} processes over {}: {} windows dealt round robin\n", comm->size(),
                 comm->backend(), calib->windows.size());
    info.calibration = io::CalibrationRecord{f.calib, f.calib_samples, calib->seq_len, f.seed};
    ml::CalibrationOptions options;
    options.true_sequential = !f.no_true_sequential;
    const ml::BlockTransform transform =
        method->make_block_transform ? method->make_block_transform(*settings) : ml::BlockTransform{};
    summary = ml::quantize_model_sequential(model, calib->windows, quantizer, options, transform, progress, *comm);
  } else {
    if (!f.calib.empty() && root) fmt::print(stderr, "note: method {} uses no calibration; --calib is ignored\n", method->name);
    // Round to nearest needs no data: rank 0 alone quantizes (the others only wait for the write below).
    dist::fail_together(*comm, [&] {
      if (root) summary = ml::quantize_model_weights(model, quantizer, progress);
    });
  }

  // ---- rank 0 writes DIR; the collective makes the others wait for it and share its failure ----
  std::uintmax_t bytes = 0;
  double bits = 0, weights = 0;
  dist::fail_together(*comm, [&] {
    if (!root) return;
    train::QuantizedExportOptions out;
    out.dense_dtype = f.dense_dtype == "f16" ? DType::f16 : DType::f32;
    if (model_format(f.model) == ModelFormat::hf) out.tokenizer_source = f.model;
    else if (const auto t = tokenizer_path(f.model, f.tokenizer); t && model_format(f.model) != ModelFormat::gguf) out.tokenizer_source = *t;
    const auto copied = train::export_quantized(model, f.out, info, out);
    if (copied.empty()) fmt::print(stderr, "note: no tokenizer was copied into {} (pass --tokenizer to eval and generate)\n", f.out);
    bytes = directory_bytes(f.out);
    for (std::int64_t i = 0; i < model.num_layers(); ++i)
      for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
        const nn::Linear& l = model.block(i).linear(ml::DecoderBlock::Proj(p));
        bits += 8.0 * double(l.base_bytes());
        weights += double(l.in_features()) * double(l.out_features());
      }
  });
  if (!root) return;
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const nlohmann::ordered_json result = {{"model", f.model},        {"out", f.out},
                                         {"method", method->name},  {"format", settings->format.name()},
                                         {"layers", summary.layers}, {"bits_per_weight", bits / weights},
                                         {"calibration_tokens", summary.calibration_rows},
                                         {"seconds", seconds},       {"bytes", bytes},
                                         {"world_size", comm->size()}};
  if (f.json) {
    fmt::print("{}\n", result.dump());
  } else {
    fmt::print("quantized {} with {} ({}): {} layers, {:.3f} bits per weight, {:.1f} s, {} ({} bytes)\n", f.model,
               method->name, settings->format.name(), summary.layers, bits / weights, seconds, f.out, bytes);
  }
}

}  // namespace

void register_quantize(CLI::App& app) {
  auto f = std::make_shared<QuantizeFlags>();
  std::string methods;
  for (const PtqMethod& m : ptq_methods())
    methods += "\n  " + m.name + ": " + m.summary + (m.make_quantizer ? "" : " [not available in this build]");
  CLI::App* cmd = app.add_subcommand("quantize", "Post-training quantization into a quantized model directory");
  cmd->add_option("MODEL", f->model, "Hugging Face directory, .gguf file or llama2.c .bin")->required();
  cmd->add_option("--method", f->method, "Quantization method:" + methods)->required();
  cmd->add_option("--bits", f->bits, "Bits per weight of the int formats (2, 3, 4, 8)")->capture_default_str();
  cmd->add_option_function<int>("--group", [f](int g) { f->group = g, f->group_given = true; },
                                "Group size (0 = one group per row); default 128 (nf4: 64)");
  cmd->add_flag("--sym", f->sym, "Symmetric int grid");
  cmd->add_option("--format", f->format, "Stored format, overriding --bits/--group/--sym (e.g. int4-g128, dint4-g128, "
                                         "int4-g128-fz, nf4)");
  cmd->add_flag("--magr", f->magr, "MagR preprocessing before the quantizer");
  cmd->add_option("--magr-beta", f->magr_beta,
                  "MagR's grid shrink for rtn and gptq, in (0, 1]; default by format: 1.0 / 0.9 / 0.8 at 4 / 3 / 2 "
                  "bits, 0.95 at group 128, 1.0 at group 64");
  cmd->add_option("--act-bits", f->act_bits, "Activation bits recorded for W4A8 (0 or 8)")->capture_default_str();
  cmd->add_option("--calib", f->calib, "Calibration text (plain text, or JSONL of {\"text\"}) for calibrated methods");
  cmd->add_option("--calib-samples", f->calib_samples, "Calibration windows")->capture_default_str();
  cmd->add_option("--calib-seq-len", f->calib_seq_len, "Tokens per calibration window (SLAC: match the task)")
      ->capture_default_str();
  cmd->add_option("--seed", f->seed, "Seed of the calibration windows")->capture_default_str();
  cmd->add_option("--damp", f->damp, "GPTQ dampening (fraction of mean diag H)")->capture_default_str();
  cmd->add_flag("--act-order", f->act_order, "GPTQ: quantize columns by decreasing diag H");
  cmd->add_flag("--no-true-sequential", f->no_true_sequential, "Calibrate all seven linears of a block from one pass");
  cmd->add_option("--tokenizer", f->tokenizer, "Tokenizer file (llama2.c: its tokenizer.bin)");
  cmd->add_option("--dense-dtype", f->dense_dtype, "Embedding, norms and LM head: f32 or f16")->capture_default_str();
  cmd->add_option("--device", f->device, "cpu or cuda[:N] (calibration forwards)")->capture_default_str();
  cmd->add_option("--out", f->out, "Output directory; must not exist")->required();
  cmd->add_flag("--json", f->json, "One JSON object on stdout");
  cmd->callback([f] { run_quantize(*f); });
}

}  // namespace qlora::tool
