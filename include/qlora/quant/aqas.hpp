#pragma once
// Activation-aware scale search for a group of linears that share one input X (w4a8-aqas-slac-dint.md
// section 1): AWQ's grid search (MarsJacobs/llm-awq auto_scale.py, inherited from mit-han-lab/llm-awq) and
// AQAS, the same search judged with both operands quantized.
//
//   x_mag[c] = mean_tokens |X[:, c]|
//   w_mag[c] = mean_rows |W[o, c]| / max_{c' in the quantization group of (o, c)} |W[o, c']|   (W: the
//              group's weights stacked by rows; the group size is the weight format's)
//   for a in {0, 1/grid, ..., (grid-1)/grid}                      (grid 20: 0, 0.05, ..., 0.95)
//     s = clamp(x_mag^a / w_mag^(1-a), min 1e-4);  s /= sqrt(max(s) min(s))
//     candidate: inputs Qa(X diag(s)^-1), weights Qw(W diag(s))
//     err(a) = objective(candidate)                               (default: mean squared output error of
//                                                                  the linears themselves against X W^T)
//   keep the argmin; the caller folds diag(s)^-1 into the op before the group (norm weight, or the previous
//   linear's rows) and diag(s) into the group's columns (models/llama/aqas.hpp).
// AWQ: Qa = identity (activation_bits = 0). AQAS: Qa = per-token b-bit fake quantization
// (activation_quant.hpp); the exact loss of the paper is unverified (the method file reconstructs it).
// Qw: any QuantConfig, through quantize() then dequantize() (int, dINT, NF4).
//
// The grid does not contain s = 1 (a = 0 gives s proportional to 1 / w_mag), so "never worse than no
// scaling" is not guaranteed by the grid alone: the search also evaluates the identity (s = 1, inputs
// Qa(X), weights Qw(W)) and keeps it when it is strictly better (ScaleSearchOptions::include_identity).
// The grid's own argmin is reported either way, which is what reproduces AWQ.
//
// w_mag floors: a column whose weights are all zero has w_mag 0; it is floored at 1e-8 so that s stays
// finite (scaling such a column changes nothing). Statistics are computed in double on the host.
//
// Sums over the calibration inputs. x_mag and every err(a) are sums over the inputs (calibration windows)
// of per-input partials: each input gives one row (its channels' sum |x| and its row count; each
// candidate's sum of squared errors and element count), and the rows are added in input order in double.
// An InputSums hook does that addition, so the same search runs on inputs held by one process
// (sum_in_input_order, the default) or dealt across ranks (models/llama/aqas.hpp: the ranks' rows are
// exchanged exactly first, and every rank gets one process's sums bit for bit).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "qlora/core/error.hpp"
#include "qlora/core/tensor.hpp"
#include "qlora/ops/elementwise.hpp"
#include "qlora/ops/matmul.hpp"
#include "qlora/ops/reduce.hpp"
#include "qlora/quant/activation_quant.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/format.hpp"
#include "qlora/quant/quantize.hpp"

namespace qlora::quant {

struct ScaleSearchOptions {
  QuantConfig weight_format;     // Qw
  int activation_bits = 8;       // Qa: per-token fake quantization of X diag(s)^-1; 0 = identity (AWQ)
  int grid = 20;                 // a in {0, 1/grid, ..., (grid-1)/grid}
  bool include_identity = true;  // also try s = 1 and keep it when strictly better (see the header)

  void validate() const {
    weight_format.validate();
    if (activation_bits != 0) check_activation_bits(activation_bits, "scale search");
    QLORA_CHECK(grid >= 1 && grid <= 1000, "scale search: the grid must have 1..1000 points, got " + std::to_string(grid));
  }
};

// One candidate of the search: what the group's linears become and what their input becomes.
struct ScaleCandidate {
  std::vector<double> scales;   // s (d)
  std::vector<Tensor> weights;  // Qw(W_i diag(s)), dequantized, in W_i's dtype on W_i's device
  int activation_bits = 0;      // Qa applied to X diag(s)^-1 (0: none)

  // Qa(x diag(s)^-1) for x (..., d) in any dtype and device (the column scaling runs on the host).
  Tensor scaled_input(const Tensor& x) const;
  // scaled_input(x) weights[i]^T: linear i of the group as the candidate computes it.
  Tensor forward(std::size_t i, const Tensor& x) const;
};

// A candidate's error on one calibration input: the sum of its squared output errors and the number of
// elements they cover. err(candidate) = (sum over every input of squared) / (sum of count).
struct InputError {
  double squared = 0;
  double count = 0;
};

// The error of a candidate (smaller is better) on each calibration input of the search, in input order,
// e.g. of a whole attention or MLP module built from it.
using ScaleObjective = std::function<std::vector<InputError>(const ScaleCandidate&)>;

// This process's per-input rows of partial sums (one row of `width` doubles per input it holds, in input order).
using LocalRows = std::function<std::vector<std::vector<double>>()>;
// Runs local_rows and returns the column sums of the rows of EVERY calibration input of the search, added in
// input order in double. Collective when the inputs are spread over ranks (see the file comment).
using InputSums = std::function<std::vector<double>(std::size_t width, const LocalRows& local_rows)>;

// The InputSums of one process holding every input.
inline std::vector<double> sum_in_input_order(std::size_t width, const LocalRows& local_rows) {
  std::vector<double> sums(width, 0.0);
  for (const std::vector<double>& row : local_rows()) {
    QLORA_CHECK(row.size() == width, "sum_in_input_order: a row of " + std::to_string(row.size()) +
                                         " values, expected " + std::to_string(width));
    for (std::size_t c = 0; c < width; ++c) sums[c] += row[c];
  }
  return sums;
}

struct ScaleSearchResult {
  std::vector<double> alphas;       // the grid
  std::vector<double> errors;       // err(a) for each grid point
  double identity_error = std::numeric_limits<double>::quiet_NaN();  // err of s = 1 (NaN: not evaluated)
  int best_grid = 0;                // argmin over the grid (first one on ties, as torch's argmin loop keeps)
  bool identity_chosen = false;     // s = 1 was strictly better than every grid point
  std::vector<double> scales;       // the chosen s (all ones when identity_chosen)

  double error() const { return identity_chosen ? identity_error : errors[std::size_t(best_grid)]; }
  std::optional<double> alpha() const {
    return identity_chosen ? std::nullopt : std::optional<double>(alphas[std::size_t(best_grid)]);
  }
};

namespace detail {

// The host f64 values of a 2-D view (rows, d) of t (..., d).
inline std::vector<double> host_rows(const Tensor& t, std::int64_t& rows, std::int64_t& cols) {
  cols = t.shape().last();
  rows = t.shape().rows();
  return t.to(Device::cpu()).to(DType::f64).to_vector<double>();
}

inline void check_weights(std::span<const Tensor> weights, const char* who) {
  QLORA_CHECK(!weights.empty(), std::string(who) + ": the group has no linear");
  const std::int64_t d = weights[0].defined() && weights[0].rank() == 2 ? weights[0].dim(1) : -1;
  for (std::size_t i = 0; i < weights.size(); ++i)
    QLORA_CHECK(weights[i].defined() && weights[i].rank() == 2 && weights[i].dim(1) == d,
                std::string(who) + ": weight " + std::to_string(i) + " must be 2-D (d_out, " + std::to_string(d) +
                    "), got " + (weights[i].defined() ? weights[i].str() : std::string("(undefined)")));
}

// Each input (..., d); an empty list is allowed (a rank's share of the inputs may be empty).
inline void check_inputs(std::span<const Tensor> inputs, std::int64_t d, const char* who) {
  for (std::size_t k = 0; k < inputs.size(); ++k)
    QLORA_CHECK(inputs[k].defined() && inputs[k].rank() >= 1 && inputs[k].shape().last() == d,
                std::string(who) + ": calibration input " + std::to_string(k) + " must be (..., " + std::to_string(d) +
                    "), got " + (inputs[k].defined() ? inputs[k].str() : std::string("(undefined)")));
}

inline void check_group(std::span<const Tensor> weights, std::span<const Tensor> inputs, const char* who) {
  check_weights(weights, who);
  QLORA_CHECK(!inputs.empty(), std::string(who) + ": no calibration inputs");
  check_inputs(inputs, weights[0].dim(1), who);
}

// y[i] = x[i] * factor_of(i), formed in double and rounded once to x's dtype, on x's device (f64 stays on
// the host in f64; any other dtype or device goes through an f32 host copy). Never writes into x.
template <class FactorOf>
Tensor scale_elements(const Tensor& x, FactorOf factor_of) {
  const auto apply = [&](auto* p) {
    using T = std::remove_reference_t<decltype(*p)>;
    for (std::int64_t i = 0; i < x.numel(); ++i) p[i] = T(double(p[i]) * factor_of(i));
  };
  if (x.device().is_cpu() && x.dtype() == DType::f64) {
    Tensor y = x.clone();
    apply(y.data<double>());
    return y;
  }
  Tensor y = x.to(Device::cpu()).to(DType::f32);
  if (y.data() == x.data()) y = y.clone();
  apply(y.data<float>());
  return y.to(x.dtype()).to(x.device());
}

}  // namespace detail

// ---- diagonal scalings (the search's candidates and the folding) ----------------------------------

// x diag(factor) for x (..., d): column c times factor[c] (inputs divided by s, weights' columns times s).
inline Tensor scale_columns(const Tensor& x, const std::vector<double>& factor) {
  QLORA_CHECK(x.defined() && x.rank() >= 1 && std::int64_t(factor.size()) == x.shape().last(),
              "scale_columns: " + std::to_string(factor.size()) + " factors for " +
                  (x.defined() ? x.str() : std::string("(undefined)")));
  const std::int64_t d = x.shape().last();
  return detail::scale_elements(x, [&](std::int64_t i) { return factor[std::size_t(i % d)]; });
}

// diag(factor) w for a 2-D w (rows, d): row r times factor[r] (a scale folded into the previous linear's
// output channels).
inline Tensor scale_rows(const Tensor& w, const std::vector<double>& factor) {
  QLORA_CHECK(w.defined() && w.rank() == 2 && std::int64_t(factor.size()) == w.dim(0),
              "scale_rows: " + std::to_string(factor.size()) + " factors for the rows of " +
                  (w.defined() ? w.str() : std::string("(undefined)")));
  const std::int64_t d = w.dim(1);
  return detail::scale_elements(w, [&](std::int64_t i) { return factor[std::size_t(i / d)]; });
}

// ---- statistics and the search ------------------------------------------------------------------------

// x_mag[c] = mean over every row of every input of |x[:, c]| for inputs (..., d): each input's row holds
// its channels' sum |x| (over its rows, in row order) and its row count; `sums` adds them over every input.
// `who` names the caller in the message about a malformed input.
inline std::vector<double> input_magnitude(std::span<const Tensor> inputs, std::int64_t d, const InputSums& sums,
                                           const char* who = "input_magnitude") {
  const std::vector<double> total = sums(std::size_t(d) + 1, [&] {
    detail::check_inputs(inputs, d, who);
    std::vector<std::vector<double>> rows;
    for (const Tensor& x : inputs) {
      std::int64_t n = 0, cols = 0;
      const std::vector<double> v = detail::host_rows(x, n, cols);
      std::vector<double> row(std::size_t(d) + 1, 0.0);
      for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t c = 0; c < d; ++c) row[std::size_t(c)] += std::fabs(v[std::size_t(r * d + c)]);
      row[std::size_t(d)] = double(n);
      rows.push_back(std::move(row));
    }
    return rows;
  });
  const double total_rows = total[std::size_t(d)];
  QLORA_CHECK(total_rows > 0, "input_magnitude: the calibration inputs have no rows");
  std::vector<double> mag(total.begin(), total.end() - 1);
  for (double& m : mag) m /= total_rows;
  return mag;
}

// The same over inputs all held by this process.
inline std::vector<double> input_magnitude(std::span<const Tensor> inputs) {
  QLORA_CHECK(!inputs.empty(), "input_magnitude: no calibration inputs");
  QLORA_CHECK(inputs[0].defined() && inputs[0].rank() >= 1, "input_magnitude: calibration input 0 is " +
                                                                (inputs[0].defined() ? inputs[0].str() : std::string("(undefined)")));
  return input_magnitude(inputs, inputs[0].shape().last(), InputSums(sum_in_input_order));
}

// w_mag[c] = mean over the rows of the stacked weights of |W[o, c]| / max |W[o, .]| over (o, c)'s
// quantization group of `group` columns (0: the whole row), floored at 1e-8.
inline std::vector<double> weight_magnitude(std::span<const Tensor> weights, std::int64_t group) {
  QLORA_CHECK(!weights.empty(), "weight_magnitude: no weights");
  const std::int64_t d = weights[0].dim(1), g = group == 0 ? d : group;
  std::vector<double> mag(std::size_t(d), 0.0);
  std::int64_t total_rows = 0;
  for (const Tensor& w : weights) {
    std::int64_t rows = 0, cols = 0;
    const std::vector<double> v = detail::host_rows(w, rows, cols);
    QLORA_CHECK(cols == d, "weight_magnitude: weights of different widths");
    for (std::int64_t o = 0; o < rows; ++o)
      for (std::int64_t begin = 0; begin < d; begin += g) {
        const std::int64_t end = std::min(d, begin + g);
        double mx = 0;
        for (std::int64_t c = begin; c < end; ++c) mx = std::max(mx, std::fabs(v[std::size_t(o * d + c)]));
        if (mx > 0)
          for (std::int64_t c = begin; c < end; ++c) mag[std::size_t(c)] += std::fabs(v[std::size_t(o * d + c)]) / mx;
      }
    total_rows += rows;
  }
  for (double& m : mag) m = std::max(m / double(total_rows), 1e-8);
  return mag;
}

// s(a) = clamp(x_mag^a / w_mag^(1-a), min 1e-4), normalised by sqrt(max(s) min(s)).
inline std::vector<double> candidate_scales(const std::vector<double>& x_mag, const std::vector<double>& w_mag,
                                            double alpha) {
  QLORA_CHECK(x_mag.size() == w_mag.size() && !x_mag.empty(), "candidate_scales: magnitudes of different widths");
  std::vector<double> s(x_mag.size());
  for (std::size_t c = 0; c < s.size(); ++c)
    s[c] = std::max(std::pow(x_mag[c], alpha) / std::pow(w_mag[c], 1.0 - alpha), 1e-4);
  const auto [mn, mx] = std::minmax_element(s.begin(), s.end());
  const double norm = std::sqrt(*mn * *mx);
  for (double& v : s) v /= norm;
  return s;
}

// Qw(W diag(s)) for one weight (any dtype/device): scaled on the host, quantized and dequantized in f32,
// returned in W's dtype on W's device.
inline Tensor quantize_scaled_weight(const Tensor& w, const std::vector<double>& scales, const QuantConfig& format) {
  const Tensor scaled = scale_columns(w.to(Device::cpu()).to(DType::f64), scales);
  return dequantize(quantize(scaled, format), DType::f32).to(w.dtype()).to(w.device());
}

inline ScaleCandidate make_candidate(std::span<const Tensor> weights, std::vector<double> scales,
                                     const QuantConfig& format, int activation_bits) {
  ScaleCandidate c;
  c.scales = std::move(scales);
  c.activation_bits = activation_bits;
  for (const Tensor& w : weights) c.weights.push_back(quantize_scaled_weight(w, c.scales, format));
  return c;
}

inline Tensor ScaleCandidate::scaled_input(const Tensor& x) const {
  std::vector<double> inverse(scales.size());
  bool identity = true;
  for (std::size_t c = 0; c < scales.size(); ++c) {
    inverse[c] = 1.0 / scales[c];
    identity = identity && scales[c] == 1.0;
  }
  const Tensor xs = identity ? x : scale_columns(x, inverse);
  return activation_bits > 0 ? fake_quantize_per_token(xs, activation_bits) : xs;
}

inline Tensor ScaleCandidate::forward(std::size_t i, const Tensor& x) const {
  QLORA_CHECK(i < weights.size(), "ScaleCandidate: no linear " + std::to_string(i) + " in a group of " +
                                      std::to_string(weights.size()));
  const Tensor xs = scaled_input(x);
  return ops::matmul(xs.reshape(Shape{xs.shape().rows(), xs.shape().last()}), weights[i], false, true);
}

// sum ||a - b||^2 in double (same shape, dtype and device).
inline double squared_difference(const Tensor& a, const Tensor& b) {
  const Tensor parts[] = {ops::add(a.reshape(b.shape()).to(b.dtype()), ops::scale(b, -1.f))};
  return ops::sum_squares(parts);
}

// The default objective: the linears themselves. Per input, the squared difference of candidate.forward(i, X)
// from X W_i^T summed over the group's linears i, over as many elements; err = the mean over every output
// element of every linear and input. The reference outputs are computed once, here.
inline ScaleObjective linear_group_objective(std::span<const Tensor> weights, std::span<const Tensor> inputs) {
  detail::check_group(weights, inputs, "linear_group_objective");
  std::vector<Tensor> xs, refs;
  for (const Tensor& x : inputs) {
    const Tensor x2 = x.reshape(Shape{x.shape().rows(), x.shape().last()});
    xs.push_back(x2);
    for (const Tensor& w : weights) refs.push_back(ops::matmul(x2, w, false, true));
  }
  return [xs, refs](const ScaleCandidate& c) {
    std::vector<InputError> errors;
    std::size_t r = 0;
    for (const Tensor& x : xs) {
      InputError e;
      for (std::size_t i = 0; i < c.weights.size(); ++i, ++r) {
        e.squared += squared_difference(c.forward(i, x), refs[r]);
        e.count += double(refs[r].numel());
      }
      errors.push_back(e);
    }
    return errors;
  };
}

// The grid search over a (plus the identity, when asked). weights: the group's (d_out_i, d) matrices;
// inputs: calibration inputs (..., d) of the group (their x_mag drives s); objective: how to judge a
// candidate on each input (default: linear_group_objective(weights, inputs)); sums: where the inputs live
// (default: all in this process; see the file comment). Every candidate is judged on this process's inputs
// first and the errors are summed over all inputs once, so a sharded search costs two exchanges; all work
// on this process's inputs (checks included) runs inside the hook's local_rows.
inline ScaleSearchResult search_scales(std::span<const Tensor> weights, std::span<const Tensor> inputs,
                                       const ScaleSearchOptions& options, ScaleObjective objective = {},
                                       const InputSums& sums = {}) {
  options.validate();
  detail::check_weights(weights, "search_scales");
  QLORA_CHECK(sums || !inputs.empty(), "search_scales: no calibration inputs");  // one process holds them all
  const InputSums sum_inputs = sums ? sums : InputSums(sum_in_input_order);
  const std::vector<double> x_mag = input_magnitude(inputs, weights[0].dim(1), sum_inputs, "search_scales");
  const std::vector<double> w_mag = weight_magnitude(weights, options.weight_format.group);

  ScaleSearchResult result;
  std::vector<std::vector<double>> scales;  // the grid's candidates, then the identity
  for (int j = 0; j < options.grid; ++j) {
    result.alphas.push_back(double(j) / double(options.grid));
    scales.push_back(candidate_scales(x_mag, w_mag, result.alphas.back()));
  }
  if (options.include_identity) scales.emplace_back(x_mag.size(), 1.0);

  // Row of input k: (squared, count) of every candidate on it.
  const std::size_t n = scales.size();
  const std::vector<double> totals = sum_inputs(2 * n, [&] {
    std::vector<std::vector<double>> rows(inputs.size(), std::vector<double>(2 * n, 0.0));
    if (inputs.empty()) return rows;  // no need to quantize candidates for no input
    if (!objective) objective = linear_group_objective(weights, inputs);
    for (std::size_t j = 0; j < n; ++j) {
      const std::vector<InputError> errors =
          objective(make_candidate(weights, scales[j], options.weight_format, options.activation_bits));
      QLORA_CHECK(errors.size() == inputs.size(), "search_scales: the objective returned " +
                                                      std::to_string(errors.size()) + " errors for " +
                                                      std::to_string(inputs.size()) + " calibration inputs");
      for (std::size_t k = 0; k < inputs.size(); ++k) {
        rows[k][2 * j] = errors[k].squared;
        rows[k][2 * j + 1] = errors[k].count;
      }
    }
    return rows;
  });
  const auto error_of = [&](std::size_t j) { return totals[2 * j] / totals[2 * j + 1]; };

  double best = std::numeric_limits<double>::infinity();
  for (int j = 0; j < options.grid; ++j) {
    const double err = error_of(std::size_t(j));
    QLORA_CHECK(std::isfinite(err), "search_scales: the objective is not finite (" + std::to_string(err) +
                                        ") at a = " + std::to_string(result.alphas[std::size_t(j)]));
    result.errors.push_back(err);
    if (err < best) {
      best = err;
      result.best_grid = j;
      result.scales = scales[std::size_t(j)];
    }
  }
  if (options.include_identity) {
    result.identity_error = error_of(n - 1);
    if (result.identity_error < best) {
      result.identity_chosen = true;
      result.scales = scales.back();
    }
  }
  return result;
}

}  // namespace qlora::quant
