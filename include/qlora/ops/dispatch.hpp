#pragma once
// How every op reaches its kernels: check the tensors (defined, same device, expected dtype and shape),
// then call fn(T{}, Backend{}) with the element type and backend of the inputs. CPU runs f32 and f64
// (the float64 reference path); CUDA runs f32 and bf16. Nothing else chooses between cpu:: and cuda::.

#include <initializer_list>
#include <string>
#include <string_view>
#include <type_traits>

#include "qlora/core/tensor.hpp"
#include "qlora/cuda/runtime.hpp"

namespace qlora::ops::detail {

struct Cpu {};
struct Cuda {};
template <class Backend>
inline constexpr bool is_cpu_v = std::is_same_v<Backend, Cpu>;

[[noreturn]] inline void fail(std::string_view op, const std::string& what) {
  throw Error(std::string(op) + ": " + what);
}

inline void check_defined(std::string_view op, const Tensor& t, std::string_view name) {
  if (!t.defined()) fail(op, std::string(name) + " is an undefined tensor");
}

// All tensors defined, on one device, of one dtype (the first one's).
inline void check_same(std::string_view op, std::initializer_list<std::pair<const Tensor*, const char*>> tensors) {
  const Tensor* first = tensors.begin()->first;
  for (const auto& [t, name] : tensors) {
    check_defined(op, *t, name);
    if (t->device() != first->device())
      fail(op, std::string(name) + " is on " + t->device().str() + " but " + tensors.begin()->second + " is on " +
                   first->device().str());
    if (t->dtype() != first->dtype())
      fail(op, std::string(name) + " is " + std::string(dtype_name(t->dtype())) + " but " + tensors.begin()->second +
                   " is " + std::string(dtype_name(first->dtype())));
  }
}

inline void check_shape(std::string_view op, const Tensor& t, const Shape& expected, std::string_view name) {
  if (t.shape() != expected)
    fail(op, std::string(name) + " has shape " + t.shape().str() + ", expected " + expected.str());
}

inline void check_dtype(std::string_view op, const Tensor& t, DType expected, std::string_view name) {
  if (t.dtype() != expected)
    fail(op, std::string(name) + " is " + std::string(dtype_name(t.dtype())) + ", expected " +
                 std::string(dtype_name(expected)));
}

inline void check_device(std::string_view op, const Tensor& t, Device expected, std::string_view name) {
  if (t.device() != expected) fail(op, std::string(name) + " is on " + t.device().str() + ", expected " + expected.str());
}

// The dtype of per-row statistics (rstd, lse, losses) and of atomically accumulated gradients: the input's
// own dtype on the CPU (so the float64 path stays float64), f32 on CUDA.
inline DType accum_dtype(const Tensor& x) { return x.device().is_cpu() ? x.dtype() : DType::f32; }

template <class Fn>
decltype(auto) dispatch(std::string_view op, const Tensor& x, Fn&& fn) {
  if (x.device().is_cpu()) {
    if (x.dtype() == DType::f32) return fn(float{}, Cpu{});
    if (x.dtype() == DType::f64) return fn(double{}, Cpu{});
    fail(op, "the CPU backend computes in f32 or f64, got " + std::string(dtype_name(x.dtype())) +
                 " (convert with .to(DType::f32))");
  }
#if defined(QLORA_WITH_CUDA)
  cuda::set_device(x.device().index);
  if (x.dtype() == DType::f32) return fn(float{}, Cuda{});
  if (x.dtype() == DType::bf16) return fn(bf16{}, Cuda{});
  fail(op, "the CUDA backend computes in f32 or bf16, got " + std::string(dtype_name(x.dtype())));
#else
  fail(op, "tensor on " + x.device().str() + " but qlora was built without CUDA");
#endif
}

// The value of a one-element f32 or f64 tensor on any device, as a double (one device read).
inline double scalar_as_double(const Tensor& t) {
  const Tensor flat = t.reshape({});
  if (t.dtype() == DType::f64) return flat.item<double>();
  if (t.dtype() == DType::f32) return double(flat.item<float>());
  throw Error("expected an f32 or f64 scalar, got " + t.str());
}

// The accumulator/statistics pointer type that goes with element type T on a backend (see accum_dtype).
template <class T, class Backend>
using accum_t = std::conditional_t<is_cpu_v<Backend>, T, float>;

}  // namespace qlora::ops::detail
