#pragma once
// RILQ's model-wise activation discrepancy (methods/rilq.md, "Objective", from aiha-lab/RILQ main.py):
//   L_MD = mean( (h_q - h_FP)^2 )   over every batch / position / feature entry,
//   L    = w_MD L_MD + w_GT L_GT    with w_MD = w_GT = 0.5 (--a_dis_weight, --gt_weight),
// h being the hidden state after the final RMSNorm (what HF's LlamaModel returns). The same weighted mean
// squared error is Teacher Intervention's per-layer representation and attention-output loss
// (methods/teacher-intervention.md, "Losses"), so both objectives call mse_discrepancy.

#include <cstdint>
#include <vector>

#include "qlora/core/tensor.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/reduce.hpp"

namespace qlora::train {

struct RilqWeights {
  double discrepancy = 0.5;  // w_MD (--a_dis_weight)
  double cross_entropy = 0.5;  // w_GT (--gt_weight)
};

struct DiscrepancyResult {
  double loss = 0;  // weight * mean((student - teacher)^2)
  Tensor grad;      // d loss / d student (student's shape and dtype), when asked for
};

// weight * mean over all entries of (student - teacher)^2, and its gradient 2 weight (student - teacher) / n.
inline DiscrepancyResult mse_discrepancy(const Tensor& student, const Tensor& teacher, double weight, bool want_grad) {
  QLORA_CHECK(student.defined() && teacher.defined() && student.shape() == teacher.shape(),
              "discrepancy loss: student " + (student.defined() ? student.shape().str() : std::string("none")) +
                  " and teacher " + (teacher.defined() ? teacher.shape().str() : std::string("none")) +
                  " activations differ in shape");
  QLORA_CHECK(student.numel() > 0, "discrepancy loss: empty activations");
  Tensor diff = student.clone();
  ops::axpy_(diff, -1.f, teacher.to(student.device()).to(student.dtype()));
  const double n = double(student.numel());
  const std::vector<Tensor> one = {diff};
  DiscrepancyResult r;
  r.loss = weight * ops::sum_squares(one) / n;
  if (want_grad) {
    ops::scale_(diff, float(2.0 * weight / n));
    r.grad = std::move(diff);
  }
  return r;
}

}  // namespace qlora::train
