#pragma once
// Hugging Face tokenizer files: `tokenizer.json` of a byte-level BPE model (GPT-2, Llama 3, SmolLM,
// Qwen...) and the special tokens of `tokenizer_config.json`.
// Read from tokenizer.json: model.vocab, model.merges ("a b" strings or [a, b] pairs), model.ignore_merges,
// added_tokens (special: matched only when allowed; not special: always matched), and the pre_tokenizer:
// ByteLevel (use_regex: GPT-2's regex; add_prefix_space), Split (a Regex pattern, behavior Isolated),
// Digits, or a Sequence of these. Anything else (SentencePiece-style tokenizer.json with Metaspace and
// byte_fallback, WordPiece, Unigram) is refused with a message: use the tokenizer.model instead.

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "qlora/io/tokenizer.hpp"
#include "qlora/io/tokenizer_bpe.hpp"

namespace qlora::io {

namespace detail {

inline nlohmann::json parse_tokenizer_json(const std::string& path) {
  const std::string text = read_tokenizer_file(path);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error("tokenizer: '" + path + "' is not valid JSON (" + e.what() + ")");
  }
}

// Appends the regexes of one pre_tokenizer object; sets add_prefix_space for ByteLevel's option.
inline void collect_pre_tokenizer(const nlohmann::json& pre, std::vector<std::string>& patterns,
                                  bool& add_prefix_space, bool& byte_level, const std::string& path) {
  if (pre.is_null()) return;
  const std::string type = pre.value("type", "");
  if (type == "Sequence") {
    for (const auto& p : pre.at("pretokenizers")) collect_pre_tokenizer(p, patterns, add_prefix_space, byte_level, path);
  } else if (type == "ByteLevel") {
    byte_level = true;
    add_prefix_space = pre.value("add_prefix_space", false);
    if (pre.value("use_regex", true)) patterns.emplace_back(kGpt2Pattern);
  } else if (type == "Split") {
    const auto& pattern = pre.at("pattern");
    QLORA_CHECK(pattern.contains("Regex"), "tokenizer: '" + path + "' has a Split pre-tokenizer without a Regex pattern");
    const std::string behavior = pre.value("behavior", "Isolated");
    QLORA_CHECK(behavior == "Isolated" && !pre.value("invert", false),
                "tokenizer: '" + path + "' has a Split pre-tokenizer with unsupported behavior '" + behavior + "'");
    patterns.push_back(pattern.at("Regex").get<std::string>());
  } else if (type == "Digits") {
    patterns.emplace_back(pre.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)");
  } else {
    throw Error("tokenizer: '" + path + "' has unsupported pre-tokenizer type '" + type + "'");
  }
}

// A token id of the file: a non-negative integer that fits in 32 bits (a float or a huge number would
// otherwise be converted with undefined behaviour, or wrap).
inline std::int32_t token_id(const nlohmann::json& id, const std::string& what, const std::string& path) {
  QLORA_CHECK(id.is_number_integer(), "tokenizer: '" + path + "' gives " + what + " the id " + id.dump() + ", not an integer");
  QLORA_CHECK(id.is_number_unsigned() || id.get<std::int64_t>() >= 0, "tokenizer: '" + path + "' gives " + what + " a negative id");
  QLORA_CHECK(id.get<std::uint64_t>() <= std::uint64_t(INT32_MAX),
              "tokenizer: '" + path + "' gives " + what + " the id " + id.dump() + ", beyond 32 bits");
  return std::int32_t(id.get<std::uint64_t>());
}

inline std::string special_token_content(const nlohmann::json& entry) {
  if (entry.is_string()) return entry.get<std::string>();
  if (entry.is_object() && entry.contains("content")) {
    const nlohmann::json& content = entry.at("content");
    if (!content.is_string()) throw Error("tokenizer_config.json: a special token's \"content\" must be a string, got " +
                                          std::string(content.type_name()));
    return content.get<std::string>();
  }
  return {};
}

}  // namespace detail

// Special tokens of a tokenizer_config.json: added_tokens_decoder plus the bos/eos/pad token names.
struct HfSpecialTokens {
  std::vector<SpecialToken> tokens;
  std::int32_t bos_id = -1;
  std::int32_t eos_id = -1;
  std::int32_t pad_id = -1;
};

inline HfSpecialTokens read_hf_tokenizer_config(const std::string& path) {
  const nlohmann::json config = detail::parse_tokenizer_json(path);
  HfSpecialTokens result;
  try {
    if (config.contains("added_tokens_decoder")) {
      for (const auto& [id, entry] : config.at("added_tokens_decoder").items()) {
        result.tokens.push_back(
            {entry.at("content").get<std::string>(), std::stoi(id), entry.value("special", true)});
      }
    }
  } catch (const std::exception& e) {
    throw Error("tokenizer: '" + path + "' has a malformed added_tokens_decoder (" + e.what() + ")");
  }
  auto id_of = [&](const char* key) {
    if (!config.contains(key)) return -1;
    const std::string content = detail::special_token_content(config.at(key));
    for (const SpecialToken& s : result.tokens) {
      if (s.text == content) return s.id;
    }
    return -1;
  };
  result.bos_id = id_of("bos_token");
  result.eos_id = id_of("eos_token");
  result.pad_id = id_of("pad_token");
  return result;
}

// `config` (tokenizer_config.json beside it, when there is one) supplies BOS/EOS/pad.
inline std::unique_ptr<BpeTokenizer> load_hf_tokenizer_json(const std::string& path,
                                                            const HfSpecialTokens* config = nullptr) {
  const nlohmann::json json = detail::parse_tokenizer_json(path);
  BpeVocabulary vocab;
  try {
    const auto& model = json.at("model");
    const std::string type = model.value("type", "BPE");
    QLORA_CHECK(type == "BPE", "tokenizer: '" + path + "' has model type '" + type + "'; only BPE is supported");
    bool add_prefix_space = false, byte_level = false;
    detail::collect_pre_tokenizer(json.value("pre_tokenizer", nlohmann::json()), vocab.pre_tokenizer_patterns,
                                  add_prefix_space, byte_level, path);
    if (json.contains("decoder") && json.at("decoder").is_object()) {
      byte_level = byte_level || json.at("decoder").value("type", "") == "ByteLevel";
    }
    QLORA_CHECK(byte_level, "tokenizer: '" + path +
                                "' is not a byte-level BPE (no ByteLevel pre-tokenizer or decoder); "
                                "for a SentencePiece model load its tokenizer.model");
    QLORA_CHECK(!add_prefix_space, "tokenizer: '" + path + "' uses ByteLevel add_prefix_space, which is not supported");
    vocab.ignore_merges = model.value("ignore_merges", false);

    const auto& entries = model.at("vocab");
    // Ids are dense: below the number of entries plus added tokens (which may fill holes). A larger id is
    // a corrupt file that would make us allocate that many strings.
    const std::size_t added = json.contains("added_tokens") && json.at("added_tokens").is_array() ? json.at("added_tokens").size() : 0;
    const std::size_t id_limit = entries.size() + added;
    detail::PieceToId ids;
    for (const auto& [token, id_json] : entries.items()) {
      const auto id = detail::token_id(id_json, "token '" + token + "'", path);
      QLORA_CHECK(std::size_t(id) < id_limit, "tokenizer: '" + path + "' gives token '" + token + "' id " +
                                                  std::to_string(id) + ", beyond its " + std::to_string(id_limit) +
                                                  " vocabulary entries and added tokens");
      if (std::size_t(id) >= vocab.tokens.size()) vocab.tokens.resize(std::size_t(id) + 1);
      vocab.tokens[std::size_t(id)] = detail::vocab_token_bytes(token);
      ids.emplace(token, id);
    }
    std::int32_t rank = 0;
    for (const auto& merge : model.at("merges")) {
      std::string left, right;
      if (merge.is_string()) {
        const std::string text = merge.get<std::string>();
        const std::size_t space = text.find(' ');
        QLORA_CHECK(space != std::string::npos, "tokenizer: '" + path + "' has merge '" + text + "' without a space");
        left = text.substr(0, space), right = text.substr(space + 1);
      } else {
        left = merge.at(0).get<std::string>(), right = merge.at(1).get<std::string>();
      }
      const auto a = detail::find_piece(ids, left), b = detail::find_piece(ids, right);
      QLORA_CHECK(a && b, "tokenizer: '" + path + "' has merge '" + left + " " + right + "' of a token not in the vocab");
      vocab.merges.push_back({*a, *b, rank++});
    }
    if (json.contains("added_tokens")) {
      for (const auto& added : json.at("added_tokens")) {
        const std::string content = added.at("content").get<std::string>();
        vocab.special_tokens.push_back({content, detail::token_id(added.at("id"), "added token '" + content + "'", path),
                                        added.value("special", false)});
      }
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error("tokenizer: '" + path + "' is not a tokenizer.json this library reads (" + e.what() + ")");
  }
  if (config != nullptr) {
    vocab.bos_id = config->bos_id;
    vocab.eos_id = config->eos_id;
    vocab.pad_id = config->pad_id;
  }
  return std::make_unique<BpeTokenizer>(std::move(vocab), path);
}

}  // namespace qlora::io
