#pragma once
// GramAccumulator: the calibration statistic of one linear layer, H = (1/N) sum_t x_t x_t^T over the N
// input rows x_t (d_in each) it has seen (baselines.md section 3: GPTQ's H up to its constant factor 2,
// which no algorithm here depends on). Streams: add() takes any number of rows at a time, so memory is
// d_in^2 whatever N is. One GEMM x^T x per call (beta = 1) into the running sum, on the device of the
// inputs: in f64 on the CPU, in f32 on CUDA (f64 tensors are host-only); gram() divides by N in double and
// rounds once to f32.
//
// Why f64 on the CPU: distributed calibration (models/llama/calibration.hpp) all-reduces the ranks' raw
// sums and row counts (raw_sum(), set_rows()) before gram(), so the windows are added in another order than
// one process adds them. In f32 that reordering moves H by ~1e-7, enough to flip a few GPTQ codes, and
// sequential quantization carries each flip into every later block (observed on stories260K: hundreds of
// codes of the last block). In f64 the two orders differ by ~1e-16 and the final rounding to f32 hides it
// (unless a value lies within that of an f32 rounding midpoint, about 2^-29 per element): H, hence the
// codes, are those of one process. On CUDA, H equals one process's to f32 rounding only.

#include <cstdint>
#include <string>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/matmul.hpp"

namespace qlora::quant {

class GramAccumulator {
 public:
  GramAccumulator() = default;
  GramAccumulator(std::int64_t features, Device device)
      : sum_(Tensor::zeros(Shape{features, features}, device.is_cpu() ? DType::f64 : DType::f32, device)) {}

  std::int64_t features() const { return sum_.defined() ? sum_.dim(0) : 0; }
  std::int64_t rows() const { return rows_; }
  bool defined() const { return sum_.defined(); }

  // x (..., d_in): f32 or f64 on the CPU (accumulated in f64), f32 or bf16 on CUDA (accumulated in f32);
  // NaN/Inf are the caller's to exclude.
  void add(const Tensor& x) {
    QLORA_CHECK(sum_.defined(), "GramAccumulator: add() before construction with a feature count");
    QLORA_CHECK(x.defined() && x.rank() >= 1 && x.shape().last() == features(),
                "GramAccumulator: inputs must be (..., " + std::to_string(features()) + "), got " +
                    (x.defined() ? x.shape().str() : std::string("(undefined)")));
    const std::int64_t n = x.shape().rows();
    if (n == 0) return;
    const Tensor x2 = x.reshape(Shape{n, features()}).to(sum_.device());
    const Tensor xf = x2.device().is_cpu() ? x2.to(DType::f64) : x2;
    ops::matmul_into(sum_, xf, xf, /*trans_a=*/true, /*trans_b=*/false, 1.f, 1.f);
    rows_ += n;
  }

  // The raw sum X^T X (f64 on the CPU, f32 on CUDA) and the row count, for an all-reduce across ranks:
  // afterwards the sum holds every rank's rows and set_rows() their total.
  Tensor& raw_sum() { return sum_; }
  void set_rows(std::int64_t rows) { rows_ = rows; }

  // H = X^T X / N as an f32 CPU tensor [d_in, d_in] (the solvers run on the CPU or take it to the device):
  // divided in double, rounded once.
  Tensor gram() const {
    QLORA_CHECK(rows_ > 0, "GramAccumulator: no calibration rows were seen");
    const Tensor sum = sum_.to(Device::cpu()).to(DType::f64);  // may share sum_'s storage: only read
    Tensor h = Tensor::empty(sum.shape(), DType::f32, Device::cpu());
    const double* s = sum.data<double>();
    float* out = h.data<float>();
    const double n = double(rows_);
    for (std::int64_t i = 0; i < h.numel(); ++i) out[i] = float(s[i] / n);
    return h;
  }

 private:
  Tensor sum_;
  std::int64_t rows_ = 0;
};

}  // namespace qlora::quant
