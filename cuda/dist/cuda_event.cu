// CudaEvent (include/qlora/dist/cuda_event.hpp): cudaEvent_t behind a header without CUDA includes.

#include <cuda_runtime.h>

#include "common.cuh"
#include "qlora/dist/cuda_event.hpp"

namespace qlora::dist {

CudaEvent::CudaEvent() {
  cudaEvent_t event = nullptr;
  QLORA_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  event_ = event;
}

CudaEvent::~CudaEvent() {
  if (event_) cudaEventDestroy(event_);  // never throws from a destructor; a failure here leaks one event
}

void CudaEvent::record(cuda::Stream stream) { QLORA_CUDA_CHECK(cudaEventRecord(event_, stream)); }

void CudaEvent::make_wait(cuda::Stream stream) const { QLORA_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0)); }

}  // namespace qlora::dist
