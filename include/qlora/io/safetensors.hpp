#pragma once
// Hugging Face safetensors (https://github.com/huggingface/safetensors, README "Format"): an 8-byte
// little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]},
// "__metadata__": {string: string}}, then the data section; offsets are relative to its start.
//
// Reading memory-maps the file and checks the whole header up front (offsets inside the data section,
// sizes equal to shape x dtype, no overlaps, no duplicate names, known dtypes); tensors are then made
// lazily, one at a time, by name: a zero-copy view of the mapping when the stored dtype is the one asked
// for (and the bytes are aligned for it), else a converted host copy. A sharded checkpoint is a directory
// with model.safetensors.index.json whose weight_map names the shard holding each tensor.
//
// Writing keeps the caller's tensor order, pads the header with spaces to a multiple of 8 bytes (as the
// reference writer does, so the data section starts aligned) and goes through atomic_write.hpp.

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/shape.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora::io {

static_assert(std::endian::native == std::endian::little, "the model file readers assume a little-endian host");

namespace detail {

// The header limit of the reference implementation (100 MB): anything larger is a corrupt length field.
inline constexpr std::uint64_t kMaxSafetensorsHeader = 100'000'000;

struct SafetensorsDTypeInfo {
  std::string_view name;
  std::size_t size;
  std::optional<DType> dtype;  // empty: a valid safetensors dtype that qlora has no DType for
};

// All dtypes of the format (safetensors/src/tensor.rs, enum Dtype); the ones qlora reads map to a DType.
inline const std::vector<SafetensorsDTypeInfo>& safetensors_dtypes() {
  static const std::vector<SafetensorsDTypeInfo> table = {
      {"F64", 8, DType::f64},  {"F32", 4, DType::f32},     {"F16", 2, DType::f16},       {"BF16", 2, DType::bf16},
      {"I32", 4, DType::i32},  {"I8", 1, DType::i8},       {"U8", 1, DType::u8},         {"I64", 8, std::nullopt},
      {"U64", 8, std::nullopt}, {"U32", 4, std::nullopt},  {"I16", 2, std::nullopt},     {"U16", 2, std::nullopt},
      {"BOOL", 1, std::nullopt}, {"F8_E4M3", 1, std::nullopt}, {"F8_E5M2", 1, std::nullopt}};
  return table;
}

inline const SafetensorsDTypeInfo* find_safetensors_dtype(std::string_view name) {
  for (const auto& d : safetensors_dtypes())
    if (d.name == name) return &d;
  return nullptr;
}

inline std::string_view safetensors_name_of(DType t) {
  switch (t) {
    case DType::f64: return "F64";
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::i32: return "I32";
    case DType::i8: return "I8";
    case DType::u8: case DType::bytes: return "U8";  // packed codes are stored as plain bytes
  }
  throw Error("no safetensors dtype for " + std::string(dtype_name(t)));
}

// Host copy of n elements at `src` (stored dtype `from`, possibly unaligned) converted to `to`.
inline Tensor convert_bytes(const std::byte* src, DType from, Shape shape, DType to, const std::string& what) {
  Tensor stored = Tensor::empty(shape, from);
  std::memcpy(stored.data(), src, stored.nbytes());
  if (from == to) return stored;
  if (!is_floating(from) || !is_floating(to))
    throw Error(what + " is stored as " + std::string(dtype_name(from)) + " and cannot be converted to " +
                std::string(dtype_name(to)) + " (only floating dtypes convert)");
  return stored.to(to);
}

}  // namespace detail

// One tensor of a safetensors header.
struct SafetensorsEntry {
  std::string name;
  std::string dtype_name;           // as in the file: "F32", "BF16", ...
  std::optional<DType> dtype;       // empty for valid dtypes qlora cannot hold (I64, BOOL, F8_*)
  std::vector<std::int64_t> dims;   // any rank; Tensor shapes hold up to 4
  std::uint64_t begin = 0, end = 0; // relative to the data section

  Shape shape() const {
    QLORA_CHECK(dims.size() <= std::size_t(Shape::kMaxRank),
                "tensor " + name + " has rank " + std::to_string(dims.size()) + "; qlora tensors hold at most 4");
    Shape s;
    for (std::int64_t d : dims) s = s.appended(d);
    return s;
  }
};

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path) : file_(std::make_shared<MappedFile>(path)) {
    const std::string where = path.string();
    QLORA_CHECK(file_->size() >= 8, where + " is too short to be a safetensors file (" +
                                        std::to_string(file_->size()) + " bytes, the header length alone is 8)");
    std::uint64_t header_len = 0;
    std::memcpy(&header_len, file_->data(), 8);
    QLORA_CHECK(header_len <= detail::kMaxSafetensorsHeader,
                where + ": header length " + std::to_string(header_len) + " exceeds the 100 MB limit (corrupt file?)");
    QLORA_CHECK(header_len <= file_->size() - 8, where + ": header length " + std::to_string(header_len) +
                                                     " runs past the end of the file (" +
                                                     std::to_string(file_->size()) + " bytes): truncated file?");
    data_start_ = 8 + header_len;
    const std::uint64_t data_size = file_->size() - data_start_;
    const std::string_view text(reinterpret_cast<const char*>(file_->data()) + 8, header_len);

    // Duplicate keys are legal JSON that nlohmann would silently collapse: catch them while parsing.
    std::string duplicate;
    std::set<std::string> seen;
    const auto on_event = [&](int depth, nlohmann::ordered_json::parse_event_t event, nlohmann::ordered_json& parsed) {
      if (depth == 1 && event == nlohmann::ordered_json::parse_event_t::key && parsed.is_string() &&
          !seen.insert(parsed.get<std::string>()).second && duplicate.empty())
        duplicate = parsed.get<std::string>();
      return true;
    };
    nlohmann::ordered_json header;
    try {
      header = nlohmann::ordered_json::parse(text.begin(), text.end(), on_event, true);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": the safetensors header is not valid JSON: " + e.what());
    }
    QLORA_CHECK(duplicate.empty(), where + ": tensor " + duplicate + " appears twice in the header");
    QLORA_CHECK(header.is_object(), where + ": the safetensors header is not a JSON object");

    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        QLORA_CHECK(it.value().is_object(), where + ": __metadata__ is not an object");
        for (auto m = it.value().begin(); m != it.value().end(); ++m) {
          QLORA_CHECK(m.value().is_string(), where + ": __metadata__ value of '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      entries_.push_back(parse_entry(where, it.key(), it.value(), data_size));
    }
    for (std::size_t i = 0; i < entries_.size(); ++i) index_[entries_[i].name] = i;

    // No two tensors may share bytes (empty tensors occupy none).
    std::vector<const SafetensorsEntry*> by_offset;
    for (const auto& e : entries_)
      if (e.end > e.begin) by_offset.push_back(&e);
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
      QLORA_CHECK(by_offset[i]->begin >= by_offset[i - 1]->end,
                  where + ": tensors " + by_offset[i - 1]->name + " and " + by_offset[i]->name +
                      " overlap (data_offsets [" + std::to_string(by_offset[i - 1]->begin) + ", " +
                      std::to_string(by_offset[i - 1]->end) + ") and [" + std::to_string(by_offset[i]->begin) +
                      ", " + std::to_string(by_offset[i]->end) + "))");
  }

  const std::filesystem::path& path() const { return file_->path(); }
  // Tensors in header order.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& e : entries_) out.push_back(e.name);
    return out;
  }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const SafetensorsEntry& entry(const std::string& name) const {
    const auto it = index_.find(name);
    QLORA_CHECK(it != index_.end(), "tensor " + name + " is not in " + path().string());
    return entries_[it->second];
  }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The stored bytes of a tensor (inside the mapping).
  std::span<const std::byte> bytes(const std::string& name) const {
    const auto& e = entry(name);
    return {file_->data() + data_start_ + e.begin, std::size_t(e.end - e.begin)};
  }

  // The tensor as `dtype` (default: as stored) on the host. Zero-copy when no conversion is needed and the
  // bytes are aligned for the element type; the view keeps the file mapped until it is released.
  Tensor load(const std::string& name, std::optional<DType> dtype = std::nullopt) const {
    const auto& e = entry(name);
    const std::string what = "tensor " + name + " in " + path().string();
    QLORA_CHECK(e.dtype.has_value(), what + " has dtype " + e.dtype_name + ", which qlora cannot read");
    const DType stored = *e.dtype;
    const DType want = dtype.value_or(stored);
    const Shape shape = e.shape();
    std::byte* p = file_->data() + data_start_ + e.begin;
    if (want == stored && reinterpret_cast<std::uintptr_t>(p) % dtype_size(stored) == 0) {
      std::shared_ptr<const MappedFile> keep = file_;
      return Tensor::wrap(p, shape, stored, Device::cpu(), [keep](void*) {});
    }
    return detail::convert_bytes(p, stored, shape, want, what);
  }

 private:
  static SafetensorsEntry parse_entry(const std::string& where, const std::string& name,
                                      const nlohmann::ordered_json& info, std::uint64_t data_size) {
    const std::string what = where + ": tensor " + name;
    QLORA_CHECK(info.is_object(), what + ": header entry is not an object");
    QLORA_CHECK(info.contains("dtype") && info["dtype"].is_string(), what + ": missing or non-string \"dtype\"");
    QLORA_CHECK(info.contains("shape") && info["shape"].is_array(), what + ": missing or non-array \"shape\"");
    QLORA_CHECK(info.contains("data_offsets") && info["data_offsets"].is_array() && info["data_offsets"].size() == 2,
                what + ": \"data_offsets\" must be an array [begin, end]");
    SafetensorsEntry e;
    e.name = name;
    e.dtype_name = info["dtype"].get<std::string>();
    const auto* dt = detail::find_safetensors_dtype(e.dtype_name);
    QLORA_CHECK(dt != nullptr, what + ": unknown dtype '" + e.dtype_name + "'");
    e.dtype = dt->dtype;
    std::uint64_t numel = 1;
    for (const auto& d : info["shape"]) {
      QLORA_CHECK(d.is_number_unsigned(), what + ": shape " + info["shape"].dump() + " has a non-integer or negative dimension");
      const std::uint64_t v = d.get<std::uint64_t>();
      QLORA_CHECK(v == 0 || numel <= (std::uint64_t(1) << 62) / v, what + ": shape " + info["shape"].dump() + " is too large");
      numel *= v;
      e.dims.push_back(std::int64_t(v));
    }
    for (const auto& o : info["data_offsets"])
      QLORA_CHECK(o.is_number_unsigned(), what + ": data_offsets " + info["data_offsets"].dump() + " are not non-negative integers");
    e.begin = info["data_offsets"][0].get<std::uint64_t>();
    e.end = info["data_offsets"][1].get<std::uint64_t>();
    const std::string offsets = "data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + "]";
    QLORA_CHECK(e.begin <= e.end, what + ": " + offsets + " end before they begin");
    QLORA_CHECK(e.end <= data_size, what + ": " + offsets + " lie outside the data section (" +
                                        std::to_string(data_size) + " bytes): truncated file?");
    const std::uint64_t needed = numel * dt->size;
    QLORA_CHECK(e.end - e.begin == needed, what + ": " + offsets + " hold " + std::to_string(e.end - e.begin) +
                                               " bytes but shape " + dims_str(e.dims) + " of " +
                                               e.dtype_name + " needs " + std::to_string(needed));
    return e;
  }

  std::shared_ptr<MappedFile> file_;
  std::uint64_t data_start_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one .safetensors file, or a directory holding model.safetensors or a sharded set indexed
// by model.safetensors.index.json ({"metadata": {...}, "weight_map": {tensor: shard file}}).
class SafetensorsCheckpoint {
 public:
  explicit SafetensorsCheckpoint(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    if (!fs::is_directory(path)) {
      add_shard(path);
      for (const auto& name : shards_[0]->names()) owner_[name] = 0;
      return;
    }
    const fs::path index = path / "model.safetensors.index.json";
    if (!fs::exists(index)) {
      const fs::path single = path / "model.safetensors";
      QLORA_CHECK(fs::exists(single), "no model.safetensors or model.safetensors.index.json in " + path.string());
      add_shard(single);
      for (const auto& name : shards_[0]->names()) owner_[name] = 0;
      return;
    }
    const MappedFile index_file(index);
    nlohmann::json j;
    try {
      const char* text = reinterpret_cast<const char*>(index_file.data());
      j = nlohmann::json::parse(text, text + index_file.size());
    } catch (const nlohmann::json::exception& e) {
      throw Error(index.string() + " is not valid JSON: " + e.what());
    }
    QLORA_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
                index.string() + " has no \"weight_map\" object");
    std::map<std::string, std::size_t> shard_of_file;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      QLORA_CHECK(it.value().is_string(), index.string() + ": weight_map entry of " + it.key() + " is not a file name");
      const std::string file = it.value().get<std::string>();
      QLORA_CHECK(fs::path(file).filename() == fs::path(file),
                  index.string() + ": shard '" + file + "' of tensor " + it.key() + " is not a plain file name");
      auto [pos, inserted] = shard_of_file.emplace(file, shards_.size());
      if (inserted) add_shard(path / file);
      QLORA_CHECK(shards_[pos->second]->contains(it.key()),
                  index.string() + " places tensor " + it.key() + " in " + file + ", which does not hold it");
      owner_[it.key()] = pos->second;
    }
  }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, shard] : owner_) out.push_back(name);
    return out;
  }
  bool contains(const std::string& name) const { return owner_.count(name) != 0; }
  const SafetensorsFile& file_of(const std::string& name) const {
    const auto it = owner_.find(name);
    QLORA_CHECK(it != owner_.end(), "tensor " + name + " is not in the checkpoint " + describe());
    return *shards_[it->second];
  }
  const SafetensorsEntry& entry(const std::string& name) const { return file_of(name).entry(name); }
  Tensor load(const std::string& name, std::optional<DType> dtype = std::nullopt) const {
    return file_of(name).load(name, dtype);
  }
  const std::vector<std::unique_ptr<SafetensorsFile>>& shards() const { return shards_; }
  // __metadata__ of all shards merged (the first shard's value wins for a repeated key).
  std::map<std::string, std::string> metadata() const {
    std::map<std::string, std::string> out;
    for (const auto& s : shards_) out.insert(s->metadata().begin(), s->metadata().end());
    return out;
  }
  std::string describe() const {
    return shards_.size() == 1 ? shards_[0]->path().string()
                               : shards_[0]->path().parent_path().string() + " (" + std::to_string(shards_.size()) + " shards)";
  }

 private:
  void add_shard(const std::filesystem::path& p) { shards_.push_back(std::make_unique<SafetensorsFile>(p)); }

  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, std::size_t> owner_;
};

// Writes tensors (any device; copied to the host one at a time) in the given order, with __metadata__.
inline void write_safetensors(const std::filesystem::path& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    QLORA_CHECK(name != "__metadata__", "cannot write " + path.string() + ": '__metadata__' is not a tensor name");
    QLORA_CHECK(seen.insert(name).second, "cannot write " + path.string() + ": tensor " + name + " is given twice");
    QLORA_CHECK(t.defined(), "cannot write " + path.string() + ": tensor " + name + " is undefined");
    nlohmann::ordered_json dims = nlohmann::ordered_json::array();
    for (int i = 0; i < t.rank(); ++i) dims.push_back(t.dim(i));
    header[name] = {{"dtype", std::string(detail::safetensors_name_of(t.dtype()))},
                    {"shape", dims},
                    {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  write_file_atomically(path, [&](AtomicFileWriter& out) {
    out.write_value<std::uint64_t>(text.size());
    out.write(text);
    for (const auto& [name, t] : tensors) {
      const Tensor host = t.to(Device::cpu());
      out.write(host.data(), host.nbytes());
    }
  });
}

}  // namespace qlora::io
