#pragma once
// Plain-text data for language-model training and perplexity: the whole text tokenized once (one BOS at
// the start) and cut into non-overlapping windows of seq_len tokens; the tail shorter than a window is
// dropped. This is GPTQ's WikiText-2 protocol, so training chunks and evaluation windows are the same cut.

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/io/tokenizer.hpp"
#include "qlora/train/example.hpp"

namespace qlora::train {

// The whole file; `what` names it in the error ("path: cannot open the text file").
inline std::string read_text_file(const std::string& path, const std::string& what = "text file") {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open the " + what);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Windows [i*L, (i+1)*L) of ids, every position trained (labels = ids).
inline std::vector<Example> chunk_tokens(const std::vector<std::int32_t>& ids, std::int64_t seq_len) {
  if (seq_len < 2) throw Error("text windows need a sequence length of at least 2, got " + std::to_string(seq_len));
  std::vector<Example> windows;
  for (std::size_t start = 0; start + std::size_t(seq_len) <= ids.size(); start += std::size_t(seq_len)) {
    Example ex;
    ex.input_ids.assign(ids.begin() + std::ptrdiff_t(start), ids.begin() + std::ptrdiff_t(start + std::size_t(seq_len)));
    ex.labels = ex.input_ids;
    windows.push_back(std::move(ex));
  }
  return windows;
}

inline std::vector<Example> text_windows(const io::Tokenizer& tokenizer, const std::string& text, std::int64_t seq_len) {
  return chunk_tokens(tokenizer.encode(text, /*add_bos=*/true), seq_len);
}

}  // namespace qlora::train
