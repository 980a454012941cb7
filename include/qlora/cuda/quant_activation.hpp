#pragma once
// CUDA fake quantization of activations (kernel layer; CPU twin: qlora/cpu/quant_activation.hpp, which
// defines the formula): symmetric b-bit, per token (one scale per row) or with one static scale.
// T in {float, qlora::bf16}; the arithmetic is f32, bit-exact with the CPU twin on the f32 values; bf16
// results are the f32 value rounded to nearest even. Device pointers; y may alias x.

#include <cstdint>

#include "qlora/core/half.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

// x, y: (rows, cols); row r uses scale = max_j |x[r, j]| / (2^(bits-1) - 1).
template <class T>
void fake_quantize_per_token(const T* x, T* y, std::int64_t rows, std::int64_t cols, int bits, Stream stream);

// n values on the grid of one given scale (per-tensor, static).
template <class T>
void fake_quantize_with_scale(const T* x, T* y, std::int64_t n, float scale, int bits, Stream stream);

}  // namespace qlora::cuda
