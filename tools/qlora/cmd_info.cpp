// qlora info MODEL [--tokenizer FILE] [--json]: what a model file holds, without loading its weights:
// the architecture (config), parameter count, the stored tensor dtypes, the tokenizer found, file sizes.

#include <fmt/core.h>

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "commands.hpp"
#include "model_paths.hpp"
#include "qlora/io/model_files.hpp"
#include "qlora/io/tokenizer_load.hpp"

namespace qlora::tool {
namespace {

struct InfoOptions {
  std::string model;
  std::string tokenizer;
  bool json = false;
};

std::uintmax_t bytes_on_disk(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(path)) return fs::file_size(path);
  std::uintmax_t n = 0;
  for (const auto& e : fs::directory_iterator(path))
    if (e.is_regular_file()) n += e.file_size();
  return n;
}

// Stored dtype name -> number of tensors, as the file holds them (before any conversion on load).
std::map<std::string, int> stored_dtypes(const io::ModelFiles& files) {
  std::map<std::string, int> count;
  if (const auto* hf = dynamic_cast<const io::HfModelFiles*>(&files)) {
    for (const std::string& name : files.names()) ++count[hf->checkpoint().entry(name).dtype_name];
  } else if (const auto* gguf = dynamic_cast<const io::GgufModelFiles*>(&files)) {
    for (const auto& t : gguf->gguf().file().tensors()) ++count[io::ggml_type_name(t.type)];
  } else {
    count["F32"] = int(files.names().size());  // llama2.c checkpoints are float32 throughout
  }
  return count;
}

void run_info(const InfoOptions& o) {
  namespace fs = std::filesystem;
  const fs::path path = o.model;
  const std::unique_ptr<io::ModelFiles> files = io::open_model_files(path);
  const io::LlamaConfig& c = files->config();
  std::int64_t parameters = 0;
  for (const auto& spec : io::llama_tensor_specs(c)) parameters += spec.shape.numel();

  nlohmann::ordered_json j;
  j["model"] = path.string();
  j["format"] = model_format_name(model_format(path));
  j["file_bytes"] = bytes_on_disk(path);
  j["config"] = c.to_json();
  j["parameters"] = parameters;
  nlohmann::ordered_json dtypes;
  for (const auto& [name, n] : stored_dtypes(*files)) dtypes[name] = n;
  j["tensor_dtypes"] = dtypes;
  nlohmann::ordered_json tok;
  if (const auto tpath = tokenizer_path(path, o.tokenizer)) {
    tok["path"] = tpath->string();
    try {
      const auto t = io::load_tokenizer(*tpath);
      tok["found"] = true;
      tok["vocab_size"] = t->vocab_size();
      tok["bos_id"] = t->bos_id();
      tok["eos_id"] = t->eos_id();
      if (t->vocab_size() != c.vocab_size)
        tok["warning"] = "the tokenizer has " + std::to_string(t->vocab_size()) + " tokens, the model " +
                         std::to_string(c.vocab_size);
    } catch (const Error& e) {
      tok["found"] = false;
      tok["error"] = e.what();
    }
  } else {
    tok["found"] = false;
    tok["error"] = model_format(path) == ModelFormat::llama2c ? "no tokenizer.bin beside the checkpoint (pass --tokenizer)"
                                                               : "no tokenizer.model or tokenizer.json in the directory";
  }
  j["tokenizer"] = tok;

  if (o.json) {
    fmt::print("{}\n", j.dump(2));
    return;
  }
  fmt::print("model       {} ({})\n", path.string(), j["format"].get<std::string>());
  fmt::print("file size   {:.2f} MB\n", double(j["file_bytes"].get<std::uintmax_t>()) / 1e6);
  fmt::print("parameters  {} ({:.2f} M)\n", parameters, double(parameters) / 1e6);
  fmt::print("layers      {}, hidden {}, intermediate {}, heads {} (kv {}), head_dim {}\n", c.num_hidden_layers,
             c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
  fmt::print("vocab       {}, max positions {}, rope_theta {}{}, rms_norm_eps {}\n", c.vocab_size,
             c.max_position_embeddings, c.rope_theta, c.rope_scaling ? " (scaled: " + c.rope_scaling->type + ")" : "",
             c.rms_norm_eps);
  fmt::print("lm head     {}\n", c.tie_word_embeddings ? "tied to the embedding" : "separate");
  std::string dt;
  for (const auto& [name, n] : stored_dtypes(*files)) dt += (dt.empty() ? "" : ", ") + name + " x" + std::to_string(n);
  fmt::print("tensors     {}\n", dt);
  if (tok["found"].get<bool>())
    fmt::print("tokenizer   {} (vocab {}, bos {}, eos {})\n", tok["path"].get<std::string>(), tok["vocab_size"].get<int>(),
               tok["bos_id"].get<int>(), tok["eos_id"].get<int>());
  else
    fmt::print("tokenizer   not found: {}\n", tok["error"].get<std::string>());
}

}  // namespace

void register_info(CLI::App& app) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* cmd = app.add_subcommand("info", "Describe a model: config, parameters, tensor dtypes, tokenizer, size");
  cmd->add_option("MODEL", o->model, "Hugging Face directory, .gguf file or llama2.c .bin")->required();
  cmd->add_option("--tokenizer", o->tokenizer, "Tokenizer file (llama2.c: its tokenizer.bin)");
  cmd->add_flag("--json", o->json, "Print JSON on stdout");
  cmd->callback([o] { run_info(*o); });
}

}  // namespace qlora::tool
