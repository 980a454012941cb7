#pragma once
// CudaEvent: a CUDA event without the CUDA headers, for ordering work between two streams (the gradient
// bucketer's compute and communication streams). Only with CUDA; definitions in cuda/dist/cuda_event.cu.

#if defined(QLORA_WITH_CUDA)

#include "qlora/cuda/runtime.hpp"

struct CUevent_st;

namespace qlora::dist {

class CudaEvent {
 public:
  // An event of the current device, without timing (the cheapest kind to record and wait on).
  CudaEvent();
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  // Marks the point reached by the work enqueued so far on `stream`.
  void record(cuda::Stream stream);
  // Makes later work on `stream` wait for the last recorded point (the host does not wait).
  void make_wait(cuda::Stream stream) const;

 private:
  CUevent_st* event_ = nullptr;
};

// Makes `stream` the current stream of this host thread until the guard ends, so that ops, copies and
// collectives issued meanwhile are enqueued on it.
class StreamGuard {
 public:
  explicit StreamGuard(cuda::Stream stream) : previous_(cuda::current_stream()) { cuda::set_current_stream(stream); }
  ~StreamGuard() { cuda::set_current_stream(previous_); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  cuda::Stream previous_;
};

}  // namespace qlora::dist

#endif  // QLORA_WITH_CUDA
