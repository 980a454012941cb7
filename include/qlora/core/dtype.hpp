#pragma once
// Element types of a Tensor. `bytes` is raw storage for packed quantized codes: its shape counts bytes and
// the quant layer gives them meaning. f64 exists for the float64 reference paths (gradient checks).

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"

namespace qlora {

enum class DType : std::uint8_t { f32, f64, bf16, f16, i8, u8, i32, bytes };

constexpr std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::bf16: case DType::f16: return 2;
    case DType::i8: case DType::u8: case DType::bytes: return 1;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i8: return "i8";
    case DType::u8: return "u8";
    case DType::i32: return "i32";
    case DType::bytes: return "bytes";
  }
  return "?";
}

constexpr bool is_floating(DType t) {
  return t == DType::f32 || t == DType::f64 || t == DType::bf16 || t == DType::f16;
}

inline DType parse_dtype(std::string_view name) {
  for (DType t : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i8, DType::u8, DType::i32, DType::bytes})
    if (dtype_name(t) == name) return t;
  throw Error("unknown dtype '" + std::string(name) + "' (expected f32, f64, bf16, f16, i8, u8, i32 or bytes)");
}

// The DType of a C++ element type: dtype_of<float> == DType::f32.
template <class T> inline constexpr bool dtype_always_false = false;
template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, double>) return DType::f64;
  else if constexpr (std::is_same_v<T, bf16>) return DType::bf16;
  else if constexpr (std::is_same_v<T, f16>) return DType::f16;
  else if constexpr (std::is_same_v<T, std::int8_t>) return DType::i8;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return DType::u8;
  else if constexpr (std::is_same_v<T, std::int32_t>) return DType::i32;
  else static_assert(dtype_always_false<T>, "no DType for this C++ type");
}

// Calls fn(T{}) with the C++ type of a floating DType; the ops layer's single switch over dtypes.
template <class Fn>
decltype(auto) visit_floating(DType t, Fn&& fn) {
  switch (t) {
    case DType::f32: return fn(float{});
    case DType::f64: return fn(double{});
    case DType::bf16: return fn(bf16{});
    case DType::f16: return fn(f16{});
    default: throw Error("expected a floating dtype, got " + std::string(dtype_name(t)));
  }
}

}  // namespace qlora
