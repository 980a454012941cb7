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

// The error of a candidate (smaller is better), e.g. of a whole attention or MLP module built from it.
using ScaleObjective = std::function<double(const ScaleCandidate&)>;

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

inline void check_group(std::span<const Tensor> weights, std::span<const Tensor> inputs, const char* who) {
  QLORA_CHECK(!weights.empty(), std::string(who) + ": the group has no linear");
  const std::int64_t d = weights[0].defined() && weights[0].rank() == 2 ? weights[0].dim(1) : -1;
  for (std::size_t i = 0; i < weights.size(); ++i)
    QLORA_CHECK(weights[i].defined() && weights[i].rank() == 2 && weights[i].dim(1) == d,
                std::string(who) + ": weight " + std::to_string(i) + " must be 2-D (d_out, " + std::to_string(d) +
                    "), got " + (weights[i].defined() ? weights[i].str() : std::string("(undefined)")));
  QLORA_CHECK(!inputs.empty(), std::string(who) + ": no calibration inputs");
  for (std::size_t k = 0; k < inputs.size(); ++k)
    QLORA_CHECK(inputs[k].defined() && inputs[k].rank() >= 1 && inputs[k].shape().last() == d,
                std::string(who) + ": calibration input " + std::to_string(k) + " must be (..., " + std::to_string(d) +
                    "), got " + (inputs[k].defined() ? inputs[k].str() : std::string("(undefined)")));
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

// x_mag[c] = mean over every row of every input of |x[:, c]|.
inline std::vector<double> input_magnitude(std::span<const Tensor> inputs) {
  QLORA_CHECK(!inputs.empty(), "input_magnitude: no calibration inputs");
  std::vector<double> mag;
  std::int64_t total_rows = 0;
  for (const Tensor& x : inputs) {
    std::int64_t rows = 0, cols = 0;
    const std::vector<double> v = detail::host_rows(x, rows, cols);
    if (mag.empty()) mag.assign(std::size_t(cols), 0.0);
    QLORA_CHECK(std::int64_t(mag.size()) == cols, "input_magnitude: inputs of different widths (" +
                                                      std::to_string(mag.size()) + " and " + std::to_string(cols) + ")");
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < cols; ++c) mag[std::size_t(c)] += std::fabs(v[std::size_t(r * cols + c)]);
    total_rows += rows;
  }
  QLORA_CHECK(total_rows > 0, "input_magnitude: the calibration inputs have no rows");
  for (double& m : mag) m /= double(total_rows);
  return mag;
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

// The default objective: the linears themselves, mean over every output element of every linear and
// input of (candidate.forward(i, X) - X W_i^T)^2. The reference outputs are computed once, here.
inline ScaleObjective linear_group_objective(std::span<const Tensor> weights, std::span<const Tensor> inputs) {
  detail::check_group(weights, inputs, "linear_group_objective");
  std::vector<Tensor> xs, refs;
  double count = 0;
  for (const Tensor& x : inputs) {
    const Tensor x2 = x.reshape(Shape{x.shape().rows(), x.shape().last()});
    xs.push_back(x2);
    for (const Tensor& w : weights) {
      refs.push_back(ops::matmul(x2, w, false, true));
      count += double(refs.back().numel());
    }
  }
  return [xs, refs, count](const ScaleCandidate& c) {
    double sum = 0;
    std::size_t r = 0;
    for (const Tensor& x : xs)
      for (std::size_t i = 0; i < c.weights.size(); ++i) sum += squared_difference(c.forward(i, x), refs[r++]);
    return sum / count;
  };
}

// The grid search over a (plus the identity, when asked). weights: the group's (d_out_i, d) matrices;
// inputs: calibration inputs (..., d) of the group (their x_mag drives s); objective: how to judge a
// candidate (default: linear_group_objective(weights, inputs)).
inline ScaleSearchResult search_scales(std::span<const Tensor> weights, std::span<const Tensor> inputs,
                                       const ScaleSearchOptions& options, ScaleObjective objective = {}) {
  options.validate();
  detail::check_group(weights, inputs, "search_scales");
  if (!objective) objective = linear_group_objective(weights, inputs);
  const std::vector<double> x_mag = input_magnitude(inputs);
  const std::vector<double> w_mag = weight_magnitude(weights, options.weight_format.group);

  ScaleSearchResult result;
  double best = std::numeric_limits<double>::infinity();
  for (int j = 0; j < options.grid; ++j) {
    const double a = double(j) / double(options.grid);
    const ScaleCandidate c =
        make_candidate(weights, candidate_scales(x_mag, w_mag, a), options.weight_format, options.activation_bits);
    const double err = objective(c);
    QLORA_CHECK(std::isfinite(err), "search_scales: the objective is not finite (" + std::to_string(err) +
                                        ") at a = " + std::to_string(a));
    result.alphas.push_back(a);
    result.errors.push_back(err);
    if (err < best) {
      best = err;
      result.best_grid = j;
      result.scales = c.scales;
    }
  }
  if (options.include_identity) {
    const std::vector<double> ones(x_mag.size(), 1.0);
    result.identity_error = objective(make_candidate(weights, ones, options.weight_format, options.activation_bits));
    if (result.identity_error < best) {
      result.identity_chosen = true;
      result.scales = ones;
    }
  }
  return result;
}

}  // namespace qlora::quant
