#pragma once
// Atomic outputs: every file or directory the project writes is built under a temporary name in the same
// directory (so the final rename never crosses a filesystem), flushed to disk with fsync, and renamed onto
// its real name only when complete. A reader therefore sees the old output or the new one, never half of
// one, and a failure (disk full, a bad tensor, an exception in the caller) leaves no partial file behind:
// the temporary is removed and qlora::Error names the path and the system's reason (strerror).
//
//   write_file_atomically(path, [&](AtomicFileWriter& out) { out.write(header); out.write(data, n); });
//   AtomicDirectory dir(out_dir); ...write files into dir.path()...; dir.commit();

#include <fcntl.h>
#include <stdio.h>  // renameat2
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "qlora/core/error.hpp"

namespace qlora::io {

namespace detail {

// A name beside `target`, unique within this process and across processes (pid).
inline std::filesystem::path temporary_sibling(const std::filesystem::path& target) {
  static std::atomic<std::uint64_t> counter{0};
  const std::filesystem::path dir = target.has_parent_path() ? target.parent_path() : std::filesystem::path(".");
  std::string name = ".";
  name += target.filename().string();
  name += ".tmp.";
  name += std::to_string(::getpid());
  name += '.';
  name += std::to_string(counter.fetch_add(1));
  return dir / name;
}

inline std::string system_reason(int err) { return std::strerror(err); }

// fsync of a directory makes a rename inside it durable; failures here are not fatal (some filesystems
// refuse fsync on directories), the rename itself already succeeded.
inline void sync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

}  // namespace detail

// A file being written under a temporary name; commit() publishes it, the destructor discards it otherwise.
// Writes are buffered (1 MiB); every write, fsync and close result is checked.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::filesystem::path target)
      : target_(std::move(target)), temporary_(detail::temporary_sibling(target_)) {
    fd_ = ::open(temporary_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd_ < 0)
      throw Error("cannot write " + target_.string() + ": cannot create " + temporary_.string() + ": " +
                  detail::system_reason(errno));
    buffer_ = std::make_unique<char[]>(kBufferBytes);
  }
  ~AtomicFileWriter() { discard(); }
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  const std::filesystem::path& target() const { return target_; }
  const std::filesystem::path& temporary() const { return temporary_; }
  std::uint64_t bytes_written() const { return written_; }

  void write(const void* data, std::size_t n) {
    QLORA_CHECK(fd_ >= 0, "write to " + target_.string() + " after it was committed or discarded");
    const char* p = static_cast<const char*>(data);
    if (buffered_ + n > kBufferBytes) flush_buffer();
    if (n >= kBufferBytes) {
      write_fully(p, n);
    } else if (n > 0) {
      std::memcpy(buffer_.get() + buffered_, p, n);
      buffered_ += n;
    }
    written_ += n;
  }
  void write(std::string_view s) { write(s.data(), s.size()); }
  template <class T>
  void write_value(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    write(&value, sizeof(T));
  }
  void write_zeros(std::size_t n) {
    static constexpr char zeros[64] = {};
    while (n > 0) {
      const std::size_t k = n < sizeof(zeros) ? n : sizeof(zeros);
      write(zeros, k);
      n -= k;
    }
  }

  // Flushes, fsyncs, closes and renames onto the target (replacing an existing file).
  void commit() {
    QLORA_CHECK(fd_ >= 0, "commit of " + target_.string() + " after it was committed or discarded");
    try {
      flush_buffer();
      if (::fsync(fd_) != 0) fail("fsync", errno);
      const int fd = std::exchange(fd_, -1);
      if (::close(fd) != 0) fail("close", errno);
      if (::rename(temporary_.c_str(), target_.c_str()) != 0) fail("rename onto the target", errno);
    } catch (...) {
      discard();
      throw;
    }
    committed_ = true;
    detail::sync_directory(target_.parent_path());
  }

  // Closes and removes the temporary (no-op after commit).
  void discard() noexcept {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
    if (!committed_ && !removed_) {
      ::unlink(temporary_.c_str());
      removed_ = true;
    }
  }

 private:
  static constexpr std::size_t kBufferBytes = std::size_t(1) << 20;

  [[noreturn]] void fail(const char* step, int err) {
    throw Error("cannot write " + target_.string() + ": " + step + " failed: " + detail::system_reason(err));
  }
  void write_fully(const char* p, std::size_t n) {
    while (n > 0) {
      const ssize_t k = ::write(fd_, p, n);
      if (k < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        discard();
        fail("write", err);
      }
      if (k == 0) {  // no progress and no error: treat as a full disk rather than loop forever
        discard();
        fail("write", ENOSPC);
      }
      p += k;
      n -= std::size_t(k);
    }
  }
  void flush_buffer() {
    if (buffered_ == 0) return;
    write_fully(buffer_.get(), buffered_);
    buffered_ = 0;
  }

  std::filesystem::path target_, temporary_;
  int fd_ = -1;
  bool committed_ = false, removed_ = false;
  std::uint64_t written_ = 0;
  std::unique_ptr<char[]> buffer_;
  std::size_t buffered_ = 0;
};

// Writes `target` through `fill`; on any exception the temporary is removed and the exception propagates.
inline void write_file_atomically(const std::filesystem::path& target,
                                  const std::function<void(AtomicFileWriter&)>& fill) {
  AtomicFileWriter out(target);
  fill(out);
  out.commit();
}
inline void write_file_atomically(const std::filesystem::path& target, std::string_view contents) {
  write_file_atomically(target, [&](AtomicFileWriter& out) { out.write(contents); });
}

// A directory built under a temporary name: write into path(), then commit(). An existing target
// directory is replaced (swapped atomically with renameat2 RENAME_EXCHANGE where the filesystem allows,
// else moved aside first) and the old contents removed. Without commit() the temporary tree is removed.
class AtomicDirectory {
 public:
  explicit AtomicDirectory(std::filesystem::path target)
      : target_(std::move(target)), temporary_(detail::temporary_sibling(target_)) {
    if (::mkdir(temporary_.c_str(), 0755) != 0)
      throw Error("cannot write " + target_.string() + ": cannot create " + temporary_.string() + ": " +
                  detail::system_reason(errno));
  }
  ~AtomicDirectory() { discard(); }
  AtomicDirectory(const AtomicDirectory&) = delete;
  AtomicDirectory& operator=(const AtomicDirectory&) = delete;

  // Where the files go until commit().
  const std::filesystem::path& path() const { return temporary_; }
  const std::filesystem::path& target() const { return target_; }

  void commit() {
    QLORA_CHECK(!committed_ && !removed_, "commit of " + target_.string() + " twice or after discard");
    detail::sync_directory(temporary_);
    std::error_code ec;
    const bool exists = std::filesystem::exists(target_, ec);
    if (!exists) {
      if (::rename(temporary_.c_str(), target_.c_str()) != 0) fail("rename onto the target", errno);
    } else {
      QLORA_CHECK(std::filesystem::is_directory(target_, ec),
                  "cannot write directory " + target_.string() + ": a file of that name exists");
#if defined(RENAME_EXCHANGE)
      if (::renameat2(AT_FDCWD, temporary_.c_str(), AT_FDCWD, target_.c_str(), RENAME_EXCHANGE) == 0) {
        std::filesystem::remove_all(temporary_, ec);  // now holds the old contents
        committed_ = true;
        detail::sync_directory(target_.parent_path());
        return;
      }
#endif
      const std::filesystem::path old = detail::temporary_sibling(target_);
      if (::rename(target_.c_str(), old.c_str()) != 0) fail("moving the old directory aside", errno);
      if (::rename(temporary_.c_str(), target_.c_str()) != 0) {
        const int err = errno;
        ::rename(old.c_str(), target_.c_str());  // put the old one back
        fail("rename onto the target", err);
      }
      std::filesystem::remove_all(old, ec);
    }
    committed_ = true;
    detail::sync_directory(target_.parent_path());
  }

  void discard() noexcept {
    if (committed_ || removed_) return;
    std::error_code ec;
    std::filesystem::remove_all(temporary_, ec);
    removed_ = true;
  }

 private:
  [[noreturn]] void fail(const char* step, int err) {
    throw Error("cannot write directory " + target_.string() + ": " + step + " failed: " + detail::system_reason(err));
  }

  std::filesystem::path target_, temporary_;
  bool committed_ = false, removed_ = false;
};

}  // namespace qlora::io
