#pragma once
// Storage: one owned block of bytes on one device. Tensors share a Storage and view ranges of it.
// Host blocks come from the aligned CPU allocator, device blocks from the caching CUDA allocator;
// a Storage may also wrap outside memory (a memory-mapped file) with its own release function.

#include <cstddef>
#include <functional>
#include <memory>

#include "qlora/core/cpu_allocator.hpp"
#include "qlora/core/device.hpp"
#include "qlora/core/error.hpp"
#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/runtime.hpp"
#endif

namespace qlora {

class Storage {
 public:
  using Release = std::function<void(void*)>;

  static std::shared_ptr<Storage> allocate(std::size_t bytes, Device device) {
    if (device.is_cpu()) {
      void* p = CpuAllocator::instance().allocate(bytes);
      return std::make_shared<Storage>(p, bytes, device, [bytes](void* q) { CpuAllocator::instance().deallocate(q, bytes); });
    }
#if defined(QLORA_WITH_CUDA)
    void* p = cuda::allocate(bytes, device.index, cuda::current_stream());
    const int index = device.index;
    return std::make_shared<Storage>(p, bytes, device, [index](void* q) { cuda::deallocate(q, index); });
#else
    throw Error("cannot allocate on " + device.str() + ": qlora was built without CUDA (configure with -DQLORA_CUDA=ON)");
#endif
  }

  // Wraps memory owned elsewhere; `release` (may be empty) runs when the last tensor lets go.
  Storage(void* data, std::size_t bytes, Device device, Release release)
      : data_(data), bytes_(bytes), device_(device), release_(std::move(release)) {}
  ~Storage() {
    if (release_) release_(data_);
  }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 private:
  void* data_;
  std::size_t bytes_;
  Device device_;
  Release release_;
};

}  // namespace qlora
