#include <doctest/doctest.h>

#include <sys/resource.h>

#include <csignal>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "io/io_test_util.hpp"
#include "qlora/io/atomic_write.hpp"
#include "qlora/io/mapped_file.hpp"

using qlora::test::TempDir;
using qlora::test::check_names;
using qlora::test::error_of;
namespace fs = std::filesystem;

namespace {
// Files in `dir` other than `keep`: the temporaries a writer may have left behind.
int other_files(const fs::path& dir, const std::string& keep = "") {
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename() != keep) ++n;
  return n;
}
}  // namespace

TEST_CASE("mapped_file: maps the bytes of a file and names the path in its errors") {
  TempDir dir;
  qlora::test::write_raw(dir / "a.bin", std::string("hello, mapped world"));
  const qlora::io::MappedFile f(dir / "a.bin");
  CHECK(f.size() == 19);
  CHECK(std::string(reinterpret_cast<const char*>(f.data()), f.size()) == "hello, mapped world");
  CHECK(f.bytes(7, 6, "word").size() == 6);
  check_names(error_of([&] { (void)f.bytes(15, 10, "a tail"); }), {"a.bin", "a tail", "runs past the end"});

  check_names(error_of([&] { qlora::io::MappedFile m(dir / "missing.bin"); }), {"cannot open", "missing.bin", "No such file"});
  qlora::test::write_raw(dir / "empty.bin", "");
  check_names(error_of([&] { qlora::io::MappedFile m(dir / "empty.bin"); }), {"empty.bin", "is empty"});
  check_names(error_of([&] { qlora::io::MappedFile m(dir.path()); }), {"directory"});
}

TEST_CASE("atomic_write: a file appears complete under its name, replacing an old one") {
  TempDir dir;
  const fs::path target = dir / "out.txt";
  qlora::io::write_file_atomically(target, "first version");
  CHECK(qlora::test::read_raw(target) == "first version");
  std::string big(3 << 20, 'x');  // larger than the writer's buffer
  big[12345] = 'y';
  qlora::io::write_file_atomically(target, [&](qlora::io::AtomicFileWriter& out) {
    out.write("head:");
    out.write(big);
    out.write_zeros(3);
    CHECK(out.bytes_written() == 5 + big.size() + 3);
    CHECK(qlora::test::read_raw(target) == "first version");  // the old file stays until commit
  });
  CHECK(qlora::test::read_raw(target) == "head:" + big + std::string(3, '\0'));
  CHECK(other_files(dir.path(), "out.txt") == 0);
}

TEST_CASE("atomic_write: an exception while writing leaves neither the target nor a temporary") {
  TempDir dir;
  const fs::path target = dir / "never.bin";
  CHECK_THROWS_AS(qlora::io::write_file_atomically(target,
                                                   [&](qlora::io::AtomicFileWriter& out) {
                                                     out.write("partial data");
                                                     throw std::runtime_error("caller failed");
                                                   }),
                  std::runtime_error);
  CHECK_FALSE(fs::exists(target));
  CHECK(other_files(dir.path()) == 0);
}

TEST_CASE("atomic_write: a failing write (file size limit, as a full disk) throws with path and reason") {
  TempDir dir;
  const fs::path target = dir / "too-big.bin";
  // RLIMIT_FSIZE makes write() fail with EFBIG past 64 KiB, the same path as ENOSPC on a full disk.
  rlimit old{};
  REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
  auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 64 * 1024;
  REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
  const std::string message = error_of([&] {
    qlora::io::write_file_atomically(target, [&](qlora::io::AtomicFileWriter& out) { out.write(std::string(4 << 20, 'z')); });
  });
  ::setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, old_handler);
  check_names(message, {"too-big.bin", "write failed", "File too large"});
  CHECK_FALSE(fs::exists(target));
  CHECK(other_files(dir.path()) == 0);
}

TEST_CASE("atomic_write: a missing parent directory is an error naming the target") {
  TempDir dir;
  check_names(error_of([&] { qlora::io::write_file_atomically(dir / "no/such/dir/file.txt", "x"); }),
              {"file.txt", "cannot create", "No such file"});
}

TEST_CASE("atomic_write: a directory is built aside and swapped in whole") {
  TempDir dir;
  const fs::path target = dir / "model";
  {
    qlora::io::AtomicDirectory out(target);
    qlora::io::write_file_atomically(out.path() / "a.txt", "one");
    CHECK_FALSE(fs::exists(target));
    out.commit();
  }
  CHECK(qlora::test::read_raw(target / "a.txt") == "one");
  {
    qlora::io::AtomicDirectory out(target);
    qlora::io::write_file_atomically(out.path() / "b.txt", "two");
    CHECK(fs::exists(target / "a.txt"));  // the old directory is intact until commit
    out.commit();
  }
  CHECK(qlora::test::read_raw(target / "b.txt") == "two");
  CHECK_FALSE(fs::exists(target / "a.txt"));
  {
    qlora::io::AtomicDirectory out(target);  // abandoned: no commit
    qlora::io::write_file_atomically(out.path() / "c.txt", "three");
  }
  CHECK_FALSE(fs::exists(target / "c.txt"));
  CHECK(fs::exists(target / "b.txt"));
  CHECK(other_files(dir.path(), "model") == 0);
}
