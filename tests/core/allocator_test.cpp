// The caching allocator's policy on a fake backend (so it is tested without a GPU), and the CPU allocator.

#include <doctest/doctest.h>

#include <cstdint>
#include <cstdlib>
#include <map>

#include "qlora/core/caching_allocator.hpp"
#include "qlora/core/cpu_allocator.hpp"

using namespace qlora;

namespace {
// Hands out host memory, counts calls, and can pretend to run out of memory past a budget.
struct FakeBackend {
  std::size_t budget = SIZE_MAX, used = 0;
  int allocations = 0, frees = 0, syncs = 0;
  std::map<void*, std::size_t>* live = nullptr;  // pointer -> size
  void* allocate(std::size_t bytes) {
    if (used + bytes > budget) return nullptr;
    used += bytes;
    ++allocations;
    void* p = std::malloc(bytes);
    (*live)[p] = bytes;
    return p;
  }
  void deallocate(void* p) {
    ++frees;
    used -= live->at(p);
    live->erase(p);
    std::free(p);
  }
  void synchronize() { ++syncs; }
};
}  // namespace

TEST_CASE("allocator: freed blocks are reused on the same stream, not on another") {
  std::map<void*, std::size_t> live;
  CachingAllocator<FakeBackend> alloc(FakeBackend{.live = &live});
  int stream_a = 0, stream_b = 0;
  void* p = alloc.allocate(1000, &stream_a);
  alloc.deallocate(p);
  CHECK(alloc.allocate(900, &stream_a) == p);  // same rounded size class, same stream: cache hit
  void* q = alloc.allocate(900, &stream_b);    // other stream: a fresh block
  CHECK(q != p);
  const MemoryStats s = alloc.stats();
  CHECK(s.allocations == 3);
  CHECK(s.system_allocations == 2);
  CHECK(s.allocated_bytes == 2 * 1024);
}

TEST_CASE("allocator: current, peak and reserved bytes") {
  std::map<void*, std::size_t> live;
  CachingAllocator<FakeBackend> alloc(FakeBackend{.live = &live});
  void* a = alloc.allocate(4096, nullptr);
  void* b = alloc.allocate(8192, nullptr);
  alloc.deallocate(a);
  MemoryStats s = alloc.stats();
  CHECK(s.allocated_bytes == 8192);
  CHECK(s.peak_allocated_bytes == 4096 + 8192);
  CHECK(s.reserved_bytes == 4096 + 8192);  // a is cached, not returned
  alloc.reset_peak();
  CHECK(alloc.stats().peak_allocated_bytes == 8192);
  alloc.deallocate(b);
  alloc.release_cached();
  s = alloc.stats();
  CHECK(s.reserved_bytes == 0);
  CHECK(s.allocated_bytes == 0);
  CHECK(live.empty());
}

TEST_CASE("allocator: a large cached block is not wasted on a small request") {
  std::map<void*, std::size_t> live;
  CachingAllocator<FakeBackend> alloc(FakeBackend{.live = &live});
  void* big = alloc.allocate(1 << 20, nullptr);
  alloc.deallocate(big);
  void* small = alloc.allocate(1000, nullptr);
  CHECK(small != big);
  void* half = alloc.allocate((1 << 19) + 1, nullptr);  // at least half the cached block: reused
  CHECK(half == big);
}

TEST_CASE("allocator: out of memory frees the cache and retries, then reports the size") {
  std::map<void*, std::size_t> live;
  CachingAllocator<FakeBackend> alloc(FakeBackend{.budget = 10 * 1024, .live = &live}, "cuda:0");
  void* a = alloc.allocate(6 * 1024, nullptr);
  alloc.deallocate(a);                              // 6 KiB cached
  void* b = alloc.allocate(8 * 1024, nullptr);      // needs the cache released first
  CHECK(b != nullptr);
  CHECK(alloc.stats().reserved_bytes == 8 * 1024);
  try {
    (void)alloc.allocate(64 * 1024, nullptr);
    FAIL("expected an out-of-memory error");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CHECK(msg.find("cuda:0 out of memory") != std::string::npos);
    CHECK(msg.find("65536 bytes") != std::string::npos);
    CHECK(msg.find("--micro-batch") != std::string::npos);  // the hint: what to change
    CHECK(msg.find("--checkpointing") != std::string::npos);
  }
  CHECK_THROWS_AS(alloc.deallocate(reinterpret_cast<void*>(0x1234)), Error);
  alloc.deallocate(b);
}

TEST_CASE("allocator: host blocks are 64-byte aligned and counted") {
  CpuAllocator& cpu = CpuAllocator::instance();
  const std::size_t before = cpu.stats().allocated_bytes;
  void* p = cpu.allocate(100);
  void* q = cpu.allocate(3);
  CHECK(reinterpret_cast<std::uintptr_t>(p) % 64 == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(q) % 64 == 0);
  CHECK(cpu.stats().allocated_bytes == before + 103);
  CHECK(cpu.stats().peak_allocated_bytes >= before + 103);
  cpu.deallocate(p, 100);
  cpu.deallocate(q, 3);
  CHECK(cpu.stats().allocated_bytes == before);
}
