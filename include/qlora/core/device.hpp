#pragma once
// Device: where a tensor's bytes live: the host ("cpu") or one CUDA device ("cuda:N").

#include <charconv>
#include <string>
#include <string_view>

#include "qlora/core/error.hpp"

namespace qlora {

struct Device {
  enum class Kind { cpu, cuda };
  Kind kind = Kind::cpu;
  int index = 0;

  static constexpr Device cpu() { return {Kind::cpu, 0}; }
  static constexpr Device cuda(int index = 0) { return {Kind::cuda, index}; }

  bool is_cpu() const { return kind == Kind::cpu; }
  bool is_cuda() const { return kind == Kind::cuda; }
  bool operator==(const Device&) const = default;

  std::string str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

  // "cpu", "cuda" (= cuda:0) or "cuda:N".
  static Device parse(std::string_view text) {
    if (text == "cpu") return cpu();
    if (text == "cuda") return cuda(0);
    if (text.starts_with("cuda:")) {
      int index = -1;
      const auto digits = text.substr(5);
      const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
      if (ec == std::errc() && end == digits.data() + digits.size() && index >= 0) return cuda(index);
    }
    throw Error("unknown device '" + std::string(text) + "' (expected cpu, cuda or cuda:N)");
  }
};

}  // namespace qlora
