#pragma once
// The CUDA stream type without the CUDA headers: host launchers take a qlora::cuda::Stream so that
// headers declaring them compile on machines without the toolkit. Identical to cudaStream_t.

struct CUstream_st;

namespace qlora::cuda {
using Stream = CUstream_st*;
}  // namespace qlora::cuda
