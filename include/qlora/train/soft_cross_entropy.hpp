#pragma once
// Distillation on next-token logits (methods/teacher-intervention.md, "Losses": L_pred, the soft
// cross-entropy -sum_v softmax(z_T)_v log softmax(z_S)_v), for an LM head: z = hidden W^T for the student
// and the teacher, computed chunk_rows rows at a time so that the (tokens x vocab) logits never exist whole
// (as ops::linear_cross_entropy). Per row, with lse = logsumexp(z_S) and p_T = softmax(z_T) (sum p_T = 1):
//   loss_r = lse_r - sum_v p_T z_S,      d loss_r / d z_S = softmax(z_S) - p_T.
// The loss is the mean over rows (tokens), summed over the vocabulary. TernaryBERT's code averages over
// the classes as well; with a vocabulary that would shrink the term by V, so we keep the per-token sum
// (docs/objectives.md).

#include <algorithm>
#include <cstdint>
#include <vector>

#include "qlora/core/tensor.hpp"
#include "qlora/ops/cross_entropy.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/ops/reduce.hpp"
#include "qlora/ops/softmax.hpp"

namespace qlora::train {

struct SoftCrossEntropyResult {
  double loss = 0;  // weight * mean over rows
  Tensor dhidden;   // d loss / d hidden (N, d), when asked for
};

// hidden (N, d) with weight (V, d): the student; teacher_hidden (N, d') with teacher_weight (V, d').
inline SoftCrossEntropyResult linear_soft_cross_entropy(const Tensor& hidden, const Tensor& weight,
                                                        const Tensor& teacher_hidden, const Tensor& teacher_weight,
                                                        double loss_weight, std::int64_t chunk_rows, bool want_grad) {
  QLORA_CHECK(hidden.rank() == 2 && weight.rank() == 2 && hidden.dim(1) == weight.dim(1),
              "soft cross-entropy: expected hidden (N, d) and weight (V, d), got " + hidden.shape().str() + " and " +
                  weight.shape().str());
  QLORA_CHECK(teacher_hidden.rank() == 2 && teacher_weight.rank() == 2 && teacher_hidden.dim(0) == hidden.dim(0) &&
                  teacher_hidden.dim(1) == teacher_weight.dim(1) && teacher_weight.dim(0) == weight.dim(0),
              "soft cross-entropy: the teacher's hidden " + teacher_hidden.shape().str() + " and head " +
                  teacher_weight.shape().str() + " do not match the student's " + hidden.shape().str() + " and " +
                  weight.shape().str());
  QLORA_CHECK(chunk_rows > 0, "soft cross-entropy: chunk_rows must be positive, got " + std::to_string(chunk_rows));
  const std::int64_t rows = hidden.dim(0);
  SoftCrossEntropyResult r;
  if (rows == 0) return r;
  if (want_grad) r.dhidden = Tensor::empty(hidden.shape(), hidden.dtype(), hidden.device());
  const Tensor teacher_h = teacher_hidden.to(hidden.device()).to(hidden.dtype());
  const Tensor teacher_w = teacher_weight.to(hidden.device()).to(hidden.dtype());
  // Every row "ignored": cross_entropy then yields only the log-sum-exp of each row.
  const std::vector<std::int32_t> no_targets(std::size_t(std::min(rows, chunk_rows)), ops::kIgnoreIndex);
  const Tensor all_ignored = Tensor::from(no_targets, {std::int64_t(no_targets.size())}).to(hidden.device());
  const float grad_scale = float(loss_weight / double(rows));
  const auto sum_of = [](const Tensor& v) { return ops::detail::scalar_as_double(ops::sum_last(v)); };
  double total = 0;
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const std::int64_t r1 = std::min(rows, r0 + chunk_rows);
    const Tensor z_student = ops::matmul(hidden.slice(r0, r1), weight, false, true);  // (c, V)
    const Tensor p_teacher = ops::softmax(ops::matmul(teacher_h.slice(r0, r1), teacher_w, false, true));
    const Tensor lse = ops::cross_entropy(z_student, all_ignored.slice(0, r1 - r0)).lse;
    const Tensor cross = ops::sum_last(ops::mul(p_teacher, z_student));  // sum_v p_T z_S per row
    total += sum_of(lse) - sum_of(cross);
    if (!want_grad) continue;
    Tensor dz = ops::softmax(z_student);
    ops::axpy_(dz, -1.f, p_teacher);
    ops::scale_(dz, grad_scale);
    Tensor dh = r.dhidden.slice(r0, r1);
    ops::matmul_into(dh, dz, weight);  // (c, V) @ (V, d)
  }
  r.loss = loss_weight * total / double(rows);
  return r;
}

}  // namespace qlora::train
