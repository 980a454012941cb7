#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "qlora/cpu/adamw.hpp"
#include "support/random.hpp"

using qlora::test::random_vector;

TEST_CASE("adamw: one step reproduces a value worked out by hand") {
  // param 1, grad 2, grad_scale 0.5, lr 0.5, beta1 0.75, beta2 0.875, eps 0.25, weight_decay 0.5, step 1
  // (binary fractions, so every intermediate is exact):
  //   g = 0.5 * 2 = 1
  //   p = 1 * (1 - 0.5 * 0.5) = 0.75
  //   m = 0.75 * 0 + 0.25 * 1 = 0.25            v = 0.875 * 0 + 0.125 * 1^2 = 0.125
  //   bc1 = 1 - 0.75 = 0.25                     bc2 = 1 - 0.875 = 0.125
  //   p -= (0.5 / 0.25) * 0.25 / (sqrt(0.125) / sqrt(0.125) + 0.25) = 2 * 0.25 / 1.25 = 0.4  ->  p = 0.35
  double p = 1, g = 2, m = 0, v = 0;
  qlora::cpu::adamw_step(&p, &g, &m, &v, 1, 0.5f, 0.75f, 0.875f, 0.25f, 0.5f, 1, 0.5f);
  CHECK(p == doctest::Approx(0.35).epsilon(1e-15));
  CHECK(m == 0.25);
  CHECK(v == 0.125);

  float pf = 1, gf = 2, mf = 0, vf = 0;
  qlora::cpu::adamw_step(&pf, &gf, &mf, &vf, 1, 0.5f, 0.75f, 0.875f, 0.25f, 0.5f, 1, 0.5f);
  CHECK(pf == doctest::Approx(0.35).epsilon(1e-7));
}

namespace {

struct AdamWConfig {
  float lr = 1e-2f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.1f, grad_scale = 0.7f;
};

// torch.optim.AdamW's single-tensor step (torch/optim/adamw.py), operation by operation, in double:
//   param.mul_(1 - lr * weight_decay)
//   exp_avg.lerp_(grad, 1 - beta1)
//   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
//   step_size = lr / bias_correction1
//   denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)
//   param.addcdiv_(exp_avg, denom, value=-step_size)
void torch_adamw_step(std::vector<double>& p, const std::vector<double>& grad, std::vector<double>& m,
                      std::vector<double>& v, const AdamWConfig& c, int step) {
  const double lr = c.lr, b1 = c.beta1, b2 = c.beta2, eps = c.eps, wd = c.weight_decay;
  const double bias_correction1 = 1 - std::pow(b1, step), bias_correction2 = 1 - std::pow(b2, step);
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double g = double(c.grad_scale) * grad[i];
    p[i] *= 1 - lr * wd;
    m[i] += (g - m[i]) * (1 - b1);
    v[i] = v[i] * b2 + (1 - b2) * g * g;
    const double denom = std::sqrt(v[i]) / std::sqrt(bias_correction2) + eps;
    p[i] += -(lr / bias_correction1) * m[i] / denom;
  }
}

}  // namespace

TEST_CASE("adamw: five steps follow PyTorch's update in float and double") {
  const AdamWConfig c;
  const std::int64_t n = 100;
  auto p_ref = random_vector<double>(n, 1);
  std::vector<double> m_ref(n, 0.0), v_ref(n, 0.0);
  std::vector<double> p(p_ref), m(n, 0.0), v(n, 0.0);
  std::vector<float> pf(p_ref.begin(), p_ref.end()), mf(n, 0.0f), vf(n, 0.0f);
  for (int step = 1; step <= 5; ++step) {
    const auto grad = random_vector<double>(n, 100 + step, -3.0, 3.0);
    const std::vector<float> gradf(grad.begin(), grad.end());
    torch_adamw_step(p_ref, grad, m_ref, v_ref, c, step);
    qlora::cpu::adamw_step(p.data(), grad.data(), m.data(), v.data(), n, c.lr, c.beta1, c.beta2, c.eps,
                           c.weight_decay, step, c.grad_scale);
    qlora::cpu::adamw_step(pf.data(), gradf.data(), mf.data(), vf.data(), n, c.lr, c.beta1, c.beta2, c.eps,
                           c.weight_decay, step, c.grad_scale);
  }
  CHECK(qlora::test::rel_error(p, p_ref) < 1e-13);
  CHECK(qlora::test::rel_error(m, m_ref) < 1e-13);
  CHECK(qlora::test::rel_error(v, v_ref) < 1e-13);
  CHECK(qlora::test::rel_error(pf, p_ref) < 1e-6);
  CHECK(qlora::test::rel_error(mf, m_ref) < 1e-6);
  CHECK(qlora::test::rel_error(vf, v_ref) < 1e-6);
}
