// Untrusted files (docs/reliability.md): small files whose headers claim huge sizes are refused with one
// clear qlora::Error before anything of that size is allocated, and every input the fuzzers of tests/fuzz
// found to crash a reader is refused cleanly (the inputs are committed under tests/fuzz/regressions/).

#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>

#include "io/io_test_util.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/llama2c.hpp"
#include "qlora/io/safetensors.hpp"
#include "qlora/io/tokenizer_hf_json.hpp"
#include "qlora/io/tokenizer_llama2c.hpp"
#include "qlora/io/tokenizer_load.hpp"
#include "qlora/io/hf_config.hpp"
#include "qlora/io/model_files.hpp"

using qlora::io::GgmlType;
using qlora::io::GgufFile;
using qlora::io::GgufType;
using qlora::test::append_value;
using qlora::test::check_names;
using qlora::test::error_of;
using qlora::test::GgufBytes;
using qlora::test::TempDir;
using qlora::test::write_raw;
namespace fs = std::filesystem;

namespace {

// tests/fuzz/regressions beside this file's folder (CMake compiles sources by absolute path).
const fs::path kRegressions = fs::path(__FILE__).parent_path().parent_path() / "fuzz/regressions";
constexpr std::uint64_t kHuge = std::uint64_t(1) << 62;

std::string safetensors_with_header(const std::string& json, std::size_t data_bytes = 0) {
  std::string s;
  append_value<std::uint64_t>(s, json.size());
  return s + json + std::string(data_bytes, '\0');
}

}  // namespace

TEST_CASE("untrusted safetensors: header length, shapes and offsets that claim terabytes are refused") {
  TempDir dir;
  const auto p = dir / "big.safetensors";
  std::string s;
  append_value<std::uint64_t>(s, kHuge);
  write_raw(p, s + "{}");
  check_names(error_of([&] { qlora::io::SafetensorsFile f(p); }), {"big.safetensors", "header length", "100 MB limit"});
  s.clear();
  append_value<std::uint64_t>(s, 50'000'000);  // under the limit, past the end of a 10-byte file
  write_raw(p, s + "{}");
  check_names(error_of([&] { qlora::io::SafetensorsFile f(p); }), {"big.safetensors", "runs past the end"});
  write_raw(p, safetensors_with_header(R"({"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 4]}})", 4));
  check_names(error_of([&] { qlora::io::SafetensorsFile f(p); }), {"tensor w", "too large"});
  write_raw(p, safetensors_with_header(R"({"w": {"dtype": "F32", "shape": [1024, 1024, 1024], "data_offsets": [0, 4294967296]}})", 4));
  check_names(error_of([&] { qlora::io::SafetensorsFile f(p); }), {"tensor w", "outside the data section"});
}

TEST_CASE("untrusted gguf: counts, string and array lengths, dimensions, offsets and alignment are bounded by the file") {
  TempDir dir;
  const auto p = dir / "big.gguf";
  const auto refused = [&](const GgufBytes& g, std::initializer_list<std::string> parts) {
    write_raw(p, g.s);
    check_names(error_of([&] { GgufFile f(p); }), parts);
  };
  {  // a tensor count of 2^62
    GgufBytes g;
    g.header(kHuge, 0);
    refused(g, {"big.gguf", "tensors cannot fit"});
  }
  {  // a key of 2^62 bytes
    GgufBytes g;
    g.header(0, 1);
    append_value<std::uint64_t>(g.s, kHuge);
    g.s += "key" + std::string(32, '\0');
    refused(g, {"big.gguf", "truncated", "metadata entry 0 key"});
  }
  {  // an array of 2^40 u32: only the bytes that remain could hold elements
    GgufBytes g;
    g.header(0, 1);
    g.key("a", GgufType::array);
    append_value<std::uint32_t>(g.s, std::uint32_t(GgufType::u32));
    append_value<std::uint64_t>(g.s, std::uint64_t(1) << 40);
    g.s += std::string(64, '\0');
    refused(g, {"big.gguf", "metadata a", "claims 1099511627776 elements of u32"});
  }
  {  // 40 bytes left hold at most 3 nested arrays (12 bytes each), not 10
    GgufBytes g;
    g.header(0, 1);
    g.key("nested", GgufType::array);
    append_value<std::uint32_t>(g.s, std::uint32_t(GgufType::array));
    append_value<std::uint64_t>(g.s, 10);
    g.s += std::string(40, '\0');
    refused(g, {"metadata nested", "claims 10 elements of array"});
  }
  {  // dimensions whose product is beyond any file
    GgufBytes g;
    g.header(1, 0);
    g.tensor_info("t", {std::uint64_t(1) << 39, std::uint64_t(1) << 39}, GgmlType::F32, 0);
    refused(g, {"tensor t", "impossible dimension"});
  }
  {  // an offset near 2^64 that would wrap back into the file when added to the data start
    GgufBytes g;
    g.header(1, 0);
    g.tensor_info("t", {8}, GgmlType::F32, std::uint64_t(0) - 32);
    g.pad(32);
    g.s += std::string(64, '\0');
    refused(g, {"tensor t", "runs past the end of the file"});
  }
  {  // general.alignment 2^32 is a power of two but not a u32: it used to become 0 (a division by zero)
    GgufBytes g;
    g.header(1, 1);
    g.key("general.alignment", GgufType::u64);
    append_value<std::uint64_t>(g.s, std::uint64_t(1) << 32);
    g.tensor_info("t", {8}, GgmlType::F32, 0);
    g.s += std::string(64, '\0');
    refused(g, {"general.alignment 4294967296", "32 bits"});
  }
}

TEST_CASE("untrusted gguf: data at an address unaligned for its type (general.alignment 1) is copied, with the right values") {
  // Independent bytes: one F32 tensor of 3 values right after the tensor infos: 24 bytes of header, 33 of
  // general.alignment = 1, 33 of tensor info, so the data starts at byte 90, which is not a multiple of 4.
  GgufBytes g;
  g.header(1, 1);
  g.key("general.alignment", GgufType::u32);
  append_value<std::uint32_t>(g.s, 1);
  g.tensor_info("t", {3}, GgmlType::F32, 0);
  for (float v : {1.5f, -2.f, 0.25f}) append_value<float>(g.s, v);
  TempDir dir;
  const auto p = dir / "odd.gguf";
  write_raw(p, g.s);
  const GgufFile f(p);
  REQUIRE(f.alignment() == 1);
  REQUIRE(f.data_start() == 90);
  const qlora::Tensor t = f.load("t");
  REQUIRE(t.numel() == 3);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 4 == 0);
  CHECK(t.data<float>()[0] == 1.5f);
  CHECK(t.data<float>()[1] == -2.f);
  CHECK(t.data<float>()[2] == 0.25f);
}

TEST_CASE("untrusted llama2.c: a header implying terabytes, or vocab_size -2^31, is refused from 28 bytes") {
  TempDir dir;
  const auto p = dir / "big.bin";
  std::string s;
  for (std::int32_t v : {1 << 30, 1 << 30, 1 << 20, 1 << 10, 1 << 10, 1 << 30, 1 << 30}) append_value<std::int32_t>(s, v);
  write_raw(p, s + std::string(100, '\0'));
  check_names(error_of([&] { qlora::io::Llama2cCheckpoint c(p); }), {"big.bin", "impossible file size"});
  s.clear();
  for (std::int32_t v : {64, 172, 5, 8, 4, std::numeric_limits<std::int32_t>::min(), 512}) append_value<std::int32_t>(s, v);
  write_raw(p, s);
  check_names(error_of([&] { qlora::io::Llama2cCheckpoint c(p); }), {"big.bin", "vocab_size is -2147483648"});
}

TEST_CASE("untrusted tokenizers: token lengths and ids that claim gigabytes are refused") {
  std::string bin;
  append_value<std::int32_t>(bin, 1 << 30);  // max_token_length
  check_names(error_of([&] { (void)qlora::io::parse_llama2c_tokenizer(bin, "big.bin"); }), {"big.bin", "max_token_length 1073741824"});
  bin.clear();
  append_value<std::int32_t>(bin, 16);
  append_value<float>(bin, 0.f);
  append_value<std::int32_t>(bin, 1 << 30);  // one token of 2^30 bytes in a 12-byte file
  check_names(error_of([&] { (void)qlora::io::parse_llama2c_tokenizer(bin, "big.bin"); }), {"token 0", "has length 1073741824"});

  TempDir dir;
  const auto p = dir / "tokenizer.json";
  const std::string head = R"({"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE", "merges": [], "vocab": )";
  write_raw(p, head + R"({"a": 0, "b": 2147483647}}})");
  check_names(error_of([&] { (void)qlora::io::load_hf_tokenizer_json(p.string()); }),
              {"tokenizer.json", "token 'b' id 2147483647", "beyond its 2"});
  write_raw(p, head + R"({"a": 0}}, "added_tokens": [{"content": "<x>", "id": 2147483647}]})");
  check_names(error_of([&] { (void)qlora::io::load_hf_tokenizer_json(p.string()); }),
              {"tokenizer.json", "special token '<x>' with id 2147483647"});
  write_raw(p, head + R"({"a": 0, "b": 1e30}}})");  // a float id used to be converted with undefined behaviour
  check_names(error_of([&] { (void)qlora::io::load_hf_tokenizer_json(p.string()); }), {"token 'b'", "not an integer"});
  // An added token may fill the id after the vocabulary (as Llama 3's do).
  write_raw(p, head + R"({"a": 0}}, "added_tokens": [{"content": "<x>", "id": 1}]})");
  CHECK(qlora::io::load_hf_tokenizer_json(p.string())->vocab_size() == 2);
}

TEST_CASE("fuzz regressions: every committed crash input is refused with a qlora::Error") {
  REQUIRE(fs::is_directory(kRegressions));
  int inputs = 0;
  for (const auto& entry : fs::recursive_directory_iterator(kRegressions)) {
    if (!entry.is_regular_file()) continue;
    const std::string target = entry.path().parent_path().filename().string();
    CAPTURE(entry.path());
    ++inputs;
    if (target == "llama2c") {
      CHECK(!error_of([&] { qlora::io::Llama2cCheckpoint c(entry.path()); }).empty());
    } else if (target == "gguf") {
      CHECK(!error_of([&] { GgufFile f(entry.path()); for (const auto& t : f.tensors()) (void)f.load(t.name); }).empty());
    } else if (target == "safetensors") {
      CHECK(!error_of([&] { qlora::io::SafetensorsFile f(entry.path()); }).empty());
    } else if (target == "tokenizer_json") {
      CHECK(!error_of([&] { (void)qlora::io::load_hf_tokenizer_json(entry.path().string()); }).empty());
    } else if (target == "tokenizer_model") {  // read by content under the name the fuzz target gives it
      TempDir dir;
      fs::copy_file(entry.path(), dir / "tokenizer.model");
      CHECK(!error_of([&] { (void)qlora::io::load_tokenizer(dir / "tokenizer.model"); }).empty());
    } else if (target == "tokenizer_bin") {
      CHECK(!error_of([&] { (void)qlora::io::load_llama2c_tokenizer(entry.path()); }).empty());
    } else if (target == "quantized_model") {  // a u32 length N, N bytes of config.json, then model.safetensors
      std::string bytes = qlora::test::read_raw(entry.path());
      std::uint32_t n = 0;
      if (bytes.size() >= 4) std::memcpy(&n, bytes.data(), 4);
      bytes.erase(0, std::min<std::size_t>(4, bytes.size()));
      n = std::uint32_t(std::min<std::size_t>(n, bytes.size()));
      TempDir dir;
      qlora::test::write_raw(dir / "config.json", bytes.substr(0, n));
      qlora::test::write_raw(dir / "model.safetensors", bytes.substr(n));
      CHECK(!error_of([&] {
               const auto files = qlora::io::open_model_files(dir.path());
               for (const auto& spec : qlora::io::llama_tensor_specs(files->config())) (void)files->load(spec.name);
             }).empty());
    } else if (target == "config_json") {
      CHECK(!error_of([&] { (void)qlora::io::llama_tensor_specs(qlora::io::read_hf_config(entry.path())); }).empty());
    } else if (target != "dataset") {  // dataset inputs: tests/train/untrusted_files_test.cpp (the train layer)
      FAIL("no reader for the regression input of target " << target);
    }
  }
  CHECK(inputs > 0);
}
