#pragma once
// GradientBucketer: the data-parallel gradient all-reduce. The parameters' gradients are laid end to end,
// in the order given, and cut into flat buckets of about `bucket_bytes`; a gradient may straddle a cut.
// During the backward the trainer calls mark_ready(param) once the param's gradient is final; each bucket
// whose gradients are all final is packed, averaged over the ranks (all_reduce_mean_; or summed,
// all_reduce_sum_, with Reduction::sum) and unpacked into the gradients. After the backward, finish() waits
// for the reductions.
//
// * Buckets are reduced strictly in bucket order, whatever the order of mark_ready calls, so every rank
//   issues the same collectives in the same order (the precondition of MPI and NCCL). Give the params in
//   the order their gradients become final (the reverse of the forward) so buckets start early.
// * Host parameters are reduced synchronously inside mark_ready. CUDA parameters are reduced on the
//   bucketer's own stream: an event recorded on the current (compute) stream orders the pack after the
//   gradient is written, the collective runs while the rest of the backward proceeds, and finish() makes
//   the compute stream wait for the unpacks. Between mark_ready(p) and finish() nothing may touch p.grad.
// * With gradient accumulation, call mark_ready only in the last micro-batch's backward.
// * The reduction is in the parameter's dtype (the f32 master weights of the adapters): a gradient of
//   another dtype is refused rather than silently converted. A param without a gradient on this rank
//   contributes zeros (its grad is created), so all ranks still issue the same collectives.
// docs/distributed.md has the design.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "qlora/autograd/param.hpp"
#include "qlora/dist/communicator.hpp"
#if defined(QLORA_WITH_CUDA)
#include "qlora/cuda/runtime.hpp"
#include "qlora/dist/cuda_event.hpp"
#endif

namespace qlora::dist {

class GradientBucketer {
 public:
  static constexpr std::size_t kDefaultBucketBytes = std::size_t(25) << 20;  // PyTorch DDP's default

  // mean: each rank's gradient is its mean over its share of the batch (equal shares). sum: the ranks have
  // already weighted their gradients (the trainer weights by target tokens), only the sum is left to do.
  enum class Reduction { mean, sum };

  // `params` must outlive the bucketer; all on one device that `comm` supports, none frozen, no repeats.
  GradientBucketer(Communicator& comm, std::vector<autograd::Param*> params,
                   std::size_t bucket_bytes = kDefaultBucketBytes, Reduction reduction = Reduction::mean)
      : comm_(comm), params_(std::move(params)), reduction_(reduction) {
    if (params_.empty()) throw Error("gradient bucketer: no parameters to reduce");
    if (bucket_bytes == 0) throw Error("gradient bucketer: the bucket size must be positive");
    device_ = params_.front() ? params_.front()->value.device() : Device::cpu();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const autograd::Param* p = params_[i];
      if (!p) throw Error("gradient bucketer: parameter " + std::to_string(i) + " is null");
      if (!p->requires_grad) throw Error("gradient bucketer: parameter '" + p->name + "' is frozen (requires_grad = false)");
      if (!p->value.defined()) throw Error("gradient bucketer: parameter '" + p->name + "' has no value");
      if (p->value.device() != device_)
        throw Error("gradient bucketer: parameter '" + p->name + "' is on " + p->value.device().str() + " but '" +
                    params_.front()->name + "' is on " + device_.str() + " (one bucketer per device)");
      if (!is_floating(p->value.dtype()))
        throw Error("gradient bucketer: parameter '" + p->name + "' is " + std::string(dtype_name(p->value.dtype())) +
                    ", not a floating dtype");
      if (!index_.emplace(p, i).second) throw Error("gradient bucketer: parameter '" + p->name + "' is listed twice");
    }
    if (!comm_.supports(device_))
      throw Error("gradient bucketer: the parameters are on " + device_.str() + " but the " +
                  std::string(comm_.backend()) + " communicator cannot reduce tensors there");
    lay_out_buckets(bucket_bytes);
    segments_of_param_.resize(params_.size());
    for (std::size_t b = 0; b < buckets_.size(); ++b)
      for (const Segment& s : buckets_[b].segments) segments_of_param_[s.param].push_back(b);
    ready_.assign(params_.size(), false);
#if defined(QLORA_WITH_CUDA)
    if (device_.is_cuda()) {
      cuda::set_device(device_.index);
      comm_stream_ = cuda::create_stream();
      ready_event_ = std::make_unique<CudaEvent>();
      done_event_ = std::make_unique<CudaEvent>();
    }
#endif
    for (Bucket& b : buckets_) b.buffer = Tensor::empty({b.numel}, b.dtype, device_);
    start_step();
  }

  ~GradientBucketer() {
#if defined(QLORA_WITH_CUDA)
    if (comm_stream_) {
      try {
        cuda::synchronize_stream(comm_stream_);  // the buffers are freed below: no reduction may still use them
        for (Bucket& b : buckets_) b.buffer = Tensor();
        cuda::destroy_stream(comm_stream_);
      } catch (...) {  // a destructor must not throw; a sticky CUDA error surfaces at the next call anyway
      }
    }
#endif
  }
  GradientBucketer(const GradientBucketer&) = delete;
  GradientBucketer& operator=(const GradientBucketer&) = delete;

  std::size_t bucket_count() const { return buckets_.size(); }
  // Elements of bucket b (all but the last bucket of a dtype run are full).
  std::int64_t bucket_numel(std::size_t b) const { return buckets_.at(b).numel; }
  // How many buckets this step has reduced (or, on CUDA, enqueued).
  std::size_t buckets_launched() const { return next_bucket_; }

  // The param's gradient is final for this step; reduces every bucket that thereby becomes complete.
  void mark_ready(autograd::Param* param) {
    const auto found = index_.find(param);
    if (found == index_.end())
      throw Error("gradient bucketer: parameter '" + (param ? param->name : std::string("null")) +
                  "' is not one of this bucketer's");
    const std::size_t i = found->second;
    if (ready_[i]) throw Error("gradient bucketer: parameter '" + param->name + "' was marked ready twice in one step");
    check_gradient(*param);
    ready_[i] = true;
    for (std::size_t b : segments_of_param_[i]) buckets_[b].pending -= 1;
    launch_complete_buckets();
  }

  // Marks every param not yet marked (in order): the whole all-reduce at once, without overlap.
  void mark_all_ready() {
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (!ready_[i]) mark_ready(params_[i]);
  }

  // Ends the step: every param must have been marked. On CUDA the current stream then waits for the
  // reductions (the host does not); on the host they are already done. Resets for the next step.
  void finish() {
    std::string missing;
    for (std::size_t i = 0; i < params_.size(); ++i)
      if (!ready_[i]) missing += (missing.empty() ? "'" : ", '") + params_[i]->name + "'";
    if (!missing.empty()) throw Error("gradient bucketer: finish() before these parameters were marked ready: " + missing);
#if defined(QLORA_WITH_CUDA)
    if (comm_stream_) {
      done_event_->record(comm_stream_);
      done_event_->make_wait(cuda::current_stream());
    }
#endif
    start_step();
  }

  // mark_all_ready() then finish(): for a trainer that reduces after the backward.
  void all_reduce() {
    mark_all_ready();
    finish();
  }

 private:
  // A contiguous run of one param's flattened gradient, [param_offset, param_offset + numel), stored at
  // [bucket_offset, bucket_offset + numel) of its bucket.
  struct Segment {
    std::size_t param;
    std::int64_t param_offset;
    std::int64_t bucket_offset;
    std::int64_t numel;
  };
  struct Bucket {
    DType dtype = DType::f32;
    std::int64_t numel = 0;
    std::vector<Segment> segments;
    int pending = 0;  // segments whose param is not yet ready this step
    Tensor buffer;
  };

  // Fills buckets in param order; a dtype change starts a new bucket (a bucket is one flat tensor).
  void lay_out_buckets(std::size_t bucket_bytes) {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Tensor& v = params_[i]->value;
      const std::int64_t capacity = std::max<std::int64_t>(1, std::int64_t(bucket_bytes / dtype_size(v.dtype())));
      std::int64_t done = 0;
      while (done < v.numel()) {
        if (buckets_.empty() || buckets_.back().dtype != v.dtype() || buckets_.back().numel == capacity) {
          buckets_.emplace_back();
          buckets_.back().dtype = v.dtype();
        }
        Bucket& b = buckets_.back();
        const std::int64_t n = std::min(capacity - b.numel, v.numel() - done);
        b.segments.push_back(Segment{i, done, b.numel, n});
        b.numel += n;
        done += n;
      }
    }
  }

  void start_step() {
    std::fill(ready_.begin(), ready_.end(), false);
    for (Bucket& b : buckets_) b.pending = int(b.segments.size());
    next_bucket_ = 0;
  }

  void check_gradient(autograd::Param& p) const {
    if (!p.grad.defined()) {
      // No gradient reached it on this rank: it still takes part, with zeros.
      p.grad = Tensor::zeros(p.value.shape(), p.value.dtype(), p.value.device());
      return;
    }
    if (p.grad.dtype() != p.value.dtype() || p.grad.device() != p.value.device() || p.grad.shape() != p.value.shape())
      throw Error("gradient bucketer: the gradient of '" + p.name + "' is " + p.grad.str() + " but the parameter is " +
                  p.value.str() + " (the bucketer reduces in the parameter's dtype)");
  }

  void launch_complete_buckets() {
    while (next_bucket_ < buckets_.size() && buckets_[next_bucket_].pending == 0) {
      reduce(buckets_[next_bucket_]);
      ++next_bucket_;
    }
  }

  // The flattened rows [offset, offset + n) of a gradient, as a 1-D view.
  static Tensor flat_part(const Tensor& t, std::int64_t offset, std::int64_t n) {
    return t.reshape({t.numel()}).slice(offset, offset + n);
  }

  void reduce(Bucket& b) {
#if defined(QLORA_WITH_CUDA)
    std::optional<StreamGuard> on_comm_stream;
    if (comm_stream_) {
      ready_event_->record(cuda::current_stream());  // everything the backward enqueued so far
      ready_event_->make_wait(comm_stream_);
      on_comm_stream.emplace(comm_stream_);           // the copies and the collective below go there
    }
#endif
    for (const Segment& s : b.segments)
      flat_part(b.buffer, s.bucket_offset, s.numel).copy_from(flat_part(params_[s.param]->grad, s.param_offset, s.numel));
    if (reduction_ == Reduction::mean) comm_.all_reduce_mean_(b.buffer);
    else comm_.all_reduce_sum_(b.buffer);
    for (const Segment& s : b.segments) {
      Tensor part = flat_part(params_[s.param]->grad, s.param_offset, s.numel);
      part.copy_from(flat_part(b.buffer, s.bucket_offset, s.numel));
    }
  }

  Communicator& comm_;
  std::vector<autograd::Param*> params_;
  Reduction reduction_;
  std::unordered_map<const autograd::Param*, std::size_t> index_;
  Device device_;
  std::vector<Bucket> buckets_;
  std::vector<std::vector<std::size_t>> segments_of_param_;  // per param: the buckets holding a part of it
  std::vector<bool> ready_;
  std::size_t next_bucket_ = 0;
#if defined(QLORA_WITH_CUDA)
  cuda::Stream comm_stream_ = nullptr;
  std::unique_ptr<CudaEvent> ready_event_, done_event_;
#endif
};

}  // namespace qlora::dist
