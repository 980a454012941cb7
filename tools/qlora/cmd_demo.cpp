// qlora demo: the whole story on an embedded default, with no download and no data files.
//  1. Generate a task: arithmetic stories in a 40-character alphabet (train/synthetic_task.hpp).
//  2. Pretrain a tiny Llama (3 blocks, width 64) on it with this project's own trainer: every linear layer
//     gets a full-matrix adapter (hira with p = k = 1, i.e. a dense dW), trained, then merged into the
//     weights; the embeddings stay at their seeded random values. The result is written as a Hugging Face
//     directory (config.json + model.safetensors) and read back from there.
//  3. Evaluate it: perplexity on held-out stories (never trained on).
//  4. Quantize the base to 2 bits (int2-g32) and to NF4, and show the damage.
//  5. Fine-tune Q-BLoRA adapters on the 2-bit base and show the recovery.
//  6. Export the adapted model, merged, to GGUF (Q8_0) and evaluate the file it wrote.
//  7. Print a before/after table and write summary.json.
// A few minutes on 2 CPU cores; on a GPU when there is one (--device).

#include <fmt/core.h>

#include <omp.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>

#include "commands.hpp"
#include "model_options.hpp"
#include "models/llama/load.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/train/evaluation.hpp"
#include "qlora/train/export.hpp"
#include "qlora/train/synthetic_task.hpp"
#include "qlora/train/text_data.hpp"
#include "qlora/train/trainer.hpp"
#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/runtime.hpp"
#endif

namespace qlora::tool {
namespace {

namespace ml = models::llama;
namespace fs = std::filesystem;

struct DemoFlags {
  std::string out = "qlora-demo", device = "auto";
  std::int64_t pretrain_steps = 600, finetune_steps = 200;
  std::uint64_t seed = 1;
};

constexpr std::uint64_t kHeldOut = 1'000'000;  // story indices from here on are never trained on

io::LlamaConfig demo_config(std::int32_t vocab) {
  io::LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 176;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = vocab;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = true;
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

struct Scores {
  double ppl = 0, bits = 32;
};

Scores evaluate(ml::Model& model, const io::Tokenizer& tok, const DemoFlags& f, double bits) {
  Scores s;
  s.bits = bits;
  const auto ids = tok.encode(train::arithmetic_corpus(f.seed, kHeldOut, 400), true);
  s.ppl = train::perplexity(ids, 128, [&](const train::Batch& b) {
            const auto r = model.evaluate_loss(b.tokens.to(model.device()), b.targets.to(model.device()));
            return train::NllSum{r.loss_sum, r.valid_tokens};
          }, 8).ppl;
  return s;
}

train::TrainSummary train_adapters(ml::Model& model, const io::Tokenizer& tok, const DemoFlags& f, std::int64_t steps,
                                   double lr, const fs::path& out, const std::string& what) {
  const auto ids = tok.encode(train::arithmetic_corpus(f.seed, 0, 40000), true);
  train::DataLoader loader(train::chunk_tokens(ids, 64), 16, f.seed, false, 0);
  train::TrainerConfig cfg;
  cfg.steps = steps;
  cfg.batch = 16;
  cfg.micro_batch = 16;
  cfg.lr = lr;
  cfg.schedule = "cosine";
  cfg.warmup_steps = steps / 10;
  cfg.max_grad_norm = 1.0;
  cfg.log_every = std::max<std::int64_t>(1, steps / 5);
  cfg.seed = f.seed;
  cfg.out = out;
  cfg.print = [what](const std::string& line) { fmt::print(stderr, "  [{}] {}\n", what, line); };
  fs::create_directories(out);
  train::Trainer<ml::Model> trainer(model, loader, nullptr, cfg);
  return trainer.run();
}

void run_demo(const DemoFlags& f) {
  const auto t0 = std::chrono::steady_clock::now();
  if (fs::exists(f.out) && !fs::is_empty(f.out))
    throw Error("--out " + f.out + " exists and is not empty (remove it or pick another directory)");
  Device device = Device::cpu();
  if (f.device == "auto") {
#if defined(QLORA_WITH_CUDA)
    if (cuda::device_count() > 0) device = Device::cuda(0);
#endif
  } else {
    device = parse_device(f.device);
  }
  // The demo's matrices are 64 wide: threads cost more to wake than they save (and a busy second core makes
  // every parallel region wait), so it runs on one unless OMP_NUM_THREADS says otherwise.
  if (device.is_cpu() && std::getenv("OMP_NUM_THREADS") == nullptr) omp_set_num_threads(1);
  const train::CharTokenizer tok;
  const io::LlamaConfig config = demo_config(tok.vocab_size());
  fmt::print("qlora demo on {}: a {}-block Llama of width {} learns arithmetic stories such as\n  {}", device.str(),
             config.num_hidden_layers, config.hidden_size, train::arithmetic_story(f.seed, 0).text);
  fs::create_directories(f.out);

  // ---- 1. pretrain: full-matrix adapters on every linear, merged into the weights ----
  std::map<std::string, Tensor> weights;
  std::uint64_t counter = 0;
  for (const auto& spec : io::llama_tensor_specs(config)) {
    const std::uint64_t seed = nn::mix_seed(f.seed, 2, counter++);
    if (spec.shape.rank() == 1) weights[spec.name] = ops::rand(spec.shape, seed, Device::cpu(), 0.9f, 1.1f);  // norms
    else if (spec.name == "model.embed_tokens.weight") weights[spec.name] = ops::randn(spec.shape, seed, Device::cpu(), 0.f, 0.5f);
    else weights[spec.name] = ops::randn(spec.shape, seed, Device::cpu(), 0.f, 0.02f);
  }
  ml::LoadOptions pre;
  pre.device = device;
  pre.adapter.kind = nn::AdapterKind::hira;
  pre.adapter.pool = 1;  // p = k = 1: the adapter is a dense dW, so this is full training of the linears
  pre.adapter.repeat = 1;
  pre.adapter.rank = 1;
  pre.adapter.alpha = 1.f;
  pre.seed = f.seed;
  fmt::print("\n1. pretraining ({} steps of 16 x 64 characters)...\n", f.pretrain_steps);
  {
    ml::Model model = ml::build_model(config, [&](const std::string& n) { return weights.at(n); }, pre);
    train_adapters(model, tok, f, f.pretrain_steps, 3e-3, fs::path(f.out) / "pretrain", "pretrain");
    for (std::int64_t i = 0; i < config.num_hidden_layers; ++i)
      for (int p = 0; p < ml::DecoderBlock::kProjCount; ++p) {
        nn::Linear& linear = model.block(i).linear(ml::DecoderBlock::Proj(p));
        weights[linear.name() + ".weight"] = linear.merged_weight(DType::f32);
      }
  }
  const fs::path model_dir = fs::path(f.out) / "model";
  {
    io::AtomicDirectory dir(model_dir);
    std::vector<std::pair<std::string, Tensor>> tensors(weights.begin(), weights.end());
    io::write_safetensors(dir.path() / "model.safetensors", tensors, {{"format", "pt"}});
    io::write_hf_config(dir.path() / "config.json", config);
    dir.commit();
  }
  fmt::print("   wrote {} (Hugging Face layout)\n", model_dir.string());

  // ---- 2-3. evaluate the model as written, then quantized ----
  ml::LoadOptions plain;
  plain.device = device;
  std::vector<std::pair<std::string, Scores>> rows;
  {
    ml::Model model = ml::load_model(model_dir, plain);
    rows.emplace_back("f32 base", evaluate(model, tok, f, 32));
  }
  for (const std::string fmt_name : {"nf4", "int2-g32"}) {
    ml::LoadOptions q = plain;
    q.quant = quant::QuantConfig::parse(fmt_name);
    ml::Model model = ml::load_model(model_dir, q);
    const double bits = quant::bits_per_weight(*q.quant, config.intermediate_size, config.hidden_size);
    rows.emplace_back(fmt_name + " base", evaluate(model, tok, f, bits));
  }

  // ---- 4. Q-BLoRA on the 2-bit base ----
  ml::LoadOptions qb = plain;
  qb.quant = quant::QuantConfig::parse("int2-g32");
  qb.adapter.kind = nn::AdapterKind::qblora;
  qb.adapter.rank = 8;
  qb.adapter.alpha = 16.f;
  qb.seed = f.seed;
  ml::Model tuned = ml::load_model(model_dir, qb);
  fmt::print("\n2. fine-tuning Q-BLoRA (r = 8, {} parameters) on the 2-bit base ({} steps)...\n",
             tuned.trainable_parameter_count(), f.finetune_steps);
  train_adapters(tuned, tok, f, f.finetune_steps, 3e-3, fs::path(f.out) / "qblora", "qblora");
  rows.emplace_back("int2-g32 + Q-BLoRA", evaluate(tuned, tok, f, rows.back().second.bits));
  train::save_adapter(fs::path(f.out) / "qblora" / "adapter",
                      train::AdapterDescription{qb.adapter, qb.targets, "int2-g32", model_dir.string()}, tuned.params());

  // ---- 5. export the adapted model (merged, Q8_0) to GGUF and evaluate what was written ----
  const fs::path gguf = fs::path(f.out) / "model-qblora-q8_0.gguf";
  train::export_gguf(tuned, gguf, io::GgmlType::Q8_0, std::nullopt, "qlora-demo");
  {
    ml::Model exported = ml::load_model(gguf, plain);
    rows.emplace_back("merged, GGUF Q8_0", evaluate(exported, tok, f, 8.5));
  }
  fmt::print("   wrote {}\n", gguf.string());

  // ---- 6. the table ----
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  fmt::print("\n| model | bits/weight | held-out perplexity |\n| --- | --- | --- |\n");
  nlohmann::json summary = {{"seconds", seconds}, {"device", device.str()}, {"rows", nlohmann::json::array()}};
  for (const auto& [name, s] : rows) {
    fmt::print("| {} | {:.2f} | {:.3f} |\n", name, s.bits, s.ppl);
    summary["rows"].push_back({{"model", name}, {"bits_per_weight", s.bits}, {"ppl", s.ppl}});
  }
  io::write_file_atomically(fs::path(f.out) / "summary.json", summary.dump(2) + "\n");
  fmt::print("\n{:.0f} s; model, adapters, metrics and loss curves in {}/\n", seconds, f.out);
}

}  // namespace

void register_demo(CLI::App& app) {
  auto f = std::make_shared<DemoFlags>();
  CLI::App* cmd = app.add_subcommand("demo", "Pretrain a tiny Llama, quantize it to 2 bits, recover with Q-BLoRA");
  cmd->add_option("--out", f->out, "Output directory (must not exist or be empty)");
  cmd->add_option("--device", f->device, "auto, cpu or cuda[:N]");
  cmd->add_option("--pretrain-steps", f->pretrain_steps, "Pretraining steps");
  cmd->add_option("--finetune-steps", f->finetune_steps, "Q-BLoRA steps");
  cmd->add_option("--seed", f->seed, "Seed of the task, the weights and the training");
  cmd->callback([f] { run_demo(*f); });
}

}  // namespace qlora::tool
