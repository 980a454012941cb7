// qlora generate MODEL [--tokenizer FILE] --prompt TEXT [--max-new N] [--temperature T] [--top-k K]
//                [--top-p P] [--seed S] [--device cpu|cuda] [--quant FMT]
// Loads the model (quantizing every block linear on load with --quant), encodes the prompt with BOS,
// prefills it through the KV cache and streams the continuation to stdout until EOS or --max-new tokens.

#include <fmt/core.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "commands.hpp"
#include "model_paths.hpp"
#include "models/llama/generate.hpp"
#include "models/llama/load.hpp"
#include "qlora/io/tokenizer_load.hpp"

namespace qlora::tool {
namespace {

struct GenerateFlags {
  std::string model, tokenizer, prompt, device = "cpu", quant = "none";
  std::int64_t max_new = 128;
  float temperature = 0.f, top_p = 1.f;
  int top_k = 0;
  std::uint64_t seed = 0;
  bool stats = false;
};

void run_generate(const GenerateFlags& f) {
  namespace ml = qlora::models::llama;
  const std::filesystem::path path = f.model;
  QLORA_CHECK(std::filesystem::exists(path), "cannot open model " + f.model + ": no such file or directory");
  const auto tpath = tokenizer_path(path, f.tokenizer);
  QLORA_CHECK(tpath.has_value(), "no tokenizer found for " + f.model +
                                     (model_format(path) == ModelFormat::llama2c ? " (pass --tokenizer tokenizer.bin)"
                                                                                 : " (pass --tokenizer)"));
  const auto tokenizer = io::load_tokenizer(*tpath);

  ml::LoadOptions load;
  QLORA_CHECK(f.device == "cpu" || f.device == "cuda" || f.device.starts_with("cuda:"),
              "--device must be cpu or cuda, got '" + f.device + "'");
  load.device = f.device == "cpu" ? Device::cpu() : Device::cuda(f.device == "cuda" ? 0 : std::stoi(f.device.substr(5)));
#if !defined(QLORA_WITH_CUDA)
  QLORA_CHECK(load.device.is_cpu(), "--device cuda: this qlora was built without CUDA");
#endif
  if (f.quant != "none") load.quant = quant::QuantConfig::parse(f.quant);
  const auto t0 = std::chrono::steady_clock::now();
  ml::Model model = ml::load_model(path, load);
  QLORA_CHECK(tokenizer->vocab_size() <= model.config().vocab_size,
              "the tokenizer " + tpath->string() + " has " + std::to_string(tokenizer->vocab_size()) +
                  " tokens, more than the model's vocabulary of " + std::to_string(model.config().vocab_size));

  const std::vector<std::int32_t> prompt = tokenizer->encode(f.prompt, tokenizer->bos_id() >= 0);
  ml::GenerateOptions g;
  g.max_new_tokens = f.max_new;
  g.sampling = {f.temperature, f.top_k, f.top_p, f.seed};
  for (std::int64_t id : model.config().eos_token_ids) g.eos_ids.push_back(std::int32_t(id));
  if (tokenizer->eos_id() >= 0) g.eos_ids.push_back(tokenizer->eos_id());
  QLORA_CHECK(std::int64_t(prompt.size()) + f.max_new <= model.config().max_position_embeddings,
              "prompt (" + std::to_string(prompt.size()) + " tokens) + --max-new " + std::to_string(f.max_new) +
                  " exceed the model's " + std::to_string(model.config().max_position_embeddings) + " positions");

  // Streaming: decode everything generated so far and print what is new (a token can complete a UTF-8
  // character or drop a leading space only in context). EOS is not printed.
  std::vector<std::int32_t> shown;
  std::string printed = f.prompt;
  fmt::print("{}", f.prompt);
  std::fflush(stdout);
  const auto t1 = std::chrono::steady_clock::now();
  g.on_token = [&](std::int32_t id) {
    if (std::find(g.eos_ids.begin(), g.eos_ids.end(), id) != g.eos_ids.end()) return;
    shown.push_back(id);
    std::vector<std::int32_t> all = prompt;
    all.insert(all.end(), shown.begin(), shown.end());
    const std::string text = tokenizer->decode(all);
    if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
      fmt::print("{}", text.substr(printed.size()));
      printed = text;
    } else if (printed.size() == f.prompt.size() && text.size() >= printed.size()) {
      printed = text;  // the decoded prompt differs from the typed one (normalisation): keep in step
    }
    std::fflush(stdout);
  };
  const ml::GenerateResult r = ml::generate(model, prompt, g);
  const auto t2 = std::chrono::steady_clock::now();
  fmt::print("\n");
  if (f.stats) {
    const double load_s = std::chrono::duration<double>(t1 - t0).count();
    const double gen_s = std::chrono::duration<double>(t2 - t1).count();
    fmt::print(stderr, "load {:.2f} s; {} prompt + {} new tokens in {:.3f} s ({:.1f} tokens/s){}\n", load_s,
               r.prompt_tokens, r.tokens.size(), gen_s, double(r.tokens.size()) / std::max(gen_s, 1e-9),
               r.stopped_at_eos ? ", stopped at EOS" : "");
  }
}

}  // namespace

void register_generate(CLI::App& app) {
  auto f = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand("generate", "Continue a prompt with a model (KV-cache decoding)");
  cmd->add_option("MODEL", f->model, "Hugging Face directory, .gguf file or llama2.c .bin")->required();
  cmd->add_option("--tokenizer", f->tokenizer, "Tokenizer file (llama2.c: its tokenizer.bin)");
  cmd->add_option("--prompt", f->prompt, "Text to continue")->required();
  cmd->add_option("--max-new", f->max_new, "Most new tokens")->check(CLI::NonNegativeNumber);
  cmd->add_option("--temperature", f->temperature, "0 = greedy")->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-k", f->top_k, "Sample among the K most likely tokens (0 = all)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", f->top_p, "Nucleus sampling threshold in (0, 1]");
  cmd->add_option("--seed", f->seed, "Seed of the sampler (Philox)");
  cmd->add_option("--device", f->device, "cpu or cuda[:N]");
  cmd->add_option("--quant", f->quant, "Quantize the block linears on load: nf4, int4-g64, ... or none");
  cmd->add_flag("--stats", f->stats, "Print timing to stderr");
  cmd->callback([f] { run_generate(*f); });
}

}  // namespace qlora::tool
