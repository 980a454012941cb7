#pragma once
// GramAccumulator: the calibration statistic of one linear layer, H = (1/N) sum_t x_t x_t^T over the N
// input rows x_t (d_in each) it has seen (baselines.md section 3: GPTQ's H up to its constant factor 2,
// which no algorithm here depends on). Streams: add() takes any number of rows at a time, so memory is
// d_in^2 whatever N is. Accumulates in f32 on the device of the inputs (one GEMM x^T x per call, beta = 1)
// and keeps the running sum; gram() divides by N. merge_sum() lets ranks all-reduce the raw sum first
// (distributed calibration: issue 10).

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
      : sum_(Tensor::zeros(Shape{features, features}, DType::f32, device)) {}

  std::int64_t features() const { return sum_.defined() ? sum_.dim(0) : 0; }
  std::int64_t rows() const { return rows_; }
  bool defined() const { return sum_.defined(); }

  // x (..., d_in) in f32 (or bf16 on CUDA, accumulated in f32); NaN/Inf are the caller's to exclude.
  void add(const Tensor& x) {
    QLORA_CHECK(sum_.defined(), "GramAccumulator: add() before construction with a feature count");
    QLORA_CHECK(x.defined() && x.rank() >= 1 && x.shape().last() == features(),
                "GramAccumulator: inputs must be (..., " + std::to_string(features()) + "), got " +
                    (x.defined() ? x.shape().str() : std::string("(undefined)")));
    const std::int64_t n = x.shape().rows();
    if (n == 0) return;
    const Tensor x2 = x.reshape(Shape{n, features()}).to(sum_.device());
    const Tensor xf = x2.device().is_cpu() ? x2.to(DType::f32) : x2;
    ops::matmul_into(sum_, xf, xf, /*trans_a=*/true, /*trans_b=*/false, 1.f, 1.f);
    rows_ += n;
  }

  // The raw sum X^T X (f32, on the accumulation device), for an all-reduce across ranks.
  Tensor& raw_sum() { return sum_; }
  void set_rows(std::int64_t rows) { rows_ = rows; }

  // H = X^T X / N as an f32 CPU tensor [d_in, d_in] (the solvers run on the CPU or take it to the device).
  Tensor gram() const {
    QLORA_CHECK(rows_ > 0, "GramAccumulator: no calibration rows were seen");
    Tensor h = sum_.to(Device::cpu()).to(DType::f32);
    ops::scale_(h, float(1.0 / double(rows_)));
    return h;
  }

 private:
  Tensor sum_;
  std::int64_t rows_ = 0;
};

}  // namespace qlora::quant
