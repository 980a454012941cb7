#pragma once
// The CUDA runtime as the rest of qlora sees it: devices, the current stream, the caching allocator,
// copies. Declarations only (no CUDA headers); definitions in cuda/core/runtime.cu, in qlora_cuda.

#include <cstddef>

#include "qlora/core/memory_stats.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// Number of usable devices; 0 when there is no device or no working driver (never throws: a machine
// with the toolkit but no driver reports "CUDA driver version is insufficient", which means none).
int device_count() noexcept;
bool available() noexcept;
// The first failure message of device discovery ("" when devices were found), for diagnostics.
const char* unavailable_reason() noexcept;

void set_device(int device);
int current_device();

// The stream ops enqueue on, per host thread; nullptr (the legacy default stream) until set.
Stream current_stream();
void set_current_stream(Stream stream);
Stream create_stream();
void destroy_stream(Stream stream);
void synchronize_stream(Stream stream);
void synchronize_device();

// Device memory through the stream-ordered caching allocator of `device`.
void* allocate(std::size_t bytes, int device, Stream stream);
void deallocate(void* p, int device);
MemoryStats memory_stats(int device);
void reset_peak_memory(int device);
void release_cached_memory(int device);

// Copies between host and device memory, ordered on `stream`; to_host waits for completion.
void copy_to_device(void* dst, const void* src, std::size_t bytes, Stream stream);
void copy_to_host(void* dst, const void* src, std::size_t bytes, Stream stream);
void copy_on_device(void* dst, const void* src, std::size_t bytes, Stream stream);
void memset_device(void* dst, int value, std::size_t bytes, Stream stream);

}  // namespace qlora::cuda
