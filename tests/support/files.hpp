#pragma once
// Test support for files and errors: a temporary directory removed at the end of the test, raw file
// writes and reads for hand-made fixtures, and the message of the qlora::Error a call throws.

#include <doctest/doctest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <string>
#include <string_view>

#include "qlora/core/error.hpp"

namespace qlora::test {

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    path_ = std::filesystem::temp_directory_path() /
            ("qlora-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
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

}  // namespace qlora::test
