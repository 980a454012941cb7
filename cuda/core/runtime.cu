// The CUDA runtime layer: device discovery that never throws, a per-thread current stream, one
// stream-ordered caching allocator per device (include/qlora/core/caching_allocator.hpp over cudaMalloc),
// and copies. Declared in include/qlora/cuda/runtime.hpp.

#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.cuh"
#include "qlora/core/caching_allocator.hpp"
#include "qlora/cuda/runtime.hpp"

namespace qlora::cuda {
namespace {

struct DeviceDiscovery {
  int count = 0;
  std::string reason;
};

const DeviceDiscovery& discovery() {
  static const DeviceDiscovery found = [] {
    DeviceDiscovery d;
    const cudaError_t status = cudaGetDeviceCount(&d.count);
    if (status != cudaSuccess) {
      d.count = 0;
      d.reason = cudaGetErrorString(status);
      cudaGetLastError();  // clear the sticky error so later calls are not blamed for it
    } else if (d.count == 0) {
      d.reason = "no CUDA device found";
    }
    return d;
  }();
  return found;
}

// The raw system side of the caching allocator for one device.
struct CudaMallocBackend {
  int device = 0;
  void* allocate(std::size_t bytes) {
    QLORA_CUDA_CHECK(cudaSetDevice(device));
    void* p = nullptr;
    const cudaError_t status = cudaMalloc(&p, bytes);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      return nullptr;  // the allocator frees its cache and retries, then reports
    }
    QLORA_CUDA_CHECK(status);
    return p;
  }
  void deallocate(void* p) { QLORA_CUDA_CHECK(cudaFree(p)); }
  void synchronize() {
    QLORA_CUDA_CHECK(cudaSetDevice(device));
    QLORA_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

using DeviceAllocator = CachingAllocator<CudaMallocBackend>;

DeviceAllocator& allocator_for(int device) {
  static std::mutex mutex;
  static std::vector<std::unique_ptr<DeviceAllocator>> allocators;
  std::lock_guard lock(mutex);
  if (device < 0 || device >= device_count())
    throw Error("cuda:" + std::to_string(device) + " does not exist (" + std::to_string(device_count()) +
                " CUDA devices" + (device_count() ? "" : std::string(": ") + unavailable_reason()) + ")");
  if (allocators.empty()) allocators.resize(std::size_t(device_count()));
  auto& slot = allocators[std::size_t(device)];
  if (!slot) slot = std::make_unique<DeviceAllocator>(CudaMallocBackend{device}, "cuda:" + std::to_string(device));
  return *slot;
}

thread_local Stream current = nullptr;

}  // namespace

int device_count() noexcept { return discovery().count; }
bool available() noexcept { return device_count() > 0; }
const char* unavailable_reason() noexcept { return discovery().reason.c_str(); }

void set_device(int device) { QLORA_CUDA_CHECK(cudaSetDevice(device)); }
int current_device() {
  int device = 0;
  QLORA_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

Stream current_stream() { return current; }
void set_current_stream(Stream stream) { current = stream; }
Stream create_stream() {
  cudaStream_t stream = nullptr;
  QLORA_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}
void destroy_stream(Stream stream) { QLORA_CUDA_CHECK(cudaStreamDestroy(stream)); }
void synchronize_stream(Stream stream) { QLORA_CUDA_CHECK(cudaStreamSynchronize(stream)); }
void synchronize_device() { QLORA_CUDA_CHECK(cudaDeviceSynchronize()); }

void* allocate(std::size_t bytes, int device, Stream stream) { return allocator_for(device).allocate(bytes, stream); }
void deallocate(void* p, int device) { allocator_for(device).deallocate(p); }
MemoryStats memory_stats(int device) { return allocator_for(device).stats(); }
void reset_peak_memory(int device) { allocator_for(device).reset_peak(); }
void release_cached_memory(int device) { allocator_for(device).release_cached(); }

void copy_to_device(void* dst, const void* src, std::size_t bytes, Stream stream) {
  QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  // The host buffer may be freed as soon as we return (pageable memory is staged, but be explicit).
  QLORA_CUDA_CHECK(cudaStreamSynchronize(stream));
}
void copy_to_host(void* dst, const void* src, std::size_t bytes, Stream stream) {
  QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  QLORA_CUDA_CHECK(cudaStreamSynchronize(stream));
}
void copy_on_device(void* dst, const void* src, std::size_t bytes, Stream stream) {
  QLORA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
}
void memset_device(void* dst, int value, std::size_t bytes, Stream stream) {
  QLORA_CUDA_CHECK(cudaMemsetAsync(dst, value, bytes, stream));
}

}  // namespace qlora::cuda
