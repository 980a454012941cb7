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
#include "support/files.hpp"

namespace qlora::test {

template <class T>
void append_value(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// Checks that `message` contains each of `parts`.
inline void check_names(const std::string& message, std::initializer_list<std::string> parts) {
  for (const auto& part : parts) {
    INFO("message: " << message);
    INFO("expected to contain: " << part);
    CHECK(message.find(part) != std::string::npos);
  }
}

}  // namespace qlora::test
