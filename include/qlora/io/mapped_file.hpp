#pragma once
// MappedFile: a whole file memory-mapped (POSIX mmap), released when the object dies. Model readers
// (safetensors, GGUF, llama2.c) hand out zero-copy tensor views of the mapping; a view keeps the mapping
// alive by holding a shared_ptr<const MappedFile> in its release callback.
//
// The mapping is private and writable (MAP_PRIVATE | MAP_NORESERVE): a caller that writes into a view
// changes only its own copy of that page, never the file, and does not crash. MAP_NORESERVE keeps the
// kernel from reserving swap for the whole file, so mapping a 14 GB checkpoint costs nothing up front.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include "qlora/core/error.hpp"

namespace qlora::io {

class MappedFile {
 public:
  explicit MappedFile(std::filesystem::path path) : path_(std::move(path)) {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw Error("cannot open " + path_.string() + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw Error("cannot stat " + path_.string() + ": " + std::strerror(err));
    }
    if (S_ISDIR(st.st_mode)) {
      ::close(fd);
      throw Error("cannot map " + path_.string() + ": it is a directory, not a file");
    }
    size_ = std::size_t(st.st_size);
    if (size_ == 0) {
      ::close(fd);
      throw Error(path_.string() + " is empty");
    }
    void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
    const int err = errno;
    ::close(fd);  // the mapping stays valid without the descriptor
    if (p == MAP_FAILED) throw Error("cannot map " + path_.string() + ": " + std::strerror(err));
    data_ = static_cast<std::byte*>(p);
  }
  ~MappedFile() {
    if (data_) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  MappedFile(MappedFile&& o) noexcept : path_(std::move(o.path_)), data_(std::exchange(o.data_, nullptr)), size_(o.size_) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      if (data_) ::munmap(data_, size_);
      path_ = std::move(o.path_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = o.size_;
    }
    return *this;
  }

  const std::filesystem::path& path() const { return path_; }
  std::size_t size() const { return size_; }
  // Mutable because views handed to Tensor::wrap need a void*; writes stay private (see above).
  std::byte* data() const { return data_; }

  // Bytes [offset, offset + length) of the file; throws naming the file and `what` when out of range.
  std::span<std::byte> bytes(std::uint64_t offset, std::uint64_t length, const std::string& what) const {
    if (offset > size_ || length > size_ - offset)
      throw Error(path_.string() + ": " + what + " at bytes [" + std::to_string(offset) + ", " +
                  std::to_string(offset + length) + ") runs past the end of the file (" + std::to_string(size_) +
                  " bytes)");
    return {data_ + offset, std::size_t(length)};
  }

 private:
  std::filesystem::path path_;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace qlora::io
