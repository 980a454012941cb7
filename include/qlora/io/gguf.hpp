#pragma once
// GGUF v3 (ggml docs/gguf.md), the single-file format of llama.cpp: all integers little-endian,
//   "GGUF" u32 version, u64 tensor_count, u64 metadata_kv_count,
//   metadata: {string key, u32 value type, value} where string = {u64 length, bytes} and
//             array = {u32 element type, u64 count, elements} (arrays may nest),
//   tensor infos: {string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset},
//   padding to general.alignment (default 32), then the data section; each offset is relative to its start
//   and a multiple of the alignment. ne[0] is the innermost (contiguous) dimension, so a row-major shape is
//   ne reversed: an HF linear weight [out, in] is stored with ne = {in, out}.
//
// The reader maps the file, checks every length and extent against the file size, and dequantizes on
// request (F32/F16/BF16 as zero-copy views, Q8_0/Q4_0/Q4_1 through cpu/gguf_blocks.hpp). GgufLlama reads
// the `llama` architecture into a LlamaConfig and serves tensors under HF names with W_q/W_k rows put back
// into HF's rotate-half order: llama.cpp's convert_hf_to_gguf.py permutes them into interleaved pairs
// (see rope_rows_interleaved_to_half in hf_config.hpp). GgufTokenizerData exposes the embedded vocabulary.
// GgufWriter writes metadata and F32/F16/BF16/Q8_0/Q4_1 tensors, atomically.

#include <algorithm>
#include <charconv>
#include <cmath>
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
#include <variant>
#include <vector>

#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/cpu/gguf_blocks.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora::io {

// Metadata value types (gguf_metadata_value_type).
enum class GgufType : std::uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7, string = 8, array = 9,
  u64 = 10, i64 = 11, f64 = 12
};

inline std::string_view gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::u8: return "u8";
    case GgufType::i8: return "i8";
    case GgufType::u16: return "u16";
    case GgufType::i16: return "i16";
    case GgufType::u32: return "u32";
    case GgufType::i32: return "i32";
    case GgufType::f32: return "f32";
    case GgufType::boolean: return "bool";
    case GgufType::string: return "string";
    case GgufType::array: return "array";
    case GgufType::u64: return "u64";
    case GgufType::i64: return "i64";
    case GgufType::f64: return "f64";
  }
  return "?";
}

// One metadata value. Scalars keep their GGUF type (so a writer reproduces it) and hold the number in the
// widest C++ type of its kind; arrays hold their elements, all of element_type.
struct GgufValue {
  GgufType type = GgufType::u32;
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string> scalar;
  GgufType element_type = GgufType::u8;
  std::vector<GgufValue> elements;

  static GgufValue of(GgufType t, std::uint64_t v) { return {t, v, GgufType::u8, {}}; }
  static GgufValue u32(std::uint32_t v) { return of(GgufType::u32, v); }
  static GgufValue u64(std::uint64_t v) { return of(GgufType::u64, v); }
  static GgufValue i32(std::int32_t v) { return {GgufType::i32, std::int64_t(v), GgufType::u8, {}}; }
  static GgufValue i64(std::int64_t v) { return {GgufType::i64, v, GgufType::u8, {}}; }
  static GgufValue f32(float v) { return {GgufType::f32, double(v), GgufType::u8, {}}; }
  static GgufValue f64(double v) { return {GgufType::f64, v, GgufType::u8, {}}; }
  static GgufValue boolean(bool v) { return {GgufType::boolean, v, GgufType::u8, {}}; }
  static GgufValue string(std::string v) { return {GgufType::string, std::move(v), GgufType::u8, {}}; }
  static GgufValue array(GgufType element_type, std::vector<GgufValue> elements) {
    for (const auto& e : elements)
      QLORA_CHECK(e.type == element_type, "GGUF array of " + std::string(gguf_type_name(element_type)) +
                                              " given an element of type " + std::string(gguf_type_name(e.type)));
    return {GgufType::array, std::uint64_t(0), element_type, std::move(elements)};
  }
  template <class T, class Make>
  static GgufValue array_of(GgufType element_type, const std::vector<T>& values, Make make) {
    std::vector<GgufValue> e;
    e.reserve(values.size());
    for (const auto& v : values) e.push_back(make(v));
    return {GgufType::array, std::uint64_t(0), element_type, std::move(e)};
  }
  static GgufValue strings(const std::vector<std::string>& v) { return array_of(GgufType::string, v, [](const std::string& s) { return string(s); }); }
  static GgufValue f32s(const std::vector<float>& v) { return array_of(GgufType::f32, v, [](float x) { return f32(x); }); }
  static GgufValue i32s(const std::vector<std::int32_t>& v) { return array_of(GgufType::i32, v, [](std::int32_t x) { return i32(x); }); }

  bool is_integer() const {
    return type == GgufType::u8 || type == GgufType::i8 || type == GgufType::u16 || type == GgufType::i16 ||
           type == GgufType::u32 || type == GgufType::i32 || type == GgufType::u64 || type == GgufType::i64;
  }
  bool is_float() const { return type == GgufType::f32 || type == GgufType::f64; }

  // Accessors; `what` names the value in the error (file and key).
  std::int64_t as_int(const std::string& what) const {
    QLORA_CHECK(is_integer(), what + " is a " + std::string(gguf_type_name(type)) + ", expected an integer");
    if (const auto* u = std::get_if<std::uint64_t>(&scalar)) {
      QLORA_CHECK(*u <= std::uint64_t(INT64_MAX), what + " = " + std::to_string(*u) + " is out of range");
      return std::int64_t(*u);
    }
    return std::get<std::int64_t>(scalar);
  }
  double as_double(const std::string& what) const {
    if (is_integer()) return double(as_int(what));
    QLORA_CHECK(is_float(), what + " is a " + std::string(gguf_type_name(type)) + ", expected a number");
    return std::get<double>(scalar);
  }
  bool as_bool(const std::string& what) const {
    QLORA_CHECK(type == GgufType::boolean, what + " is a " + std::string(gguf_type_name(type)) + ", expected a bool");
    return std::get<bool>(scalar);
  }
  const std::string& as_string(const std::string& what) const {
    QLORA_CHECK(type == GgufType::string, what + " is a " + std::string(gguf_type_name(type)) + ", expected a string");
    return std::get<std::string>(scalar);
  }
  const std::vector<GgufValue>& as_array(const std::string& what) const {
    QLORA_CHECK(type == GgufType::array, what + " is a " + std::string(gguf_type_name(type)) + ", expected an array");
    return elements;
  }
  std::vector<std::string> as_strings(const std::string& what) const {
    std::vector<std::string> out;
    for (const auto& e : as_array(what)) out.push_back(e.as_string(what + " element"));
    return out;
  }
  std::vector<float> as_floats(const std::string& what) const {
    std::vector<float> out;
    for (const auto& e : as_array(what)) out.push_back(float(e.as_double(what + " element")));
    return out;
  }
  std::vector<std::int64_t> as_ints(const std::string& what) const {
    std::vector<std::int64_t> out;
    for (const auto& e : as_array(what)) out.push_back(e.as_int(what + " element"));
    return out;
  }
};

// Tensor types (enum ggml_type); the numbers are part of the format.
enum class GgmlType : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10, Q3_K = 11,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30
};

struct GgmlTypeInfo {
  GgmlType type;
  std::string_view name;
  std::int64_t block_values;  // values per block
  std::int64_t block_bytes;   // bytes per block
};

// Block geometry of the types whose layout is known here (ggml.c type_traits); others are listed by
// number only, and a tensor of such a type can be opened but not loaded.
inline const GgmlTypeInfo* ggml_type_info(std::uint32_t id) {
  static const GgmlTypeInfo table[] = {
      {GgmlType::F32, "F32", 1, 4},        {GgmlType::F16, "F16", 1, 2},       {GgmlType::Q4_0, "Q4_0", 32, 18},
      {GgmlType::Q4_1, "Q4_1", 32, 20},    {GgmlType::Q5_0, "Q5_0", 32, 22},   {GgmlType::Q5_1, "Q5_1", 32, 24},
      {GgmlType::Q8_0, "Q8_0", 32, 34},    {GgmlType::Q8_1, "Q8_1", 32, 36},   {GgmlType::Q2_K, "Q2_K", 256, 84},
      {GgmlType::Q3_K, "Q3_K", 256, 110},  {GgmlType::Q4_K, "Q4_K", 256, 144}, {GgmlType::Q5_K, "Q5_K", 256, 176},
      {GgmlType::Q6_K, "Q6_K", 256, 210},  {GgmlType::Q8_K, "Q8_K", 256, 292}, {GgmlType::I8, "I8", 1, 1},
      {GgmlType::I16, "I16", 1, 2},        {GgmlType::I32, "I32", 1, 4},       {GgmlType::I64, "I64", 1, 8},
      {GgmlType::F64, "F64", 1, 8},        {GgmlType::BF16, "BF16", 1, 2}};
  for (const auto& t : table)
    if (std::uint32_t(t.type) == id) return &t;
  return nullptr;
}
inline std::string ggml_type_name(std::uint32_t id) {
  const auto* info = ggml_type_info(id);
  return info ? std::string(info->name) : "type " + std::to_string(id);
}

struct GgufTensorInfo {
  std::string name;
  std::vector<std::uint64_t> ne;  // GGUF order: ne[0] innermost
  std::uint32_t type = 0;         // a GgmlType number
  std::uint64_t offset = 0;       // in the data section
  std::uint64_t nbytes = 0;       // 0 when the type's layout is unknown

  // Row-major dimensions (ne reversed).
  std::vector<std::int64_t> dims() const { return {ne.rbegin(), ne.rend()}; }
  Shape shape() const {
    Shape s;
    for (auto it = ne.rbegin(); it != ne.rend(); ++it) s = s.appended(std::int64_t(*it));
    return s;
  }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : ne) n *= std::int64_t(d);
    return n;
  }
};

namespace detail {

inline std::uint64_t align_up(std::uint64_t x, std::uint64_t a) { return (x + a - 1) / a * a; }

// The double with the shortest decimal form that reads back as `f`: an f32 1e-5 becomes the double 1e-5
// (as config.json writes it), not 9.99999974738e-06. Exact for the float, which is what GGUF stores.
inline double shortest_double(float f) {
  if (!std::isfinite(f)) return double(f);
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof buf, f).ptr;
  double d = 0;
  std::from_chars(buf, end, d);
  return d;
}

// Sequential reads over the mapping; each read names what it reads when the file ends too early.
class GgufCursor {
 public:
  GgufCursor(const MappedFile& file, std::uint64_t pos) : file_(file), pos_(pos) {}
  std::uint64_t pos() const { return pos_; }
  std::uint64_t remaining() const { return file_.size() - pos_; }

  template <class T>
  T read(const std::string& what) {
    T v;
    std::memcpy(&v, take(sizeof(T), what), sizeof(T));
    return v;
  }
  std::string read_string(const std::string& what) {
    const auto n = read<std::uint64_t>(what + " (length)");
    const std::byte* p = take(n, what);
    return std::string(reinterpret_cast<const char*>(p), std::size_t(n));
  }
  GgufValue read_value(GgufType type, const std::string& what, int depth = 0) {
    switch (type) {
      case GgufType::u8: return GgufValue::of(type, read<std::uint8_t>(what));
      case GgufType::u16: return GgufValue::of(type, read<std::uint16_t>(what));
      case GgufType::u32: return GgufValue::of(type, read<std::uint32_t>(what));
      case GgufType::u64: return GgufValue::of(type, read<std::uint64_t>(what));
      case GgufType::i8: return {type, std::int64_t(read<std::int8_t>(what)), GgufType::u8, {}};
      case GgufType::i16: return {type, std::int64_t(read<std::int16_t>(what)), GgufType::u8, {}};
      case GgufType::i32: return {type, std::int64_t(read<std::int32_t>(what)), GgufType::u8, {}};
      case GgufType::i64: return {type, read<std::int64_t>(what), GgufType::u8, {}};
      case GgufType::f32: return {type, shortest_double(read<float>(what)), GgufType::u8, {}};
      case GgufType::f64: return {type, read<double>(what), GgufType::u8, {}};
      case GgufType::boolean: {
        const auto b = read<std::uint8_t>(what);
        QLORA_CHECK(b <= 1, where() + ": " + what + " is a bool holding " + std::to_string(b));
        return GgufValue::boolean(b != 0);
      }
      case GgufType::string: return GgufValue::string(read_string(what));
      case GgufType::array: {
        QLORA_CHECK(depth < 8, where() + ": " + what + " nests arrays too deeply");
        const auto element_type = read_type(what + " (element type)");
        const auto count = read<std::uint64_t>(what + " (count)");
        // Every element takes at least min_value_bytes: a count beyond the file is corrupt, refuse it before allocating.
        QLORA_CHECK(count <= remaining() / min_value_bytes(element_type),
                    where() + ": " + what + " claims " + std::to_string(count) + " elements of " +
                        std::string(gguf_type_name(element_type)) + " but only " + std::to_string(remaining()) +
                        " bytes remain");
        GgufValue v{GgufType::array, std::uint64_t(0), element_type, {}};
        v.elements.reserve(std::size_t(count));
        for (std::uint64_t i = 0; i < count; ++i) v.elements.push_back(read_value(element_type, what, depth + 1));
        return v;
      }
    }
    throw Error(where() + ": " + what + " has unknown value type " + std::to_string(std::uint32_t(type)));
  }
  GgufType read_type(const std::string& what) {
    const auto t = read<std::uint32_t>(what);
    QLORA_CHECK(t <= 12, where() + ": " + what + " is the unknown value type " + std::to_string(t));
    return GgufType(t);
  }
  std::string where() const { return file_.path().string(); }

  // The fewest bytes a value of `type` takes in the file (a string its length, an array its type and count).
  static std::uint64_t min_value_bytes(GgufType type) {
    switch (type) {
      case GgufType::u8: case GgufType::i8: case GgufType::boolean: return 1;
      case GgufType::u16: case GgufType::i16: return 2;
      case GgufType::u32: case GgufType::i32: case GgufType::f32: return 4;
      case GgufType::u64: case GgufType::i64: case GgufType::f64: case GgufType::string: return 8;
      case GgufType::array: return 12;
    }
    return 1;
  }

 private:
  const std::byte* take(std::uint64_t n, const std::string& what) {
    if (n > remaining())
      throw Error(where() + ": truncated file: " + what + " needs " + std::to_string(n) + " bytes at offset " +
                  std::to_string(pos_) + " but the file has " + std::to_string(file_.size()) + " bytes");
    const std::byte* p = file_.data() + pos_;
    pos_ += n;
    return p;
  }

  const MappedFile& file_;
  std::uint64_t pos_;
};

}  // namespace detail

class GgufFile {
 public:
  static constexpr std::uint32_t kDefaultAlignment = 32;

  explicit GgufFile(const std::filesystem::path& path) : file_(std::make_shared<MappedFile>(path)) {
    const std::string where = path.string();
    detail::GgufCursor in(*file_, 0);
    char magic[4];
    std::memcpy(magic, file_->data(), std::min<std::size_t>(4, file_->size()));
    QLORA_CHECK(file_->size() >= 4 && std::memcmp(magic, "GGUF", 4) == 0, where + " is not a GGUF file (no GGUF magic)");
    in.read<std::uint32_t>("magic");
    version_ = in.read<std::uint32_t>("version");
    QLORA_CHECK(version_ == 2 || version_ == 3,
                where + ": GGUF version " + std::to_string(version_) + " is not supported (2 or 3)");
    const auto tensor_count = in.read<std::uint64_t>("tensor count");
    const auto kv_count = in.read<std::uint64_t>("metadata count");
    // A key-value pair takes at least 12 bytes and a tensor info 24: bound the counts by the file.
    QLORA_CHECK(kv_count <= in.remaining() / 12 && tensor_count <= in.remaining() / 24,
                where + ": truncated or corrupt: " + std::to_string(kv_count) + " metadata entries and " +
                    std::to_string(tensor_count) + " tensors cannot fit in " + std::to_string(file_->size()) + " bytes");
    for (std::uint64_t i = 0; i < kv_count; ++i) {
      const std::string what = "metadata entry " + std::to_string(i);
      std::string key = in.read_string(what + " key");
      const GgufType type = in.read_type("type of metadata " + key);
      GgufValue value = in.read_value(type, "metadata " + key);
      QLORA_CHECK(!metadata_.count(key), where + ": metadata key " + key + " appears twice");
      keys_.push_back(key);
      metadata_.emplace(std::move(key), std::move(value));
    }
    if (has("general.alignment")) {
      const std::int64_t a = get("general.alignment").as_int(where + ": general.alignment");
      QLORA_CHECK(a > 0 && (a & (a - 1)) == 0 && a <= std::int64_t(UINT32_MAX),
                  where + ": general.alignment " + std::to_string(a) + " is not a power of two that fits in 32 bits");
      alignment_ = std::uint32_t(a);
    }
    for (std::uint64_t i = 0; i < tensor_count; ++i) {
      GgufTensorInfo t;
      t.name = in.read_string("name of tensor " + std::to_string(i));
      const std::string what = "tensor " + t.name;
      const auto n_dims = in.read<std::uint32_t>(what + " rank");
      QLORA_CHECK(n_dims >= 1 && n_dims <= 4, where + ": " + what + " has rank " + std::to_string(n_dims) + " (1 to 4)");
      std::uint64_t numel = 1;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        t.ne.push_back(in.read<std::uint64_t>(what + " dimensions"));
        QLORA_CHECK(t.ne.back() < (std::uint64_t(1) << 40) && (t.ne.back() == 0 || numel <= (std::uint64_t(1) << 50) / t.ne.back()),
                    where + ": " + what + " has an impossible dimension " + std::to_string(t.ne.back()));
        numel *= t.ne.back();
      }
      t.type = in.read<std::uint32_t>(what + " type");
      t.offset = in.read<std::uint64_t>(what + " offset");
      QLORA_CHECK(t.offset % alignment_ == 0, where + ": " + what + " offset " + std::to_string(t.offset) +
                                                  " is not a multiple of the alignment " + std::to_string(alignment_));
      if (const auto* info = ggml_type_info(t.type)) {
        QLORA_CHECK(std::int64_t(t.ne[0]) % info->block_values == 0,
                    where + ": " + what + " has rows of " + std::to_string(t.ne[0]) + " values, not a multiple of the " +
                        std::string(info->name) + " block size " + std::to_string(info->block_values));
        t.nbytes = numel / std::uint64_t(info->block_values) * std::uint64_t(info->block_bytes);
      }
      QLORA_CHECK(!tensor_index_.count(t.name), where + ": tensor " + t.name + " appears twice");
      tensor_index_[t.name] = tensors_.size();
      tensors_.push_back(std::move(t));
    }
    data_start_ = detail::align_up(in.pos(), alignment_);
    for (const auto& t : tensors_) {
      // Compared without adding first: a corrupt offset near 2^64 would wrap the sum back into the file.
      QLORA_CHECK(data_start_ <= file_->size() && t.offset <= file_->size() - data_start_ &&
                      t.nbytes <= file_->size() - data_start_ - t.offset,
                  where + ": tensor " + t.name + " data (" + std::to_string(t.nbytes) + " bytes at offset " +
                      std::to_string(t.offset) + " of the data section, which starts at byte " +
                      std::to_string(data_start_) + ") runs past the end of the file (" +
                      std::to_string(file_->size()) + " bytes): truncated file?");
    }
    std::vector<const GgufTensorInfo*> by_offset;
    for (const auto& t : tensors_)
      if (t.nbytes) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < by_offset.size(); ++i)
      QLORA_CHECK(by_offset[i]->offset >= by_offset[i - 1]->offset + by_offset[i - 1]->nbytes,
                  where + ": tensors " + by_offset[i - 1]->name + " and " + by_offset[i]->name + " overlap");
  }

  const std::filesystem::path& path() const { return file_->path(); }
  std::uint32_t version() const { return version_; }
  std::uint32_t alignment() const { return alignment_; }
  std::uint64_t data_start() const { return data_start_; }

  // Metadata keys in file order.
  const std::vector<std::string>& keys() const { return keys_; }
  bool has(const std::string& key) const { return metadata_.count(key) != 0; }
  const GgufValue& get(const std::string& key) const {
    const auto it = metadata_.find(key);
    QLORA_CHECK(it != metadata_.end(), path().string() + " has no metadata key " + key);
    return it->second;
  }
  // Typed lookups; errors name the file and key.
  std::int64_t get_int(const std::string& key) const { return get(key).as_int(what(key)); }
  double get_double(const std::string& key) const { return get(key).as_double(what(key)); }
  const std::string& get_string(const std::string& key) const { return get(key).as_string(what(key)); }
  bool get_bool(const std::string& key) const { return get(key).as_bool(what(key)); }
  std::optional<std::int64_t> find_int(const std::string& key) const {
    return has(key) ? std::optional(get_int(key)) : std::nullopt;
  }
  std::optional<double> find_double(const std::string& key) const {
    return has(key) ? std::optional(get_double(key)) : std::nullopt;
  }
  std::optional<std::string> find_string(const std::string& key) const {
    return has(key) ? std::optional(get_string(key)) : std::nullopt;
  }
  std::optional<bool> find_bool(const std::string& key) const {
    return has(key) ? std::optional(get_bool(key)) : std::nullopt;
  }
  std::string what(const std::string& key) const { return path().string() + ": metadata " + key; }

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return tensor_index_.count(name) != 0; }
  const GgufTensorInfo& tensor(const std::string& name) const {
    const auto it = tensor_index_.find(name);
    QLORA_CHECK(it != tensor_index_.end(), "tensor " + name + " is not in " + path().string());
    return tensors_[it->second];
  }
  std::span<const std::byte> tensor_bytes(const std::string& name) const {
    const auto& t = tensor(name);
    QLORA_CHECK(t.nbytes || t.numel() == 0, "tensor " + name + " in " + path().string() + " has " +
                                                ggml_type_name(t.type) + ", whose layout qlora does not know");
    return {file_->data() + data_start_ + t.offset, std::size_t(t.nbytes)};
  }

  // The tensor on the host as `dtype`. Default: F32/F16/BF16/F64/I8/I32 as stored (a zero-copy view of the
  // mapping), Q8_0/Q4_0/Q4_1 dequantized to f32. Other types are refused with their name.
  Tensor load(const std::string& name, std::optional<DType> dtype = std::nullopt) const {
    const auto& t = tensor(name);
    const std::string what = "tensor " + name + " in " + path().string();
    const Shape shape = t.shape();
    std::byte* p = file_->data() + data_start_ + t.offset;
    // A file with general.alignment 1 or 2 may place data at an address unaligned for its elements (or for
    // the 2-byte scale of a quantized block): such data is copied first, never read through a misaligned pointer.
    std::vector<std::byte> aligned_copy;
    if (reinterpret_cast<std::uintptr_t>(p) % 8 != 0 && t.nbytes > 0) {
      aligned_copy.assign(p, p + t.nbytes);  // std::vector's buffer comes from operator new: 16-byte aligned
      p = aligned_copy.data();
    }
    const auto view = [&](DType stored) {
      if (!aligned_copy.empty()) {
        Tensor copy = Tensor::empty(shape, stored);
        std::memcpy(copy.data(), p, copy.nbytes());
        return dtype && *dtype != stored ? copy.to(*dtype) : copy;
      }
      std::shared_ptr<const MappedFile> keep = file_;
      Tensor v = Tensor::wrap(p, shape, stored, Device::cpu(), [keep](void*) {});
      return dtype && *dtype != stored ? v.to(*dtype) : v;
    };
    const std::int64_t blocks = t.numel() / cpu::kGgufBlockValues;
    Tensor f32;
    switch (GgmlType(t.type)) {
      case GgmlType::F32: return view(DType::f32);
      case GgmlType::F16: return view(DType::f16);
      case GgmlType::BF16: return view(DType::bf16);
      case GgmlType::F64: return view(DType::f64);
      case GgmlType::I8:
      case GgmlType::I32: {
        const DType stored = GgmlType(t.type) == GgmlType::I8 ? DType::i8 : DType::i32;
        QLORA_CHECK(!dtype || *dtype == stored, what + " holds integers (" + ggml_type_name(t.type) +
                                                    ") and cannot be converted to " + std::string(dtype_name(*dtype)));
        return view(stored);
      }
      case GgmlType::Q8_0:
        f32 = Tensor::empty(shape);
        cpu::dequantize_q8_0(reinterpret_cast<const cpu::BlockQ8_0*>(p), f32.data<float>(), blocks);
        break;
      case GgmlType::Q4_0:
        f32 = Tensor::empty(shape);
        cpu::dequantize_q4_0(reinterpret_cast<const cpu::BlockQ4_0*>(p), f32.data<float>(), blocks);
        break;
      case GgmlType::Q4_1:
        f32 = Tensor::empty(shape);
        cpu::dequantize_q4_1(reinterpret_cast<const cpu::BlockQ4_1*>(p), f32.data<float>(), blocks);
        break;
      default:
        throw Error(what + " has type " + ggml_type_name(t.type) +
                    ", which qlora cannot read (supported: F32, F16, BF16, F64, I8, I32, Q8_0, Q4_0, Q4_1)");
    }
    return dtype && *dtype != DType::f32 ? f32.to(*dtype) : f32;
  }

 private:
  std::shared_ptr<MappedFile> file_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = kDefaultAlignment;
  std::uint64_t data_start_ = 0;
  std::vector<std::string> keys_;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t> tensor_index_;
};

// ---- llama architecture ---------------------------------------------------------------------------------

// GGUF tensor name -> HF Llama name (llama.cpp's LLM_TENSOR_NAMES for LLM_ARCH_LLAMA); nullopt if unknown.
inline std::optional<std::string> gguf_to_hf_name(std::string_view name) {
  static const std::pair<std::string_view, std::string_view> global[] = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"}};
  static const std::pair<std::string_view, std::string_view> layer[] = {
      {"attn_norm.weight", "input_layernorm.weight"},    {"attn_q.weight", "self_attn.q_proj.weight"},
      {"attn_k.weight", "self_attn.k_proj.weight"},      {"attn_v.weight", "self_attn.v_proj.weight"},
      {"attn_output.weight", "self_attn.o_proj.weight"}, {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"ffn_gate.weight", "mlp.gate_proj.weight"},       {"ffn_up.weight", "mlp.up_proj.weight"},
      {"ffn_down.weight", "mlp.down_proj.weight"}};
  for (const auto& [g, h] : global)
    if (name == g) return std::string(h);
  if (!name.starts_with("blk.")) return std::nullopt;
  const std::size_t dot = name.find('.', 4);
  if (dot == std::string_view::npos || dot == 4) return std::nullopt;
  const std::string_view index = name.substr(4, dot - 4), rest = name.substr(dot + 1);
  if (!std::all_of(index.begin(), index.end(), [](char c) { return c >= '0' && c <= '9'; })) return std::nullopt;
  for (const auto& [g, h] : layer)
    if (rest == g) return "model.layers." + std::string(index) + "." + std::string(h);
  return std::nullopt;
}

// HF Llama name -> GGUF tensor name (the inverse, for writers).
inline std::optional<std::string> hf_to_gguf_name(std::string_view name) {
  static const std::pair<std::string_view, std::string_view> global[] = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"}};
  static const std::pair<std::string_view, std::string_view> layer[] = {
      {"input_layernorm.weight", "attn_norm.weight"},    {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"}, {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},       {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"}};
  for (const auto& [h, g] : global)
    if (name == h) return std::string(g);
  constexpr std::string_view prefix = "model.layers.";
  if (!name.starts_with(prefix)) return std::nullopt;
  const std::size_t dot = name.find('.', prefix.size());
  if (dot == std::string_view::npos || dot == prefix.size()) return std::nullopt;
  const std::string_view index = name.substr(prefix.size(), dot - prefix.size()), rest = name.substr(dot + 1);
  if (!std::all_of(index.begin(), index.end(), [](char c) { return c >= '0' && c <= '9'; })) return std::nullopt;
  for (const auto& [h, g] : layer)
    if (rest == h) return "blk." + std::string(index) + "." + std::string(g);
  return std::nullopt;
}

// The LlamaConfig of a GGUF file of architecture `llama` (keys as llama.cpp's convert_hf_to_gguf.py writes them).
inline LlamaConfig gguf_llama_config(const GgufFile& f) {
  const std::string where = f.path().string();
  const std::string arch = f.find_string("general.architecture").value_or("(none)");
  QLORA_CHECK(arch == "llama", where + ": general.architecture '" + arch + "' is not supported (only llama)");
  LlamaConfig c;
  c.hidden_size = f.get_int("llama.embedding_length");
  c.intermediate_size = f.get_int("llama.feed_forward_length");
  c.num_hidden_layers = f.get_int("llama.block_count");
  c.num_attention_heads = f.get_int("llama.attention.head_count");
  c.num_key_value_heads = f.find_int("llama.attention.head_count_kv").value_or(c.num_attention_heads);
  QLORA_CHECK(c.num_attention_heads > 0, where + ": llama.attention.head_count must be positive");
  c.head_dim = f.find_int("llama.attention.key_length").value_or(c.hidden_size / c.num_attention_heads);
  c.max_position_embeddings = f.get_int("llama.context_length");
  c.rms_norm_eps = f.get_double("llama.attention.layer_norm_rms_epsilon");
  c.rope_theta = f.find_double("llama.rope.freq_base").value_or(10000.0);
  if (const auto n = f.find_int("llama.vocab_size")) c.vocab_size = *n;
  else if (f.has("tokenizer.ggml.tokens")) c.vocab_size = std::int64_t(f.get("tokenizer.ggml.tokens").as_array(f.what("tokenizer.ggml.tokens")).size());
  else if (f.contains("token_embd.weight")) c.vocab_size = f.tensor("token_embd.weight").dims()[0];
  else throw Error(where + ": no vocabulary size (llama.vocab_size, tokenizer.ggml.tokens or token_embd.weight)");
  const std::string scaling = f.find_string("llama.rope.scaling.type").value_or("none");
  if (scaling == "linear") c.rope_scaling = RopeScaling{"linear", f.get_double("llama.rope.scaling.factor")};
  else QLORA_CHECK(scaling == "none", where + ": llama.rope.scaling.type '" + scaling + "' is not supported (none or linear)");
  // llama.cpp stores Llama 3.1 rope scaling as a per-frequency tensor, not as parameters.
  QLORA_CHECK(!f.contains("rope_freqs.weight"), where + ": rope_freqs.weight (Llama 3.1 RoPE scaling as a tensor) is not supported");
  // llama.cpp ties the output layer to the embedding when the file has no output.weight.
  c.tie_word_embeddings = f.tensors().empty() ? false : !f.contains("output.weight");
  c.bos_token_id = f.find_int("tokenizer.ggml.bos_token_id");
  c.eos_token_ids.clear();
  if (const auto eos = f.find_int("tokenizer.ggml.eos_token_id")) c.eos_token_ids.push_back(*eos);
  c.torch_dtype = "float32";  // tensors are dequantized to f32 on load
  c.validate(where);
  return c;
}

// A llama GGUF model: config plus lazily loaded tensors under HF names, in HF's RoPE row order.
class GgufLlama {
 public:
  explicit GgufLlama(const std::filesystem::path& path) : file_(path), config_(gguf_llama_config(file_)) {
    for (const auto& t : file_.tensors()) {
      const auto hf = gguf_to_hf_name(t.name);
      QLORA_CHECK(hf.has_value(), path.string() + ": tensor " + t.name + " is not part of a llama model qlora knows");
      hf_to_gguf_[*hf] = t.name;
    }
    // A block has 9 tensors: a header claiming more blocks than the file holds is refused before the expected
    // tensor list (one entry per tensor of every block) is built (fuzz smoke: block_count 10^8 ran out of memory).
    const std::size_t blocks = std::size_t(std::max<std::int64_t>(config_.num_hidden_layers, 0));
    QLORA_CHECK(blocks <= file_.tensors().size() / 9,
                path.string() + ": llama.block_count " + std::to_string(config_.num_hidden_layers) + " needs " +
                    std::to_string(blocks) + " x 9 block tensors, but the file holds " +
                    std::to_string(file_.tensors().size()) + " tensors");
    check_llama_tensors(
        config_,
        [&](const std::string& hf) -> std::optional<std::vector<std::int64_t>> {
          const auto it = hf_to_gguf_.find(hf);
          if (it == hf_to_gguf_.end()) return std::nullopt;
          return file_.tensor(it->second).dims();
        },
        path.string(), "the GGUF metadata");
  }

  const GgufFile& file() const { return file_; }
  const LlamaConfig& config() const { return config_; }
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& spec : llama_tensor_specs(config_)) out.push_back(spec.name);
    return out;
  }
  bool contains(const std::string& hf_name) const { return hf_to_gguf_.count(hf_name) != 0; }

  Tensor load(const std::string& hf_name, DType dtype = DType::f32) const {
    const auto it = hf_to_gguf_.find(hf_name);
    QLORA_CHECK(it != hf_to_gguf_.end(), "tensor " + hf_name + " is not in " + file_.path().string());
    const bool is_q = hf_name.ends_with("self_attn.q_proj.weight"), is_k = hf_name.ends_with("self_attn.k_proj.weight");
    if (!is_q && !is_k) return file_.load(it->second, dtype);
    // Undo convert_hf_to_gguf.py's permute(): q over head_count heads, k over head_count_kv heads.
    const Tensor stored = file_.load(it->second, dtype);
    return rope_rows_interleaved_to_half(stored, is_q ? config_.num_attention_heads : config_.num_key_value_heads,
                                         it->second + " in " + file_.path().string());
  }

 private:
  GgufFile file_;
  LlamaConfig config_;
  std::map<std::string, std::string> hf_to_gguf_;
};

// The tokenizer a GGUF file embeds (tokenizer.ggml.*), as plain vectors. Absent keys stay empty.
struct GgufTokenizerData {
  std::string model;  // "llama" (SentencePiece scores) or "gpt2" (BPE merges), ...
  std::string pre;    // pre-tokenizer name, "" if absent
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<std::int32_t> token_types;  // 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
  std::vector<std::string> merges;
  std::optional<std::int64_t> bos_id, eos_id, unknown_id, padding_id;
  std::optional<bool> add_bos, add_eos;
};

inline GgufTokenizerData gguf_tokenizer(const GgufFile& f) {
  GgufTokenizerData t;
  t.model = f.get_string("tokenizer.ggml.model");
  t.pre = f.find_string("tokenizer.ggml.pre").value_or("");
  t.tokens = f.get("tokenizer.ggml.tokens").as_strings(f.what("tokenizer.ggml.tokens"));
  const auto check_length = [&](std::size_t n, const char* key) {
    QLORA_CHECK(n == t.tokens.size(), f.what(key) + " has " + std::to_string(n) + " entries for " +
                                          std::to_string(t.tokens.size()) + " tokens");
  };
  if (f.has("tokenizer.ggml.scores")) {
    t.scores = f.get("tokenizer.ggml.scores").as_floats(f.what("tokenizer.ggml.scores"));
    check_length(t.scores.size(), "tokenizer.ggml.scores");
  }
  if (f.has("tokenizer.ggml.token_type")) {
    for (std::int64_t v : f.get("tokenizer.ggml.token_type").as_ints(f.what("tokenizer.ggml.token_type")))
      t.token_types.push_back(std::int32_t(v));
    check_length(t.token_types.size(), "tokenizer.ggml.token_type");
  }
  if (f.has("tokenizer.ggml.merges")) t.merges = f.get("tokenizer.ggml.merges").as_strings(f.what("tokenizer.ggml.merges"));
  t.bos_id = f.find_int("tokenizer.ggml.bos_token_id");
  t.eos_id = f.find_int("tokenizer.ggml.eos_token_id");
  t.unknown_id = f.find_int("tokenizer.ggml.unknown_token_id");
  t.padding_id = f.find_int("tokenizer.ggml.padding_token_id");
  t.add_bos = f.find_bool("tokenizer.ggml.add_bos_token");
  t.add_eos = f.find_bool("tokenizer.ggml.add_eos_token");
  for (const auto& id : {t.bos_id, t.eos_id, t.unknown_id, t.padding_id})
    QLORA_CHECK(!id || (*id >= 0 && *id < std::int64_t(t.tokens.size())),
                f.path().string() + ": special token id " + std::to_string(id.value_or(0)) + " is outside the vocabulary");
  return t;
}

// ---- writer ---------------------------------------------------------------------------------------------

class GgufWriter {
 public:
  explicit GgufWriter(std::uint32_t alignment = GgufFile::kDefaultAlignment) : alignment_(alignment) {
    QLORA_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, "GGUF alignment " + std::to_string(alignment) + " is not a power of two");
    if (alignment != GgufFile::kDefaultAlignment) set("general.alignment", GgufValue::u32(alignment));
  }

  // Sets (or replaces) a metadata entry; entries are written in the order first set.
  void set(const std::string& key, GgufValue value) {
    for (auto& [k, v] : metadata_)
      if (k == key) {
        v = std::move(value);
        return;
      }
    metadata_.emplace_back(key, std::move(value));
  }

  // A float tensor (row-major; any device, any floating dtype), encoded as `type` (F32, F16, BF16, Q8_0 or
  // Q4_1; quantized types need rows of a multiple of 32 values). NaN or infinity is refused.
  void add_tensor(const std::string& name, const Tensor& values, GgmlType type) {
    QLORA_CHECK(values.defined() && is_floating(values.dtype()), "GGUF tensor " + name + " must be a floating tensor");
    const Tensor x = values.to(Device::cpu()).to(DType::f32);
    const std::int64_t n = x.numel();
    const float* p = x.data<float>();
    for (std::int64_t i = 0; i < n; ++i)
      QLORA_CHECK(std::isfinite(p[i]), "GGUF tensor " + name + " holds a non-finite value at element " + std::to_string(i));
    std::vector<std::byte> bytes;
    const auto encode = [&](auto block_type, auto quantize) {
      using Block = decltype(block_type);
      QLORA_CHECK(x.rank() >= 1 && x.shape().last() % cpu::kGgufBlockValues == 0,
                  "GGUF tensor " + name + " of shape " + shape_str(x.shape()) + ": " + ggml_type_name(std::uint32_t(type)) +
                      " needs rows of a multiple of 32 values");
      const std::int64_t blocks = n / cpu::kGgufBlockValues;
      bytes.resize(std::size_t(blocks) * sizeof(Block));
      quantize(p, reinterpret_cast<Block*>(bytes.data()), blocks);
    };
    switch (type) {
      case GgmlType::F32:
        bytes.resize(x.nbytes());
        std::memcpy(bytes.data(), p, x.nbytes());
        break;
      case GgmlType::F16:
      case GgmlType::BF16: {
        const Tensor h = x.to(type == GgmlType::F16 ? DType::f16 : DType::bf16);
        bytes.resize(h.nbytes());
        std::memcpy(bytes.data(), h.data(), h.nbytes());
        break;
      }
      case GgmlType::Q8_0: encode(cpu::BlockQ8_0{}, cpu::quantize_q8_0); break;
      case GgmlType::Q4_1: encode(cpu::BlockQ4_1{}, cpu::quantize_q4_1); break;
      default:
        throw Error("GGUF tensor " + name + ": writing " + ggml_type_name(std::uint32_t(type)) +
                    " is not supported (F32, F16, BF16, Q8_0 or Q4_1)");
    }
    std::vector<std::int64_t> dims;
    for (int i = 0; i < x.rank(); ++i) dims.push_back(x.dim(i));
    add_encoded_tensor(name, dims, type, std::move(bytes));
  }

  // Already-encoded data (e.g. Q4_1 blocks built exactly from a group-32 INT4 model); dims are row-major.
  void add_encoded_tensor(const std::string& name, const std::vector<std::int64_t>& dims, GgmlType type,
                          std::vector<std::byte> bytes) {
    for (const auto& t : tensors_) QLORA_CHECK(t.name != name, "GGUF tensor " + name + " is added twice");
    const auto* info = ggml_type_info(std::uint32_t(type));
    QLORA_CHECK(info != nullptr, "GGUF tensor " + name + ": unknown type");
    QLORA_CHECK(!dims.empty() && dims.size() <= 4, "GGUF tensor " + name + " must have rank 1 to 4");
    std::int64_t numel = 1;
    for (auto d : dims) numel *= d;
    QLORA_CHECK(dims.back() % info->block_values == 0 &&
                    std::uint64_t(numel / info->block_values * info->block_bytes) == bytes.size(),
                "GGUF tensor " + name + ": " + std::to_string(bytes.size()) + " bytes do not hold " + std::to_string(numel) +
                    " values of " + std::string(info->name));
    tensors_.push_back({name, {dims.rbegin(), dims.rend()}, type, std::move(bytes)});
  }

  void write(const std::filesystem::path& path) const {
    write_file_atomically(path, [&](AtomicFileWriter& out) {
      out.write("GGUF", 4);
      out.write_value<std::uint32_t>(3);
      out.write_value<std::uint64_t>(tensors_.size());
      out.write_value<std::uint64_t>(metadata_.size());
      for (const auto& [key, value] : metadata_) {
        write_string(out, key);
        out.write_value<std::uint32_t>(std::uint32_t(value.type));
        write_value(out, value);
      }
      std::uint64_t offset = 0;
      for (const auto& t : tensors_) {
        write_string(out, t.name);
        out.write_value<std::uint32_t>(std::uint32_t(t.ne.size()));
        for (auto d : t.ne) out.write_value<std::uint64_t>(std::uint64_t(d));
        out.write_value<std::uint32_t>(std::uint32_t(t.type));
        out.write_value<std::uint64_t>(offset);
        offset = detail::align_up(offset + t.bytes.size(), alignment_);
      }
      out.write_zeros(std::size_t(detail::align_up(out.bytes_written(), alignment_) - out.bytes_written()));
      for (const auto& t : tensors_) {
        out.write(t.bytes.data(), t.bytes.size());
        out.write_zeros(std::size_t(detail::align_up(t.bytes.size(), alignment_) - t.bytes.size()));
      }
    });
  }

 private:
  struct Pending {
    std::string name;
    std::vector<std::int64_t> ne;
    GgmlType type;
    std::vector<std::byte> bytes;
  };

  static void write_string(AtomicFileWriter& out, const std::string& s) {
    out.write_value<std::uint64_t>(s.size());
    out.write(s);
  }
  static void write_value(AtomicFileWriter& out, const GgufValue& v) {
    const auto integer = [&]() -> std::uint64_t {
      if (const auto* u = std::get_if<std::uint64_t>(&v.scalar)) return *u;
      return std::uint64_t(std::get<std::int64_t>(v.scalar));
    };
    switch (v.type) {
      case GgufType::u8: case GgufType::i8: out.write_value<std::uint8_t>(std::uint8_t(integer())); break;
      case GgufType::u16: case GgufType::i16: out.write_value<std::uint16_t>(std::uint16_t(integer())); break;
      case GgufType::u32: case GgufType::i32: out.write_value<std::uint32_t>(std::uint32_t(integer())); break;
      case GgufType::u64: case GgufType::i64: out.write_value<std::uint64_t>(integer()); break;
      case GgufType::f32: out.write_value<float>(float(std::get<double>(v.scalar))); break;
      case GgufType::f64: out.write_value<double>(std::get<double>(v.scalar)); break;
      case GgufType::boolean: out.write_value<std::uint8_t>(std::get<bool>(v.scalar) ? 1 : 0); break;
      case GgufType::string: write_string(out, std::get<std::string>(v.scalar)); break;
      case GgufType::array:
        out.write_value<std::uint32_t>(std::uint32_t(v.element_type));
        out.write_value<std::uint64_t>(v.elements.size());
        for (const auto& e : v.elements) write_value(out, e);
        break;
    }
  }

  std::uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::vector<Pending> tensors_;
};

}  // namespace qlora::io
