#pragma once
// Tensor: a typed, shaped, contiguous row-major view of a Storage. Copies share the storage (like
// shared_ptr); clone() copies the bytes. Views: slice() and select() along the leading dimension, and
// reshape(); all are contiguous, so every kernel sees a plain pointer and sizes.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "qlora/core/device.hpp"
#include "qlora/core/dtype.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/shape.hpp"
#include "qlora/core/storage.hpp"
#include "qlora/cpu/convert.hpp"
#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/convert.hpp"
#include "qlora/cuda/runtime.hpp"
#endif

namespace qlora {

class Tensor {
 public:
  Tensor() = default;  // undefined: no storage

  static Tensor empty(Shape shape, DType dtype = DType::f32, Device device = Device::cpu()) {
    const std::size_t bytes = std::size_t(shape.numel()) * dtype_size(dtype);
    return Tensor(Storage::allocate(bytes, device), 0, shape, dtype);
  }
  static Tensor zeros(Shape shape, DType dtype = DType::f32, Device device = Device::cpu()) {
    Tensor t = empty(shape, dtype, device);
    t.zero_();
    return t;
  }
  // A host tensor holding a copy of `values`.
  template <class T>
  static Tensor from(std::span<const T> values, Shape shape) {
    QLORA_CHECK(std::int64_t(values.size()) == shape.numel(),
                std::to_string(values.size()) + " values do not fill shape " + shape.str());
    Tensor t = empty(shape, dtype_of<T>());
    std::memcpy(t.data(), values.data(), values.size_bytes());
    return t;
  }
  template <class T>
  static Tensor from(const std::vector<T>& values, Shape shape) {
    return from(std::span<const T>(values), shape);
  }
  // Wraps outside memory without copying; `release` runs when the last view is gone.
  static Tensor wrap(void* data, Shape shape, DType dtype, Device device, Storage::Release release = {}) {
    const std::size_t bytes = std::size_t(shape.numel()) * dtype_size(dtype);
    return Tensor(std::make_shared<Storage>(data, bytes, device, std::move(release)), 0, shape, dtype);
  }

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  std::int64_t dim(int i) const { return shape_[i]; }
  std::int64_t numel() const { return shape_.numel(); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::cpu(); }
  std::size_t nbytes() const { return std::size_t(numel()) * dtype_size(dtype_); }
  const std::shared_ptr<Storage>& storage() const { return storage_; }

  void* data() const { return storage_ ? static_cast<char*>(storage_->data()) + offset_ : nullptr; }
  // Typed pointer; the C++ type must match the dtype (raw bytes may be read as uint8_t).
  template <class T>
  T* data() const {
    QLORA_CHECK(dtype_ == dtype_of<T>() || (dtype_ == DType::bytes && dtype_of<T>() == DType::u8),
                "tensor of dtype " + std::string(dtype_name(dtype_)) + " accessed as " + std::string(dtype_name(dtype_of<T>())));
    return static_cast<T*>(data());
  }

  std::string str() const {
    return "tensor" + shape_.str() + " " + std::string(dtype_name(dtype_)) + " on " + device().str();
  }

  // Rows [begin, end) of the leading dimension, sharing storage.
  Tensor slice(std::int64_t begin, std::int64_t end) const {
    QLORA_CHECK(rank() >= 1, "cannot slice a scalar");
    QLORA_CHECK(0 <= begin && begin <= end && end <= dim(0), "slice [" + std::to_string(begin) + ", " +
                std::to_string(end) + ") out of range for " + str());
    const std::size_t row_bytes = dim(0) ? nbytes() / std::size_t(dim(0)) : 0;
    return Tensor(storage_, offset_ + std::size_t(begin) * row_bytes, shape_.with_dim(0, end - begin), dtype_);
  }
  // Index i of the leading dimension, with that dimension removed.
  Tensor select(std::int64_t i) const {
    Tensor row = slice(i, i + 1);
    row.shape_ = shape_.without_first();
    return row;
  }
  Tensor reshape(Shape shape) const {
    QLORA_CHECK(shape.numel() == numel(), "cannot reshape " + str() + " to " + shape.str());
    return Tensor(storage_, offset_, shape, dtype_);
  }

  Tensor to(Device device) const {
    if (device == this->device()) return *this;
    Tensor out = empty(shape_, dtype_, device);
    out.copy_from(*this);
    return out;
  }
  Tensor to(DType dtype) const {
    if (dtype == dtype_) return *this;
    QLORA_CHECK(is_floating(dtype) && is_floating(dtype_), "conversion from " + std::string(dtype_name(dtype_)) +
                " to " + std::string(dtype_name(dtype)) + " is not supported (only between floating dtypes)");
    Tensor out = empty(shape_, dtype, device());
    if (device().is_cpu()) {
      visit_floating(dtype_, [&](auto src) {
        visit_floating(dtype, [&](auto dst) {
          using Src = decltype(src);
          using Dst = decltype(dst);
          cpu::convert(data<Src>(), out.data<Dst>(), numel());
        });
      });
      return out;
    }
#if defined(QLORA_WITH_CUDA)
    QLORA_CHECK(dtype != DType::f64 && dtype_ != DType::f64, "f64 tensors are host-only (the float64 reference path)");
    visit_floating(dtype_, [&](auto src) {
      visit_floating(dtype, [&](auto dst) {
        using Src = decltype(src);
        using Dst = decltype(dst);
        if constexpr (!std::is_same_v<Src, double> && !std::is_same_v<Dst, double>)
          cuda::convert(data<Src>(), out.data<Dst>(), numel(), cuda::current_stream());
      });
    });
    return out;
#else
    throw Error("unreachable: a CUDA tensor in a build without CUDA");
#endif
  }
  Tensor clone() const {
    Tensor out = empty(shape_, dtype_, device());
    out.copy_from(*this);
    return out;
  }

  // Copies the bytes of `src` (same shape and dtype, any device) into this tensor.
  void copy_from(const Tensor& src) {
    QLORA_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, "copy from " + src.str() + " into " + str());
    if (nbytes() == 0) return;
    const Device from = src.device(), to = device();
    if (from.is_cpu() && to.is_cpu()) {
      std::memcpy(data(), src.data(), nbytes());
      return;
    }
#if defined(QLORA_WITH_CUDA)
    if (from.is_cpu()) cuda::copy_to_device(data(), src.data(), nbytes(), cuda::current_stream());
    else if (to.is_cpu()) cuda::copy_to_host(data(), src.data(), nbytes(), cuda::current_stream());
    else cuda::copy_on_device(data(), src.data(), nbytes(), cuda::current_stream());
#endif
  }

  Tensor& zero_() {
    if (device().is_cpu()) std::memset(data(), 0, nbytes());
#if defined(QLORA_WITH_CUDA)
    else cuda::memset_device(data(), 0, nbytes(), cuda::current_stream());
#endif
    return *this;
  }

  // The elements as a host vector of T (the dtype must be T's).
  template <class T>
  std::vector<T> to_vector() const {
    const Tensor host = to(Device::cpu());
    const T* p = host.data<T>();
    return std::vector<T>(p, p + numel());
  }
  template <class T>
  T item() const {
    QLORA_CHECK(numel() == 1, "item() of " + str() + " which has " + std::to_string(numel()) + " elements");
    return to_vector<T>()[0];
  }

 private:
  Tensor(std::shared_ptr<Storage> storage, std::size_t offset, Shape shape, DType dtype)
      : storage_(std::move(storage)), offset_(offset), shape_(shape), dtype_(dtype) {}

  std::shared_ptr<Storage> storage_;
  std::size_t offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::f32;
};

}  // namespace qlora
