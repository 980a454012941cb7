#pragma once
// qlora::Error: the one exception type of the library. Its message is meant for a user: it names the
// offending thing (file, tensor, flag, shape) and its value. Thrown at boundaries; kernels assume checked input.

#include <stdexcept>
#include <string>

namespace qlora {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// QLORA_CHECK(cond, message-expression): throws qlora::Error(message) when cond is false.
#define QLORA_CHECK(cond, ...)                                  \
  do {                                                          \
    if (!(cond)) throw ::qlora::Error(std::string(__VA_ARGS__)); \
  } while (0)

}  // namespace qlora
