#pragma once
// CUDA AdamW over many f32 tensors in one kernel launch (kernel layer; CPU twin and the table types:
// qlora/cpu/multi_tensor_adamw.hpp). The table is in device memory: `tensors` holds each tensor's device
// pointers and size, `chunks` the (tensor, [begin, end)) pieces from cpu::make_tensor_chunks; the kernel runs
// one block per chunk. Whoever owns the parameters uploads the table once and reuses it every step
// (train::AdamW does, rebuilding it only when a pointer changes).

#include <cstdint>

#include "qlora/cpu/multi_tensor_adamw.hpp"
#include "qlora/cuda/stream.hpp"

namespace qlora::cuda {

using cpu::AdamWFactors;
using cpu::AdamWTensor;
using cpu::TensorChunk;

// One AdamW step (torch.optim.AdamW's update, factors from cpu::adamw_factors<float>) over every chunk.
// tensors and chunks are device pointers; each tensor's four arrays must not overlap one another.
void multi_tensor_adamw(const AdamWTensor<float>* tensors, const TensorChunk* chunks, std::int64_t num_chunks,
                        const AdamWFactors<float>& factors, Stream stream);

}  // namespace qlora::cuda
