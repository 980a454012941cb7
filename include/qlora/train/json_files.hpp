#pragma once
// JSON and JSONL files as every reader of data, tasks, checkpoints and adapters takes them, with errors that
// name the file (and the line: "data.jsonl:2: not valid JSON (...)").

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "qlora/core/error.hpp"
#include "qlora/train/text_data.hpp"

namespace qlora::train {

inline nlohmann::json read_json_file(const std::string& path) {
  const std::string text = read_text_file(path, "JSON file");
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number like 1e99999
    throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
}

// Calls fn(record, where) for every non-blank line of `text` (the contents of `path`), where = "path:N".
// A line that is not JSON is a qlora::Error; so is a field fn reads that is missing or of the wrong type,
// reported as "path:N: expected <expected> (...)". Errors fn throws itself pass through.
inline void for_each_jsonl(const std::string& path, std::string_view text, std::string_view expected,
                           const std::function<void(const nlohmann::json& record, const std::string& where)>& fn) {
  std::int64_t number = 0;
  for (std::size_t start = 0; start < text.size();) {
    const std::size_t end = std::min(text.find('\n', start), text.size());
    const std::string_view line = text.substr(start, end - start);
    start = end + 1;
    ++number;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = path + ":" + std::to_string(number);
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for a number like 1e99999
      throw Error(where + ": not valid JSON (" + std::string(e.what()) + ")");
    }
    try {
      fn(record, where);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": expected " + std::string(expected) + " (" + e.what() + ")");
    }
  }
}

}  // namespace qlora::train
