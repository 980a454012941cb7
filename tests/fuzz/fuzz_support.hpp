#pragma once
// Shared by the libFuzzer targets of tests/fuzz: most readers take a path (they memory-map or stream the
// file), so the input bytes go to a per-process temporary file first; /dev/shm keeps that in memory.
// A reader may refuse any input with qlora::Error (that is its job); anything else that escapes (another
// exception type, a crash, a sanitizer report, a leak, an allocation beyond -rss_limit_mb) is a finding.

#include <unistd.h>

#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <string_view>

#include "qlora/core/error.hpp"
#include "qlora/io/tokenizer.hpp"

namespace qlora::fuzz {

// A directory private to this process (several fuzzers run at once under scripts/fuzz), removed at exit.
inline std::filesystem::path& scratch_path() {
  static std::filesystem::path dir;
  return dir;
}
inline const std::filesystem::path& scratch_dir() {
  if (scratch_path().empty()) {
    const std::filesystem::path base =
        std::filesystem::is_directory("/dev/shm") ? std::filesystem::path("/dev/shm") : std::filesystem::temp_directory_path();
    scratch_path() = base / ("qlora-fuzz-" + std::to_string(::getpid()));
    std::filesystem::create_directories(scratch_path());
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(scratch_path(), ec);
    });
  }
  return scratch_path();
}

// Writes `bytes` to scratch_dir()/name (replacing it) and returns the path.
inline std::filesystem::path write_input(const std::string& name, std::string_view bytes) {
  const std::filesystem::path p = scratch_dir() / name;
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
  out.close();
  if (!out) std::abort();  // the harness itself failed: not a finding in the reader
  return p;
}

inline std::string_view as_text(const std::uint8_t* data, std::size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Runs a reader on one input: qlora::Error is the expected refusal, everything else propagates.
inline int run_reader(const std::function<void()>& read) {
  try {
    read();
  } catch (const qlora::Error&) {
  }
  return 0;
}

// Exercises a tokenizer that loaded: encode and decode a fixed text, and every piece of a small id range.
inline void exercise_tokenizer(const io::Tokenizer& t) {
  const auto ids = t.encode("Hello world! <s> 123 \xC3\xA9\xE2\x96\x81 \n\t", /*add_bos=*/true, /*add_eos=*/true);
  (void)t.decode(ids);
  for (std::int32_t id = 0; id < std::min<std::int32_t>(t.vocab_size(), 64); ++id) (void)t.token_to_piece(id);
}

}  // namespace qlora::fuzz
