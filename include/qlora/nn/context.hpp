#pragma once
// Context: what a module's forward and backward need beyond their inputs: whether this is training (dropout
// on, activations saved), the step's random seed, and the shared scratch buffer into which quantized bases
// dequantize their weights (one layer at a time, never the whole model).

#include <cstdint>
#include <functional>
#include <string>

#include "qlora/core/tensor.hpp"

namespace qlora::nn {

// One reusable buffer, grown to the largest request. Views returned by get() stay valid until the next get()
// (stream order keeps GPU work correct: the next kernel that writes the buffer runs after the last reader).
class Workspace {
 public:
  Tensor get(const Shape& shape, DType dtype, Device device) {
    const std::size_t bytes = std::size_t(shape.numel()) * dtype_size(dtype);
    if (!buffer_.defined() || buffer_.device() != device || buffer_.nbytes() < bytes)
      buffer_ = Tensor::empty(Shape{std::int64_t(bytes == 0 ? 1 : bytes)}, DType::u8, device);
    auto keep_alive = buffer_.storage();
    return Tensor::wrap(buffer_.data(), shape, dtype, device, [keep_alive](void*) {});
  }
  std::size_t bytes() const { return buffer_.defined() ? buffer_.nbytes() : 0; }

 private:
  Tensor buffer_;
};

struct Context {
  bool training = true;
  std::uint64_t seed = 0;  // dropout masks derive from (seed, step, the module's stream id)
  std::uint64_t step = 0;
  Workspace workspace;
  // Calibration hook (PTQ, CLoQ): when set, every linear calls it with its name and its input rows
  // (tokens, d_in) before computing its output. Unset in training and inference.
  std::function<void(const std::string& layer, const Tensor& x)> observe_linear_input;
};

// A 64-bit mix (splitmix64's finaliser) that gives every (seed, step, module) its own dropout stream.
inline std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t step, std::uint64_t stream) {
  std::uint64_t z = seed ^ (step * 0x9E3779B97F4A7C15ull) ^ (stream * 0xD1B54A32D192ED03ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace qlora::nn
