#pragma once
// Where the tokenizer of a MODEL argument is: --tokenizer when given; for a GGUF file the file itself
// (its embedded vocabulary); for a Hugging Face directory the directory (tokenizer.model / .json); for a
// llama2.c .bin a tokenizer.bin beside it. Used by `qlora info` and `qlora generate`.

#include <cstring>
#include <filesystem>
#include <optional>
#include <string>

#include "qlora/io/mapped_file.hpp"

namespace qlora::tool {

enum class ModelFormat { hf, gguf, llama2c };

inline ModelFormat model_format(const std::filesystem::path& path) {
  if (std::filesystem::is_directory(path)) return ModelFormat::hf;
  const io::MappedFile probe(path);
  if (probe.size() >= 4 && std::memcmp(probe.data(), "GGUF", 4) == 0) return ModelFormat::gguf;
  return ModelFormat::llama2c;
}

inline const char* model_format_name(ModelFormat f) {
  switch (f) {
    case ModelFormat::hf: return "huggingface";
    case ModelFormat::gguf: return "gguf";
    case ModelFormat::llama2c: return "llama2c";
  }
  return "?";
}

// nullopt when no tokenizer is known for the model.
inline std::optional<std::filesystem::path> tokenizer_path(const std::filesystem::path& model, const std::string& flag) {
  namespace fs = std::filesystem;
  if (!flag.empty()) return fs::path(flag);
  switch (model_format(model)) {
    case ModelFormat::gguf: return model;
    case ModelFormat::hf:
      for (const char* name : {"tokenizer.model", "tokenizer.json", "tokenizer.bin"})
        if (fs::exists(model / name)) return model;
      return std::nullopt;
    case ModelFormat::llama2c: {
      const fs::path beside = model.parent_path() / "tokenizer.bin";
      if (fs::exists(beside)) return beside;
      return std::nullopt;
    }
  }
  return std::nullopt;
}

}  // namespace qlora::tool
