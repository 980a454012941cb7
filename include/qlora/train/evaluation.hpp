#pragma once
// Evaluation protocols, independent of the model: the model enters as a scoring callback.
//
// Perplexity (GPTQ's WikiText-2 protocol): tokenize the whole text once (one BOS at the start; a dataset of
// rows is first joined with "\n\n"), cut the ids into non-overlapping windows of seq_len tokens (the tail
// shorter than a window is dropped), score the L-1 next-token predictions of each window,
// ppl = exp(mean negative log-likelihood over all scored tokens).
//
// Multiple choice (lm-evaluation-harness's loglikelihood tasks): for each choice, the log-likelihood of
// the continuation " " + choice after the context "Question: ...\nAnswer:"; the pair is encoded as the
// harness does (encode(context + continuation), the continuation being what follows encode(context)).
// acc = argmax of the log-likelihoods; acc_norm = argmax of log-likelihood / byte length of the choice.
//
// GSM8K: greedy generation; the answer is the number after "####" if the model wrote one, else the last
// number in the generated text (the harness's strict and flexible extractions); commas are removed.
//
// Across ranks (a dist::Communicator of more than one process): perplexity's batches of windows and the
// multiple-choice questions are dealt round robin (dist::ShardedRows); each item's result reaches every rank
// exactly and the items are summed in order, so N processes report the one-process numbers bit for bit.

#include <cctype>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/dist/communicator.hpp"
#include "qlora/dist/fail_together.hpp"
#include "qlora/dist/sharded_rows.hpp"
#include "qlora/dist/single_process.hpp"
#include "qlora/io/tokenizer.hpp"
#include "qlora/train/data_loader.hpp"
#include "qlora/train/json_files.hpp"
#include "qlora/train/text_data.hpp"

namespace qlora::train {

// ---- perplexity -----------------------------------------------------------------------------------------

struct NllSum {
  double nll = 0;          // sum of -log p over the scored targets
  std::int64_t tokens = 0; // targets scored
};

struct PerplexityResult {
  double ppl = 0, nll = 0;  // nll: mean per token
  std::int64_t tokens = 0, windows = 0;
  nlohmann::json to_json() const { return {{"ppl", ppl}, {"nll", nll}, {"tokens", tokens}, {"windows", windows}}; }
};

// score(batch) returns the summed NLL of the batch's targets. Windows are scored `batch_size` at a time, the
// batches dealt to the ranks of `comm`; `on_window(done, total)` (optional) reports progress (an estimate of
// the windows done by all ranks, from this rank's own).
inline PerplexityResult perplexity(const std::vector<std::int32_t>& ids, std::int64_t seq_len,
                                   const std::function<NllSum(const Batch&)>& score, std::int64_t batch_size = 1,
                                   const std::function<void(std::int64_t, std::int64_t)>& on_window = {},
                                   dist::Communicator& comm = dist::single_process()) {
  if (batch_size < 1) throw Error("perplexity: the batch size must be >= 1, got " + std::to_string(batch_size));
  const std::vector<Example> windows = chunk_tokens(ids, seq_len);
  if (windows.empty())
    throw Error("perplexity: the text has " + std::to_string(ids.size()) + " tokens, fewer than one window of " +
                std::to_string(seq_len));
  const std::int64_t total = std::int64_t(windows.size());
  const std::int64_t batches = (total + batch_size - 1) / batch_size;
  dist::ShardedRows rows(comm, batches, 2);
  dist::fail_together(comm, [&] {  // an error on one rank must not leave the others waiting in exchange()
    for (std::int64_t k = 0; k < batches; ++k) {
      if (!rows.mine(k)) continue;
      const std::int64_t start = k * batch_size, end = std::min(total, start + batch_size);
      std::vector<const Example*> chunk;
      for (std::int64_t i = start; i < end; ++i) chunk.push_back(&windows[std::size_t(i)]);
      const NllSum s = score(make_batch(chunk, 0));
      if (!std::isfinite(s.nll))
        throw Error("perplexity: the model produced a non-finite loss in window " + std::to_string(start));
      rows.row(k)[0] = s.nll;
      rows.row(k)[1] = double(s.tokens);
      if (on_window) on_window(std::min(total, (k + 1) * batch_size), total);
    }
  });
  rows.exchange();
  const std::vector<double> sums = rows.column_sums();
  PerplexityResult r;
  r.windows = total;
  r.tokens = std::int64_t(sums[1]);
  r.nll = sums[0] / sums[1];
  r.ppl = std::exp(r.nll);
  return r;
}

// The ids of a text file for perplexity: JSONL files of {"text": ...} rows are joined with "\n\n".
inline std::vector<std::int32_t> perplexity_ids(const io::Tokenizer& tokenizer, const std::string& path) {
  std::string text = read_text_file(path);
  if (path.size() > 6 && path.substr(path.size() - 6) == ".jsonl") {
    std::string joined;
    for_each_jsonl(path, text, "{\"text\": ...}", [&](const nlohmann::json& row, const std::string&) {
      if (!joined.empty()) joined += "\n\n";
      joined += row.at("text").get<std::string>();
    });
    text = std::move(joined);
  }
  return tokenizer.encode(text, /*add_bos=*/true);
}

// ---- multiple choice ------------------------------------------------------------------------------------

struct MultipleChoiceItem {
  std::string question;
  std::vector<std::string> choices;
  std::int64_t answer = 0;  // index into choices
};

// JSONL of {"question": str, "choices": [str, ...], "answer": int index or the choice's label "A".."Z"}.
inline std::vector<MultipleChoiceItem> read_multiple_choice(const std::string& path) {
  const std::string text = read_text_file(path);
  std::vector<MultipleChoiceItem> items;
  for_each_jsonl(path, text, "{\"question\", \"choices\", \"answer\"}", [&](const nlohmann::json& row,
                                                                             const std::string& where) {
    MultipleChoiceItem item{row.at("question").get<std::string>(), row.at("choices").get<std::vector<std::string>>(), 0};
    const auto& answer = row.at("answer");
    if (answer.is_string() && answer.get<std::string>().size() == 1 && std::isupper(answer.get<std::string>()[0]))
      item.answer = answer.get<std::string>()[0] - 'A';
    else
      item.answer = answer.get<std::int64_t>();
    if (item.choices.size() < 2) throw Error(where + ": needs at least two choices");
    if (item.answer < 0 || item.answer >= std::int64_t(item.choices.size()))
      throw Error(where + ": answer " + answer.dump() + " is not one of the " + std::to_string(item.choices.size()) +
                  " choices");
    items.push_back(std::move(item));
  });
  if (items.empty()) throw Error(path + ": no questions");
  return items;
}

// The harness's pair encoding: trailing spaces of the context move to the continuation.
inline std::pair<std::vector<std::int32_t>, std::vector<std::int32_t>> encode_pair(const io::Tokenizer& tokenizer,
                                                                                   std::string context,
                                                                                   std::string continuation) {
  while (!context.empty() && context.back() == ' ') {
    continuation.insert(continuation.begin(), ' ');
    context.pop_back();
  }
  const auto whole = tokenizer.encode(context + continuation, true);
  const auto ctx = tokenizer.encode(context, true);
  std::size_t common = 0;
  while (common < ctx.size() && common < whole.size() && whole[common] == ctx[common]) ++common;
  if (common == whole.size()) common = whole.size() - 1;  // the continuation must keep at least one token
  return {std::vector<std::int32_t>(whole.begin(), whole.begin() + std::ptrdiff_t(common)),
          std::vector<std::int32_t>(whole.begin() + std::ptrdiff_t(common), whole.end())};
}

struct MultipleChoiceResult {
  double acc = 0, acc_norm = 0;
  std::int64_t questions = 0;
  nlohmann::json to_json() const { return {{"acc", acc}, {"acc_norm", acc_norm}, {"questions", questions}}; }
};

// loglik(context_ids, continuation_ids) = sum of log p(continuation | context). The questions are dealt to
// the ranks of `comm`.
inline MultipleChoiceResult multiple_choice(
    const io::Tokenizer& tokenizer, const std::vector<MultipleChoiceItem>& items,
    const std::function<double(const std::vector<std::int32_t>&, const std::vector<std::int32_t>&)>& loglik,
    dist::Communicator& comm = dist::single_process()) {
  dist::ShardedRows rows(comm, std::int64_t(items.size()), 2);  // per question: acc hit, acc_norm hit
  dist::fail_together(comm, [&] {
    for (std::size_t q = 0; q < items.size(); ++q) {
      if (!rows.mine(std::int64_t(q))) continue;
      const MultipleChoiceItem& item = items[q];
      const std::string context = "Question: " + item.question + "\nAnswer:";
      std::int64_t best = 0, best_norm = 0;
      double best_ll = -INFINITY, best_ll_norm = -INFINITY;
      for (std::size_t c = 0; c < item.choices.size(); ++c) {
        const auto [ctx, cont] = encode_pair(tokenizer, context, " " + item.choices[c]);
        const double ll = loglik(ctx, cont);
        const double ll_norm = ll / double(std::max<std::size_t>(1, item.choices[c].size()));
        if (ll > best_ll) best_ll = ll, best = std::int64_t(c);
        if (ll_norm > best_ll_norm) best_ll_norm = ll_norm, best_norm = std::int64_t(c);
      }
      rows.row(std::int64_t(q))[0] = best == item.answer;
      rows.row(std::int64_t(q))[1] = best_norm == item.answer;
    }
  });
  rows.exchange();
  const std::vector<double> hits = rows.column_sums();
  MultipleChoiceResult r;
  r.questions = std::int64_t(items.size());
  r.acc = hits[0] / double(r.questions);
  r.acc_norm = hits[1] / double(r.questions);
  return r;
}

// ---- GSM8K ----------------------------------------------------------------------------------------------

namespace detail {
inline std::string clean_number(std::string s) {
  std::string out;
  for (char ch : s)
    if (ch != ',' && ch != '$') out += ch;
  while (!out.empty() && out.back() == '.') out.pop_back();
  return out;
}
// The numbers in text, in order ("-1,234.5" -> "-1234.5").
inline std::vector<std::string> numbers_in(const std::string& text) {
  std::vector<std::string> found;
  for (std::size_t i = 0; i < text.size();) {
    const bool sign = text[i] == '-' && i + 1 < text.size() && std::isdigit(static_cast<unsigned char>(text[i + 1]));
    if (!sign && !std::isdigit(static_cast<unsigned char>(text[i]))) {
      ++i;
      continue;
    }
    std::size_t j = i + (sign ? 1 : 0);
    while (j < text.size() && (std::isdigit(static_cast<unsigned char>(text[j])) || text[j] == ',' || text[j] == '.')) ++j;
    found.push_back(clean_number(text.substr(i, j - i)));
    i = j;
  }
  return found;
}
}  // namespace detail

// The final answer of a GSM8K solution or a model's generation ("" when it has no number).
inline std::string gsm8k_extract_answer(const std::string& text) {
  const std::size_t marker = text.find("####");
  if (marker != std::string::npos) {
    const auto after = detail::numbers_in(text.substr(marker + 4));
    if (!after.empty()) return after.front();
  }
  const auto all = detail::numbers_in(text);
  return all.empty() ? "" : all.back();
}

}  // namespace qlora::train
