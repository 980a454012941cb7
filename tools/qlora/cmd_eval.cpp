// qlora eval MODEL [--adapter DIR] (--ppl TEXTFILE [--seq-len L] | --mc TASK.jsonl | --gsm8k FILE) [--json]
// Perplexity by GPTQ's WikiText-2 protocol, multiple-choice accuracy (acc, acc_norm) as lm-evaluation-harness
// reports it, or GSM8K accuracy by greedy generation; on the base model, a quantized one (--quant), or the
// model with a trained adapter (--adapter, whose base format is used unless --quant overrides it).
// Protocols: include/qlora/train/evaluation.hpp.
// Under mpirun the windows / questions are dealt to the ranks (each rank loads the model) and the per-item
// results summed in order: the numbers are the one-process numbers, bit for bit; rank 0 prints them. The
// ranks exchange a few doubles once, so the host communicator (MPI) serves GPU ranks too.

#include <fmt/core.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "commands.hpp"
#include "model_options.hpp"
#include "models/llama/generate.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/make_communicator.hpp"
#include "qlora/dist/sharded_rows.hpp"
#include "qlora/ops/cross_entropy.hpp"
#include "qlora/train/evaluation.hpp"
#include "qlora/train/json_files.hpp"

namespace qlora::tool {
namespace {

struct EvalFlags {
  std::string model, adapter, tokenizer, ppl, mc, gsm8k, device = "cpu", quant;
  std::int64_t seq_len = 2048, batch = 1, limit = 0, max_new = 256;
  bool json = false;
};

// Summed log-likelihood of the continuation tokens after the context.
double continuation_loglik(models::llama::Model& model, const std::vector<std::int32_t>& context,
                           const std::vector<std::int32_t>& continuation) {
  std::vector<std::int32_t> ids = context, targets(context.size() + continuation.size(), train::kIgnoreLabel);
  ids.insert(ids.end(), continuation.begin(), continuation.end());
  for (std::size_t i = 0; i < continuation.size(); ++i) targets[context.size() - 1 + i] = continuation[i];
  const std::int64_t t = std::int64_t(ids.size());
  const Tensor id_tensor = Tensor::from(ids, Shape{1, t}).to(model.device());
  const Tensor target_tensor = Tensor::from(targets, Shape{1, t}).to(model.device());
  return -model.evaluate_loss(id_tensor, target_tensor).loss_sum;
}

void run_eval(const EvalFlags& f) {
  namespace ml = models::llama;
  ml::LoadOptions load;
  load.device = rank_device(f.device);
  const std::unique_ptr<dist::Communicator> comm = dist::make_communicator(Device::cpu());
  const bool root = comm->is_root(), show = root && !f.json;
  std::unique_ptr<io::Tokenizer> tokenizer;
  std::optional<ml::Model> loaded;
  dist::fail_together(*comm, [&] {
    const int tasks = int(!f.ppl.empty()) + int(!f.mc.empty()) + int(!f.gsm8k.empty());
    if (tasks != 1) throw Error("give exactly one of --ppl TEXTFILE, --mc TASK.jsonl or --gsm8k FILE");
    for (const std::string* file : {&f.ppl, &f.mc, &f.gsm8k})
      if (!file->empty() && !std::filesystem::exists(*file)) throw Error("cannot open " + *file + ": no such file or directory");
    tokenizer = open_tokenizer(f.model, f.tokenizer);
    loaded.emplace(load_with_adapter(f.model, f.adapter, load, f.quant));
  });
  ml::Model& model = *loaded;
  const auto t0 = std::chrono::steady_clock::now();
  nlohmann::json result = {{"model", f.model}, {"adapter", f.adapter}};

  if (!f.ppl.empty()) {
    if (f.seq_len > model.config().max_position_embeddings)
      throw Error("--seq-len " + std::to_string(f.seq_len) + " is longer than the model's context of " +
                  std::to_string(model.config().max_position_embeddings) + " tokens");
    const auto ids = train::perplexity_ids(*tokenizer, f.ppl);
    auto score = [&](const train::Batch& b) {
      const auto r = model.evaluate_loss(b.tokens.to(model.device()), b.targets.to(model.device()));
      return train::NllSum{r.loss_sum, r.valid_tokens};
    };
    auto progress = [&](std::int64_t done, std::int64_t total) {
      if (show) fmt::print(stderr, "\rwindow {}/{}", done, total);
    };
    const train::PerplexityResult r = train::perplexity(ids, f.seq_len, score, f.batch, progress, *comm);
    if (show) fmt::print(stderr, "\n");
    result.update(r.to_json());
    result["seq_len"] = f.seq_len;
  } else if (!f.mc.empty()) {
    auto items = train::read_multiple_choice(f.mc);
    if (f.limit > 0 && std::int64_t(items.size()) > f.limit) items.resize(std::size_t(f.limit));
    const auto r = train::multiple_choice(*tokenizer, items, [&](const auto& ctx, const auto& cont) {
      return continuation_loglik(model, ctx, cont);
    }, *comm);
    result.update(r.to_json());
  } else {
    // Each rank generates for its own questions (round robin); the hits are gathered once at the end.
    std::vector<std::pair<std::string, std::string>> questions;  // (question, answer)
    train::for_each_jsonl(f.gsm8k, train::read_text_file(f.gsm8k), "{\"question\", \"answer\"}",
                          [&](const nlohmann::json& row, const std::string&) {
      if (f.limit > 0 && std::int64_t(questions.size()) >= f.limit) return;
      questions.emplace_back(row.at("question").get<std::string>(), row.at("answer").get<std::string>());
    });
    if (questions.empty()) throw Error(f.gsm8k + ": no questions");
    dist::ShardedRows hits(*comm, std::int64_t(questions.size()), 1);
    std::int64_t done = 0, correct = 0;
    dist::fail_together(*comm, [&] {
      for (std::int64_t q = 0; q < hits.items(); ++q) {
        if (!hits.mine(q)) continue;
        const auto& [question, answer] = questions[std::size_t(q)];
        const auto prompt = tokenizer->encode("Question: " + question + "\nAnswer:", true);
        ml::GenerateOptions g;
        g.max_new_tokens = std::min<std::int64_t>(f.max_new, model.config().max_position_embeddings - std::int64_t(prompt.size()));
        if (g.max_new_tokens <= 0)
          throw Error(f.gsm8k + ": question " + std::to_string(q + 1) + " is longer than the model's context");
        for (std::int64_t id : model.config().eos_token_ids) g.eos_ids.push_back(std::int32_t(id));
        std::string text = tokenizer->decode(ml::generate(model, prompt, g).tokens);
        const std::size_t stop = text.find("\n\nQuestion:");
        if (stop != std::string::npos) text.resize(stop);
        const bool hit = train::gsm8k_extract_answer(text) == train::gsm8k_extract_answer(answer);
        hits.row(q)[0] = hit;
        correct += hit;
        ++done;
        if (show) fmt::print(stderr, "\rquestion {}: {}/{} correct", done, correct, done);
      }
    });
    if (show) fmt::print(stderr, "\n");
    hits.exchange();
    const std::int64_t total = hits.items();
    correct = std::int64_t(hits.column_sums()[0]);
    result["accuracy"] = double(correct) / double(total);
    result["questions"] = total;
  }
  result["seconds"] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  result["world_size"] = comm->size();
  if (!root) return;
  if (f.json) {
    fmt::print("{}\n", result.dump());
  } else {
    for (const auto& [key, value] : result.items()) fmt::print("{}: {}\n", key, value.dump());
  }
}

}  // namespace

void register_eval(CLI::App& app) {
  auto f = std::make_shared<EvalFlags>();
  CLI::App* cmd = app.add_subcommand("eval", "Perplexity, multiple-choice accuracy or GSM8K accuracy");
  cmd->add_option("MODEL", f->model, "Hugging Face directory, .gguf file or llama2.c .bin")->required();
  cmd->add_option("--adapter", f->adapter, "Adapter directory written by qlora train (OUT/adapter)");
  cmd->add_option("--tokenizer", f->tokenizer, "Tokenizer file (llama2.c: its tokenizer.bin)");
  cmd->add_option("--ppl", f->ppl, "Text file (or JSONL of {\"text\"}) for perplexity");
  cmd->add_option("--seq-len", f->seq_len, "Perplexity window length");
  cmd->add_option("--batch", f->batch, "Perplexity windows per forward");
  cmd->add_option("--mc", f->mc, "Multiple-choice JSONL: question, choices, answer");
  cmd->add_option("--gsm8k", f->gsm8k, "GSM8K JSONL: question, answer");
  cmd->add_option("--limit", f->limit, "Evaluate at most N questions");
  cmd->add_option("--max-new", f->max_new, "GSM8K: most generated tokens per question");
  cmd->add_option("--quant", f->quant, "Quantize the base on load (default: the adapter's format, else none)");
  cmd->add_option("--device", f->device, "cpu or cuda[:N]");
  cmd->add_flag("--json", f->json, "One JSON object on stdout");
  cmd->callback([f] { run_eval(*f); });
}

}  // namespace qlora::tool
