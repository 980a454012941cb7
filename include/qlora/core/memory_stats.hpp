#pragma once
// Allocator statistics: what the tensors hold now and at their peak, and what the allocator has taken
// from the system (which is more than the tensors hold when freed blocks are cached for reuse).

#include <cstddef>
#include <cstdint>

namespace qlora {

struct MemoryStats {
  std::size_t allocated_bytes = 0;       // held by live allocations now
  std::size_t peak_allocated_bytes = 0;  // the most ever held at once (since the last reset)
  std::size_t reserved_bytes = 0;        // taken from the system now (allocated + cached)
  std::size_t peak_reserved_bytes = 0;
  std::uint64_t allocations = 0;         // allocate() calls served
  std::uint64_t system_allocations = 0;  // of those, the ones that went to the system (cache misses)
};

// What an out-of-memory error tells the user to try (both allocators append it): the flags of `qlora train`
// that lower the activation memory of a step.
inline constexpr const char* kOutOfMemoryHint =
    "try a smaller --micro-batch or --seq-len, or recompute activations with --checkpointing";

}  // namespace qlora
