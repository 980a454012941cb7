#pragma once
// A stream-ordered caching allocator (the scheme PyTorch's CUDA allocator uses, without block splitting).
//
// cudaMalloc/cudaFree synchronise the device and cost tens of microseconds, so freed blocks are kept in
// a pool and handed out again. A freed block is pooled under the stream it was allocated on: work queued
// later on that stream runs after every earlier use of the block, so reuse on the same stream needs no
// synchronisation. A block used on another stream must not be freed before that stream is done with it
// (the caller's responsibility, as with cudaFreeAsync).
//
// The policy is written against a small Backend so that it is tested on the CPU with a fake backend:
//   void* Backend::allocate(size_t)  -> nullptr when the system is out of memory
//   void  Backend::deallocate(void*)
//   void  Backend::synchronize()     -> waits for all queued work (before returning cached memory)

#include <cstddef>
#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <tuple>
#include <unordered_map>

#include "qlora/core/error.hpp"
#include "qlora/core/memory_stats.hpp"

namespace qlora {

template <class Backend>
class CachingAllocator {
 public:
  using StreamKey = const void*;
  static constexpr std::size_t kRound = 512;          // every block is a multiple of this
  static constexpr std::size_t kMaxWasteFactor = 2;   // a cached block serves requests at least half its size

  explicit CachingAllocator(Backend backend = {}, std::string name = "device")
      : backend_(std::move(backend)), name_(std::move(name)) {}
  ~CachingAllocator() { release_cached(); }
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  static std::size_t round_size(std::size_t bytes) { return bytes == 0 ? kRound : (bytes + kRound - 1) / kRound * kRound; }

  void* allocate(std::size_t bytes, StreamKey stream) {
    const std::size_t size = round_size(bytes);
    std::lock_guard lock(mutex_);
    ++stats_.allocations;
    void* p = take_cached(size, stream);
    if (!p) {
      p = backend_.allocate(size);
      if (!p) {  // out of memory: give the cache back to the system and try once more
        release_cached_locked();
        p = backend_.allocate(size);
      }
      if (!p) throw Error(out_of_memory_message(bytes));
      ++stats_.system_allocations;
      stats_.reserved_bytes += size;
      stats_.peak_reserved_bytes = std::max(stats_.peak_reserved_bytes, stats_.reserved_bytes);
    }
    live_[p] = Block{size, stream};
    stats_.allocated_bytes += size;
    stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
    return p;
  }

  void deallocate(void* p) {
    if (!p) return;
    std::lock_guard lock(mutex_);
    const auto it = live_.find(p);
    if (it == live_.end()) throw Error("caching allocator: freeing a pointer it did not allocate");
    const Block block = it->second;
    live_.erase(it);
    stats_.allocated_bytes -= block.size;
    pool_.insert({block.stream, block.size, p});
  }

  // Returns every cached (free) block to the system.
  void release_cached() {
    std::lock_guard lock(mutex_);
    release_cached_locked();
  }

  MemoryStats stats() const {
    std::lock_guard lock(mutex_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard lock(mutex_);
    stats_.peak_allocated_bytes = stats_.allocated_bytes;
    stats_.peak_reserved_bytes = stats_.reserved_bytes;
  }

 private:
  struct Block {
    std::size_t size;
    StreamKey stream;
  };
  using PoolEntry = std::tuple<StreamKey, std::size_t, void*>;  // ordered by stream, then size: best fit

  void* take_cached(std::size_t size, StreamKey stream) {
    const auto it = pool_.lower_bound({stream, size, nullptr});
    if (it == pool_.end() || std::get<0>(*it) != stream || std::get<1>(*it) > size * kMaxWasteFactor) return nullptr;
    void* p = std::get<2>(*it);
    pool_.erase(it);
    return p;
  }

  void release_cached_locked() {
    if (pool_.empty()) return;
    backend_.synchronize();
    for (const auto& [stream, size, p] : pool_) {
      backend_.deallocate(p);
      stats_.reserved_bytes -= size;
    }
    pool_.clear();
  }

  std::string out_of_memory_message(std::size_t bytes) const {
    auto mib = [](std::size_t b) { return std::to_string(b / (1024 * 1024)) + " MiB"; };
    return name_ + " out of memory: failed to allocate " + std::to_string(bytes) + " bytes (" + mib(bytes) +
           ") with " + mib(stats_.allocated_bytes) + " in use; " + kOutOfMemoryHint;
  }

  Backend backend_;
  std::string name_;
  mutable std::mutex mutex_;
  std::unordered_map<void*, Block> live_;
  std::set<PoolEntry> pool_;
  MemoryStats stats_;
};

}  // namespace qlora
