#pragma once
// Helpers of the io tests: byte-level fixture writers and a check that an error message names what it should
// (the temporary directory, raw file I/O and error_of are in support/files.hpp).

#include <doctest/doctest.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

#include "qlora/core/error.hpp"
#include "qlora/io/gguf.hpp"
#include "support/files.hpp"

namespace qlora::test {

template <class T>
void append_value(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// GGUF bytes assembled by hand from ggml's docs/gguf.md, independent of GgufWriter.
struct GgufBytes {
  std::string s;
  void str(const std::string& v) {
    append_value<std::uint64_t>(s, v.size());
    s += v;
  }
  void key(const std::string& k, io::GgufType t) {
    str(k);
    append_value<std::uint32_t>(s, std::uint32_t(t));
  }
  void header(std::uint64_t tensors, std::uint64_t kvs) {
    s += "GGUF";
    append_value<std::uint32_t>(s, 3);
    append_value<std::uint64_t>(s, tensors);
    append_value<std::uint64_t>(s, kvs);
  }
  void tensor_info(const std::string& name, std::vector<std::uint64_t> ne, io::GgmlType type, std::uint64_t offset) {
    str(name);
    append_value<std::uint32_t>(s, std::uint32_t(ne.size()));
    for (auto d : ne) append_value<std::uint64_t>(s, d);
    append_value<std::uint32_t>(s, std::uint32_t(type));
    append_value<std::uint64_t>(s, offset);
  }
  void pad(std::size_t alignment) { s.append((alignment - s.size() % alignment) % alignment, '\0'); }
};

// Checks that `message` contains each of `parts`.
inline void check_names(const std::string& message, std::initializer_list<std::string> parts) {
  for (const auto& part : parts) {
    INFO("message: " << message);
    INFO("expected to contain: " << part);
    CHECK(message.find(part) != std::string::npos);
  }
}

}  // namespace qlora::test
