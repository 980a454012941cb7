#pragma once
// Helpers of the io tests: a temporary directory removed at the end of the test, raw file writers for
// hand-made (and deliberately broken) fixtures, and a check that an error message names what it should.

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

namespace qlora::test {

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("qlora-io-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline void write_raw(const std::filesystem::path& p, std::string_view bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  REQUIRE(out.good());
}
inline std::string read_raw(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
template <class T>
void append_value(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

// The message of the qlora::Error that `fn` throws ("" if it throws none, which fails the check).
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const qlora::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    FAIL("expected qlora::Error, got another exception: " << e.what());
  }
  FAIL("expected qlora::Error, nothing was thrown");
  return "";
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
