// qlora train MODEL --data FILE [--format alpaca|jsonl|text] --adapter lora|qblora|qalora|qablora|hira
//             --rank R --alpha A [--quant nf4|intB-gG|dint4-gG|none] --steps N --lr LR --batch B
//             --micro-batch M [--seq-len L] --out DIR [--resume DIR] [--device cpu|cuda] [--seed S]
//             [--rank-adaptive [--rank-budget P] [--rank-every N] ...] ...
// Loads the model, quantizes its block linears on the fly, attaches adapters and trains them
// (include/qlora/train/trainer.hpp). Everything that can be wrong with the input (model, tokenizer, data,
// flags) is checked before OUT is created, so a failed start leaves no output directory behind.
// OUT holds checkpoints/, metrics.jsonl, loss.svg, summary.json and, at the end, adapter/.
// Under mpirun every rank runs this with the same flags: data parallelism over dist::make_communicator's
// communicator (MPI for --device cpu, NCCL for --device cuda); --batch stays the global batch; rank 0 alone
// prints and writes OUT (docs/distributed.md).

#include <fmt/core.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>

#include "commands.hpp"
#include "model_options.hpp"
#include "qlora/core/cpu_allocator.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/make_communicator.hpp"
#include "models/llama/adapter_init.hpp"
#include "models/llama/distill.hpp"
#include "qlora/io/quantized_model.hpp"
#include "qlora/train/instruction_data.hpp"
#include "qlora/train/objective.hpp"
#include "qlora/train/rank_adaptive.hpp"
#include "qlora/train/text_data.hpp"
#include "qlora/train/trainer.hpp"

namespace qlora::tool {
namespace {

struct TrainFlags {
  // quant "": nf4, or the stored format of a directory written by `qlora quantize`.
  std::string model, data, format = "alpaca", adapter = "qblora", quant, init = "default", objective = "sft", teacher;
  std::string out, resume, device = "cpu", tokenizer, schedule = "constant", targets;
  int rank = 64;
  float alpha = 16.f, dropout = 0.f;
  int pool = 0, repeat = 0;
  std::int64_t steps = 100, batch = 16, micro_batch = 4, seq_len = 512, source_max_len = 384, target_max_len = 128;
  std::int64_t warmup = 0, save_every = 0, eval_every = 0, eval_count = 0, log_every = 1, loss_vocab_chunk = 0;
  double lr = 2e-4, weight_decay = 0.0, max_grad_norm = 0.3;
  std::uint64_t seed = 42;
  bool group_by_length = false, checkpointing = false, skip_nonfinite = false, train_on_source = false;
  bool rank_adaptive = false;  // RA-LoRA (train/rank_adaptive.hpp); rank_options' 0s are its automatic defaults
  train::RankAdaptiveOptions rank_options;
};

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, ',');)
    if (!part.empty()) parts.push_back(part);
  return parts;
}

std::vector<train::Example> load_examples(const TrainFlags& f, const io::Tokenizer& tokenizer, std::int64_t context) {
  std::vector<train::Example> examples;
  if (f.format == "text") {
    if (f.seq_len > context)
      throw Error("--seq-len " + std::to_string(f.seq_len) + " is longer than the model's context of " +
                  std::to_string(context) + " tokens");
    examples = train::text_windows(tokenizer, train::read_text_file(f.data), f.seq_len);
    if (examples.empty())
      throw Error(f.data + ": the text is shorter than one window of --seq-len " + std::to_string(f.seq_len) + " tokens");
  } else {
    const auto records = train::read_instruction_file(f.data, f.format);
    const train::InstructionTokenization opt{f.source_max_len, f.target_max_len, f.train_on_source};
    for (std::size_t i = 0; i < records.size(); ++i) {
      examples.push_back(train::tokenize_instruction(tokenizer, records[i], opt));
      if (std::int64_t(examples.back().size()) > context)
        throw Error(f.data + ": record " + std::to_string(i) + " has " + std::to_string(examples.back().size()) +
                    " tokens, longer than the model's context of " + std::to_string(context) +
                    " (lower --source-max-len / --target-max-len)");
    }
  }
  return examples;
}

// The format of a directory written by `qlora quantize`; nullopt for a full-precision model.
std::optional<std::string> stored_format(const std::string& model) {
  const std::filesystem::path config = std::filesystem::path(model) / "config.json";
  if (std::filesystem::is_directory(model) && std::filesystem::exists(config))
    if (const auto stored = io::read_quantization_info(config)) return stored->format.name();
  return std::nullopt;
}

// LoftQ / CLoQ (docs/adapter-init.md) before training (and again on resume: LoftQ's base is a function of the
// weights, the adapters then come from the checkpoint). CLoQ's Grams: the block linears' inputs over the first
// training examples (at most 64) through the quantized model, whose adapters still start at zero.
void initialize_adapters(models::llama::Model& model, const std::string& path, models::llama::AdapterInitMethod method,
                         const std::vector<train::Example>& examples) {
  namespace ml = models::llama;
  std::map<std::string, quant::GramAccumulator> grams;
  if (method == ml::AdapterInitMethod::cloq) {
    nn::Context ctx;
    ctx.training = false;
    ctx.observe_linear_input = [&](const std::string& layer, const Tensor& x) {
      auto it = grams.find(layer);
      if (it == grams.end()) it = grams.emplace(layer, quant::GramAccumulator(x.dim(1), x.device())).first;
      it->second.add(x);
    };
    const std::size_t n = std::min<std::size_t>(examples.size(), 64);
    for (std::size_t i = 0; i < n; ++i) {
      const auto& ids = examples[i].input_ids;
      const Tensor t = Tensor::from(ids, Shape{1, std::int64_t(ids.size())});
      std::vector<std::int32_t> none(ids.size(), train::kIgnoreLabel);
      (void)model.forward_loss_embedded(ctx, model.embed(t), Tensor::from(none, Shape{1, std::int64_t(ids.size())}));
    }
  }
  const auto files = io::open_model_files(path);
  const auto results = ml::init_adapters(model, *files, method, {}, ml::gram_lookup(grams));
  double before = 0, after = 0;
  for (const auto& r : results) {
    before += r.error_before;
    after += r.error_after;
  }
  fmt::print(stderr, "{} initialisation of {} layers: summed layer error {:.4g} -> {:.4g}\n", ml::adapter_init_method_name(method),
             results.size(), before, after);
}

void run_train(TrainFlags f) {
  namespace fs = std::filesystem;
  namespace ml = models::llama;
  ml::LoadOptions load;
  load.device = rank_device(f.device);
  const std::unique_ptr<dist::Communicator> comm = dist::make_communicator(load.device);
  const bool root = comm->is_root();
  // ---- check everything before touching OUT (every rank checks; a failure on any rank stops them all) ----
  const bool resuming = !f.resume.empty();
  std::unique_ptr<io::Tokenizer> tokenizer;
  std::optional<ml::Model> model;
  std::optional<train::DataLoader> loader;
  std::vector<train::Example> eval_set;
  std::optional<ml::Model> teacher;
  std::unique_ptr<train::Objective<ml::Model>> objective;
  std::optional<train::RankAdaptiveLora> rank_adaptive;
  dist::fail_together(*comm, [&] {
    const ml::AdapterInitMethod init = ml::parse_adapter_init_method(f.init);
    if (f.objective != "sft" && f.objective != "rilq" && f.objective != "ti")
      throw Error("--objective '" + f.objective + "' is not one of sft, rilq, ti");
    const std::optional<std::string> stored = stored_format(f.model);
    const bool stored_quant = stored.has_value();
    if (f.quant.empty()) f.quant = stored.value_or("nf4");  // QLoRA's NF4, or what the directory holds
    if (f.objective != "sft" && f.teacher.empty() && stored_quant)
      throw Error("--objective " + f.objective + " needs the full-precision teacher: " + f.model +
                  " is already quantized, so pass --teacher (the model it was quantized from)");
    if (f.format != "alpaca" && f.format != "jsonl" && f.format != "text")
      throw Error("--format must be alpaca, jsonl or text, got '" + f.format + "'");
    if (f.out.empty()) throw Error("--out DIR is required");
    if (resuming && fs::weakly_canonical(f.resume) != fs::weakly_canonical(f.out))
      throw Error("--resume " + f.resume + " must be the run's own --out directory (" + f.out + ")");
    if (!resuming && fs::exists(f.out) && !fs::is_empty(f.out))
      throw Error("--out " + f.out + " exists and is not empty (use --resume " + f.out + " to continue that run)");
    require_model_path(f.model);
    if (!fs::exists(f.data)) throw Error("cannot open data " + f.data + ": no such file or directory");

    load.quant = parse_quant(f.quant);
    load.adapter.kind = nn::parse_adapter_kind(f.adapter);
    if (load.adapter.kind == nn::AdapterKind::none) throw Error("--adapter none has nothing to train");
    load.adapter.rank = f.rank;
    load.adapter.alpha = f.alpha;
    load.adapter.dropout = f.dropout;
    load.adapter.pool = f.pool;
    load.adapter.repeat = f.repeat;
    if (!f.targets.empty()) load.targets = split_commas(f.targets);
    load.seed = f.seed;
    tokenizer = open_tokenizer(f.model, f.tokenizer);
    model.emplace(ml::load_model(f.model, load));
    model->checkpointing = f.checkpointing;
    model->loss_vocab_chunk = f.loss_vocab_chunk;
    auto examples = load_examples(f, *tokenizer, model->config().max_position_embeddings);
    if (init != ml::AdapterInitMethod::standard) {
      QLORA_CHECK(!stored_quant, "--init " + f.init + " needs the full-precision weights, and " + f.model +
                                     " is already quantized (train from the original model with --quant)");
      initialize_adapters(*model, f.model, init, examples);
    }
    if (f.eval_count > 0) std::tie(examples, eval_set) = train::split_holdout(std::move(examples), f.eval_count, f.seed);
    const std::int32_t pad = tokenizer->pad_id() >= 0 ? tokenizer->pad_id() : std::max(tokenizer->eos_id(), 0);
    loader.emplace(std::move(examples), f.micro_batch, f.seed, f.group_by_length, pad);
    if (f.objective != "sft")  // the full-precision teacher of RILQ / TI: MODEL itself unless --teacher
      teacher.emplace(ml::load_model(f.teacher.empty() ? f.model : f.teacher, ml::teacher_load_options(load)));
    objective = ml::make_objective(ml::ObjectiveOptions{f.objective, {}, {}}, teacher ? &*teacher : nullptr);
    if (f.rank_adaptive) {
      f.rank_options.seed = f.seed;
      rank_adaptive.emplace(block_linears(*model), f.rank_options, f.steps);
    }
  });

  train::TrainerConfig cfg;
  cfg.steps = f.steps;
  cfg.batch = f.batch;
  cfg.micro_batch = f.micro_batch;
  cfg.lr = f.lr;
  cfg.schedule = f.schedule;
  cfg.warmup_steps = f.warmup;
  cfg.weight_decay = f.weight_decay;
  cfg.max_grad_norm = f.max_grad_norm;
  cfg.save_every = f.save_every;
  cfg.eval_every = f.eval_every;
  cfg.log_every = std::max<std::int64_t>(1, f.log_every);
  cfg.skip_nonfinite = f.skip_nonfinite;
  cfg.seed = f.seed;
  cfg.out = f.out;
  const train::AdapterDescription description{load.adapter, load.targets, f.quant, f.model};
  cfg.run = {{"model", f.model},   {"data", f.data},     {"format", f.format}, {"adapter", description.to_json()},
             {"batch", f.batch},   {"micro_batch", f.micro_batch}, {"lr", f.lr}, {"schedule", f.schedule},
             {"seq_len", f.seq_len}, {"seed", f.seed},   {"steps", f.steps}};
  if (rank_adaptive) {  // recorded as given (its automatic defaults follow from the rest of the run)
    cfg.run["rank_adaptive"] = f.rank_options.to_json();
    cfg.reshaper = &*rank_adaptive;
  }
  cfg.peak_memory = [] { return CpuAllocator::instance().stats().peak_allocated_bytes; };
#if defined(QLORA_WITH_CUDA)
  if (!load.device.is_cpu())
    cfg.peak_memory = [d = load.device.index] { return cuda::memory_stats(d).peak_allocated_bytes; };
#endif
  // SFT trains the model itself (its per-block backward hook lets gradients be all-reduced as blocks finish);
  // RILQ and TI train it through their objective.
  const auto train_with = [&](auto& trainable) {
    using Trainable = std::remove_reference_t<decltype(trainable)>;
    std::optional<train::Trainer<Trainable>> trainer;
    dist::fail_together(*comm, [&] { trainer.emplace(trainable, *loader, &eval_set, cfg, *comm); });
    // ---- inputs are good: now OUT, written by rank 0 (the collective makes the others wait for it) ----
    dist::fail_together(*comm, [&] {
      if (root) fs::create_directories(f.out);
    });
    if (resuming) trainer->resume(f.out);
    if (root)
      fmt::print(stderr, "training {} adapters ({} parameters, objective {}) on a {} base of {} ({} examples, {} steps{})\n",
                 f.adapter, model->trainable_parameter_count(), f.objective, f.quant, f.model, loader->size(), f.steps,
                 comm->size() > 1 ? fmt::format(", {} processes over {}", comm->size(), comm->backend()) : "");
    if (root && rank_adaptive) {
      const auto& o = rank_adaptive->options();
      fmt::print(stderr, "rank-adaptive: budget {} parameters, ranks in [{}, {}], analysis at steps {}, {}+{}k .. {}\n",
                 o.budget, o.rule.min_rank, o.rule.max_rank, o.start, o.start, o.every, o.stop);
    }
    return trainer->run();
  };
  train::TrainSummary summary;
  if (f.objective == "sft") {
    summary = train_with(*model);
  } else {
    train::ObjectiveModel<ml::Model> trainable(*model, *objective, f.batch / f.micro_batch);
    summary = train_with(trainable);
  }

  dist::fail_together(*comm, [&] {
    if (!root) return;
    train::AdapterDescription trained = description;
    if (rank_adaptive) trained.rank_pattern = rank_adaptive->rank_pattern();
    train::save_adapter(fs::path(f.out) / "adapter", trained, model->params());
    // Loss curve from the whole metrics file (a resumed run's history included).
    std::vector<std::pair<double, double>> train_curve, eval_curve;
    std::ifstream metrics(fs::path(f.out) / "metrics.jsonl");
    for (std::string line; std::getline(metrics, line);) {
      const auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("loss")) train_curve.emplace_back(j["step"].get<double>(), j["loss"].get<double>());
      if (j.contains("eval_loss")) eval_curve.emplace_back(j["step"].get<double>(), j["eval_loss"].get<double>());
    }
    io::write_file_atomically(fs::path(f.out) / "loss.svg",
                              train::loss_curve_svg(train_curve, eval_curve, f.adapter + " on " + f.quant + ": loss"));
    nlohmann::json s = summary.to_json();
    s["trainable_parameters"] = model->trainable_parameter_count();
    s["adapter"] = trained.to_json();
    s["world_size"] = comm->size();
    io::write_file_atomically(fs::path(f.out) / "summary.json", s.dump(2) + "\n");
    fmt::print("{}\n", s.dump());
  });
}

}  // namespace

void register_train(CLI::App& app) {
  auto f = std::make_shared<TrainFlags>();
  CLI::App* cmd = app.add_subcommand("train", "Fine-tune adapters on a quantized base");
  cmd->add_option("MODEL", f->model, "Hugging Face directory, .gguf file or llama2.c .bin")->required();
  cmd->add_option("--data", f->data, "Training data file")->required();
  cmd->add_option("--format", f->format, "alpaca (JSON/JSONL instruction, input, output), jsonl (prompt, completion) or text");
  cmd->add_option("--tokenizer", f->tokenizer, "Tokenizer file (llama2.c: its tokenizer.bin)");
  cmd->add_option("--adapter", f->adapter, "lora, qblora, qalora, qablora or hira");
  cmd->add_option("--rank", f->rank, "Nominal adapter rank r");
  cmd->add_option("--alpha", f->alpha, "Adapter scale numerator: s = alpha / r");
  cmd->add_option("--dropout", f->dropout, "Dropout on the adapter input");
  cmd->add_option("--pool", f->pool, "Override the preset's input pooling p");
  cmd->add_option("--repeat", f->repeat, "Override the preset's output repeat k");
  cmd->add_option("--targets", f->targets, "Comma-separated block linears (default: all seven)");
  cmd->add_option("--quant", f->quant,
                  "Base format: nf4, intB-gG, dint4-gG or none (default nf4; a `qlora quantize` directory: its own)");
  cmd->add_option("--init", f->init, "Adapter initialisation: default (B = 0), loftq (alternating quantize + SVD) or "
                                     "cloq (calibrated closed form from the first training examples)");
  cmd->add_option("--objective", f->objective, "sft, rilq (activation discrepancy to the teacher + CE) or ti "
                                               "(Teacher Intervention distillation)");
  cmd->add_option("--teacher", f->teacher, "Full-precision teacher for rilq / ti (default: MODEL, unquantized)");
  cmd->add_option("--steps", f->steps, "Optimizer steps");
  cmd->add_option("--lr", f->lr, "Peak learning rate");
  cmd->add_option("--schedule", f->schedule, "constant, constant_with_warmup, linear or cosine");
  cmd->add_option("--warmup", f->warmup, "Warm-up steps");
  cmd->add_option("--weight-decay", f->weight_decay, "AdamW weight decay");
  cmd->add_option("--max-grad-norm", f->max_grad_norm, "Global gradient-norm clipping (0: off)");
  cmd->add_option("--batch", f->batch, "Examples per optimizer step (over all processes under mpirun)");
  cmd->add_option("--micro-batch", f->micro_batch, "Examples per forward/backward (per process)");
  cmd->add_option("--seq-len", f->seq_len, "Window length for --format text");
  cmd->add_option("--source-max-len", f->source_max_len, "Prompt tokens kept (instruction data)");
  cmd->add_option("--target-max-len", f->target_max_len, "Response tokens kept (instruction data)");
  cmd->add_flag("--train-on-source", f->train_on_source, "Also train on the prompt tokens");
  cmd->add_flag("--group-by-length", f->group_by_length, "Batch examples of similar length together");
  cmd->add_option("--eval-count", f->eval_count, "Held-out examples for the evaluation loss");
  cmd->add_option("--eval-every", f->eval_every, "Evaluate every N steps (and at the end)");
  cmd->add_option("--save-every", f->save_every, "Checkpoint every N steps (and at the end)");
  cmd->add_option("--log-every", f->log_every, "Progress line every N steps");
  cmd->add_flag("--checkpointing", f->checkpointing, "Recompute each block's activations in the backward");
  cmd->add_option("--loss-vocab-chunk", f->loss_vocab_chunk,
                  "Vocabulary columns of logits held at once by the loss (0: all; e.g. 16384 for Llama 3's 128K vocabulary)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--skip-nonfinite", f->skip_nonfinite, "Skip steps with a NaN/Inf loss or gradient instead of stopping");
  cmd->add_option("--out", f->out, "Run directory")->required();
  cmd->add_option("--resume", f->resume, "Continue the run in this directory from its newest checkpoint");
  cmd->add_option("--device", f->device, "cpu or cuda[:N]");
  cmd->add_option("--seed", f->seed, "Seed of the adapter init, data order and dropout");
  cmd->add_flag("--rank-adaptive", f->rank_adaptive,
                "RA-LoRA: reallocate the adapters' ranks during training by subspace analysis, under --rank-budget");
  cmd->add_option("--rank-budget", f->rank_options.budget, "Most trainable adapter parameters (default: the count at --rank)");
  cmd->add_option("--rank-every", f->rank_options.every, "Analyse the ranks every N steps (default 200)");
  cmd->add_option("--rank-warmup", f->rank_options.start, "First analysis after N steps (default: --rank-every)");
  cmd->add_option("--rank-stop", f->rank_options.stop, "No analysis after N steps (default: 30% of --steps)");
  cmd->add_option("--rank-min", f->rank_options.rule.min_rank, "Smallest rank of a layer (default: min(8, the start rank))");
  cmd->add_option("--rank-max", f->rank_options.rule.max_rank, "Largest rank of a layer (default: twice the start rank)");
  cmd->add_option("--rank-energy", f->rank_options.rule.energy, "Energy a layer's rank keeps, tau (default 0.9)");
  cmd->add_option("--rank-stability", f->rank_options.rule.stability,
                  "Subspace similarity phi above which directions count as settled, rho (default 0.9)");
  cmd->add_option("--rank-margin", f->rank_options.rule.margin, "Ranks added to what the criteria ask for (default 4)");
  cmd->add_option("--rank-multiple", f->rank_options.rule.multiple, "Round ranks up to a multiple of N (default 1)");
  cmd->callback([f] { run_train(*f); });
}

}  // namespace qlora::tool
