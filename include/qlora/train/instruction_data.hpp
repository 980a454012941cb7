#pragma once
// Instruction-tuning data: reading records and turning them into Examples with the prompt masked.
//
// Formats (`--format`):
//   alpaca  a JSON array, or JSONL, of {"instruction", "input" (optional), "output"} records (Stanford Alpaca);
//           the prompt is QLoRA's Alpaca template below, the completion is "output".
//   jsonl   JSONL of {"prompt", "completion"} records, used verbatim.
// A malformed line or record is an error naming the file and the line (JSONL) or record index (JSON array).
//
// Tokenization follows artidoro/qlora's DataCollatorForCausalLM: source = BOS + prompt, truncated to
// source_max_len tokens; target = completion + EOS, truncated to target_max_len tokens; input = source +
// target; labels = -100 over the source (unless train_on_source) and the target ids over the target.

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/io/tokenizer.hpp"
#include "qlora/train/example.hpp"
#include "qlora/train/json_files.hpp"
#include "qlora/train/text_data.hpp"

namespace qlora::train {

struct InstructionRecord {
  std::string prompt;
  std::string completion;
};

// artidoro/qlora qlora.py ALPACA_PROMPT_DICT (note the space after "### Response:").
inline std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (input.empty())
    return "Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.\n\n### Instruction:\n" +
           instruction + "\n\n### Response: ";
  return "Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.\n\n### Instruction:\n" +
         instruction + "\n\n### Input:\n" + input + "\n\n### Response: ";
}

namespace detail {

inline std::string string_field(const nlohmann::json& record, const char* key, bool required, const std::string& where) {
  const auto it = record.find(key);
  if (it == record.end() || it->is_null()) {
    if (required) throw Error(where + ": missing field \"" + key + "\"");
    return "";
  }
  if (!it->is_string()) throw Error(where + ": field \"" + key + "\" is not a string");
  return it->get<std::string>();
}

inline InstructionRecord to_record(const nlohmann::json& record, const std::string& format, const std::string& where) {
  if (!record.is_object()) throw Error(where + ": expected a JSON object");
  if (format == "alpaca")
    return {alpaca_prompt(string_field(record, "instruction", true, where), string_field(record, "input", false, where)),
            string_field(record, "output", true, where)};
  if (format == "jsonl")
    return {string_field(record, "prompt", true, where), string_field(record, "completion", true, where)};
  throw Error("unknown instruction data format '" + format + "' (expected alpaca or jsonl)");
}

}  // namespace detail

// Reads every record of `path`: a JSON array or JSONL (one object per non-blank line), by its first
// non-blank character. Throws qlora::Error naming the file and the line or record for anything malformed,
// and for a file with no records.
inline std::vector<InstructionRecord> read_instruction_file(const std::string& path, const std::string& format) {
  const std::string text = read_text_file(path, "data file");
  const std::size_t first = text.find_first_not_of(" \t\r\n\xEF\xBB\xBF");
  std::vector<InstructionRecord> records;
  if (first != std::string::npos && text[first] == '[') {
    nlohmann::json array;
    try {
      array = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number like 1e99999
      throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
    }
    for (std::size_t i = 0; i < array.size(); ++i)
      records.push_back(detail::to_record(array[i], format, path + ": record " + std::to_string(i)));
  } else {
    for_each_jsonl(path, text, "an object", [&](const nlohmann::json& record, const std::string& where) {
      records.push_back(detail::to_record(record, format, where));
    });
  }
  if (records.empty()) throw Error(path + ": the data file has no records");
  return records;
}

struct InstructionTokenization {
  std::int64_t source_max_len = 384;  // Q-BLoRA's released script (QLoRA's default is 1024)
  std::int64_t target_max_len = 128;
  bool train_on_source = false;
};

inline Example tokenize_instruction(const io::Tokenizer& tokenizer, const InstructionRecord& record,
                                    const InstructionTokenization& opt = {}) {
  std::vector<std::int32_t> source = tokenizer.encode(record.prompt, /*add_bos=*/true);
  std::vector<std::int32_t> target = tokenizer.encode(record.completion, false, /*add_eos=*/true);
  if (std::int64_t(source.size()) > opt.source_max_len) source.resize(std::size_t(opt.source_max_len));
  if (std::int64_t(target.size()) > opt.target_max_len) target.resize(std::size_t(opt.target_max_len));
  Example ex;
  ex.input_ids = source;
  ex.input_ids.insert(ex.input_ids.end(), target.begin(), target.end());
  ex.labels.assign(source.size(), kIgnoreLabel);
  if (opt.train_on_source) ex.labels = source;
  ex.labels.insert(ex.labels.end(), target.begin(), target.end());
  return ex;
}

}  // namespace qlora::train
