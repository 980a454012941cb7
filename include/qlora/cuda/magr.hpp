#pragma once
// CUDA proximal step of MagR (kernel layer; CPU twin: qlora/cpu/magr.hpp; maths: ../shared/methods/magr.md):
// out[r, G] = prox_{t ||.||_inf}(v[r, G]) = clip(v, -c, c) with sum_j max(|v_j| - c, 0) = t (0 when
// ||v||_1 <= t; t = 0 copies v), for every row r of v [rows, cols] and every group G of `group` columns
// (the last group of a row may be shorter). f32, device pointers; out may alias v.

#include <cstdint>

#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

void linf_prox_rows(const float* v, float* out, std::int64_t rows, std::int64_t cols, std::int64_t group, float t,
                    Stream stream);

}  // namespace qlora::cuda
