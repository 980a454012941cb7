#pragma once
// Test support for the CUDA kernel tests: a tiny RAII device buffer, and f32 <-> storage-type conversions so
// that the CPU twin (run in f32) sees exactly the values the device sees.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/core/half.hpp"
#include "support/random.hpp"

namespace qlora::test {

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// n elements of device memory, freed on destruction. download() synchronises the device first, so a fault in
// a kernel surfaces there as an exception.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) : size_(n) {
    check_cuda(cudaMalloc(&data_, (n == 0 ? 1 : n) * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(data_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }

  void upload(const std::vector<T>& host) {
    if (host.size() != size_) throw std::runtime_error("DeviceBuffer::upload: size mismatch");
    if (size_ == 0) return;
    check_cuda(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
  }

  std::vector<T> download() const {
    check_cuda(cudaDeviceSynchronize(), "kernel execution");
    std::vector<T> host(size_);
    if (size_ == 0) return host;
    check_cuda(cudaMemcpy(host.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }

  // All bits set: NaN as f32, bf16 and f16 (and -1 as int32), so an element a kernel forgets to write fails
  // every comparison.
  void poison() {
    if (size_ != 0) check_cuda(cudaMemset(data_, 0xff, size_ * sizeof(T)), "cudaMemset");
  }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

// ---- storage types in tests ------------------------------------------------------------------------------

template <class T>
T from_float(float x) {
  if constexpr (std::is_same_v<T, bf16>) return to_bf16(x);
  else if constexpr (std::is_same_v<T, f16>) return to_f16(x);
  else return T(x);
}

template <class T>
float as_float(T x) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) return to_float(x);
  else return float(x);
}

template <class T>
std::vector<T> to_storage(const std::vector<float>& x) {
  std::vector<T> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = from_float<T>(x[i]);
  return y;
}

template <class T>
std::vector<float> to_floats(const std::vector<T>& x) {
  std::vector<float> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = as_float(x[i]);
  return y;
}

// Random f32 values in [lo, hi) that T represents exactly (rounded through T), for the CPU twin and the device.
template <class T>
std::vector<float> random_exact(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  return to_floats(to_storage<T>(random_vector<float>(n, seed, lo, hi)));
}

// Relative-error tolerance of an output stored as T and computed in f32: bf16 keeps 8 significant bits
// (rounding alone is up to 2^-9 relative), f32 results differ from the CPU twin only by f32 summation order.
template <class T>
constexpr double output_tolerance = std::is_same_v<T, bf16> ? 1e-2 : 1e-5;

template <class T>
const char* type_name() {
  return std::is_same_v<T, bf16> ? "bf16" : std::is_same_v<T, f16> ? "f16" : "f32";
}

}  // namespace qlora::test
