#pragma once
// Host memory: 64-byte aligned (a cache line, and enough for any SIMD load), with statistics.
// No caching: the system allocator already reuses host memory well.

#include <atomic>
#include <cstddef>
#include <new>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/core/memory_stats.hpp"

namespace qlora {

class CpuAllocator {
 public:
  static constexpr std::size_t kAlignment = 64;

  static CpuAllocator& instance() {
    static CpuAllocator allocator;
    return allocator;
  }

  void* allocate(std::size_t bytes) {
    const std::size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    void* p = ::operator new(rounded ? rounded : kAlignment, std::align_val_t(kAlignment), std::nothrow);
    if (!p) throw Error("out of host memory: failed to allocate " + std::to_string(bytes) + " bytes; " + kOutOfMemoryHint);
    const std::size_t now = allocated_.fetch_add(bytes) + bytes;
    std::size_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    ++allocations_;
    return p;
  }

  void deallocate(void* p, std::size_t bytes) {
    ::operator delete(p, std::align_val_t(kAlignment));
    allocated_.fetch_sub(bytes);
  }

  MemoryStats stats() const {
    MemoryStats s;
    s.allocated_bytes = s.reserved_bytes = allocated_.load();
    s.peak_allocated_bytes = s.peak_reserved_bytes = peak_.load();
    s.allocations = s.system_allocations = allocations_.load();
    return s;
  }
  void reset_peak() { peak_.store(allocated_.load()); }

 private:
  std::atomic<std::size_t> allocated_{0}, peak_{0};
  std::atomic<std::uint64_t> allocations_{0};
};

}  // namespace qlora
