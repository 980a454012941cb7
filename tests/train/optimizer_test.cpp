// The optimizers (train/adamw.hpp, train/sgd.hpp), gradient clipping (train/grad_clip.hpp) and the CPU twin
// of the multi-tensor AdamW kernel, against updates written out here in float64 from the PyTorch formulas.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "qlora/cpu/multi_tensor_adamw.hpp"
#include "qlora/train/adamw.hpp"
#include "qlora/train/grad_clip.hpp"
#include "qlora/train/sgd.hpp"
#include "support/random.hpp"

using qlora::DType;
using qlora::Error;
using qlora::Tensor;
using qlora::autograd::Param;
using qlora::test::random_vector;
using qlora::test::rel_error;

namespace {

// A set of parameters of several sizes (one spanning several chunks of the multi-tensor table, one of a single
// element) with random values, and random gradients drawn per step.
struct Model {
  std::vector<std::unique_ptr<Param>> owned;
  std::vector<Param*> params;

  template <class T>
  static Model random(const std::vector<std::int64_t>& sizes, std::uint64_t seed) {
    Model m;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const auto values = random_vector<T>(std::size_t(sizes[i]), seed + i);
      m.owned.push_back(std::make_unique<Param>("layer" + std::to_string(i) + ".w", Tensor::from(values, {sizes[i]})));
      m.params.push_back(m.owned.back().get());
    }
    return m;
  }

  template <class T>
  void set_grads(std::uint64_t seed, double lo = -3.0, double hi = 3.0) {
    for (std::size_t i = 0; i < params.size(); ++i) {
      const auto g = random_vector<T>(std::size_t(params[i]->value.numel()), seed * 1000 + i, lo, hi);
      params[i]->grad = Tensor::from(g, params[i]->value.shape());
    }
  }

  template <class T>
  std::vector<std::vector<T>> values() const {
    std::vector<std::vector<T>> v;
    for (const Param* p : params) v.push_back(p->value.to_vector<T>());
    return v;
  }
  template <class T>
  std::vector<std::vector<T>> grads() const {
    std::vector<std::vector<T>> v;
    for (const Param* p : params) v.push_back(p->grad.to_vector<T>());
    return v;
  }
};

// All elements of a list of vectors, one after another.
template <class T>
std::vector<double> flat(const std::vector<std::vector<T>>& parts) {
  std::vector<double> out;
  for (const auto& part : parts) out.insert(out.end(), part.begin(), part.end());
  return out;
}

struct AdamWReference {
  double lr, beta1, beta2, eps, wd;
  std::vector<double> p, m, v;

  // torch.optim.AdamW (torch/optim/adamw.py, single-tensor path), one element at a time in double:
  //   p = p * (1 - lr * wd)
  //   m = beta1 * m + (1 - beta1) * g
  //   v = beta2 * v + (1 - beta2) * g * g
  //   m_hat = m / (1 - beta1^t),   v_hat = v / (1 - beta2^t)
  //   p = p - lr * m_hat / (sqrt(v_hat) + eps)
  // PyTorch folds the bias corrections into step_size and denom; the algebra is identical, the roundings
  // differ in the last bits only.
  void step(const std::vector<double>& g, int t) {
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] = p[i] * (1 - lr * wd);
      m[i] = beta1 * m[i] + (1 - beta1) * g[i];
      v[i] = beta2 * v[i] + (1 - beta2) * g[i] * g[i];
      const double m_hat = m[i] / (1 - std::pow(beta1, t));
      const double v_hat = v[i] / (1 - std::pow(beta2, t));
      p[i] = p[i] - lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
};

const std::vector<std::int64_t> kSizes = {3, 5, 40000, 1};  // 40000: three chunks of 16384, the last partial

std::vector<std::pair<std::string, Tensor>> clone_all(const std::vector<std::pair<std::string, Tensor>>& state) {
  std::vector<std::pair<std::string, Tensor>> copy;
  for (const auto& [name, t] : state) copy.emplace_back(name, t.clone());
  return copy;
}

}  // namespace

TEST_CASE("adamw: one step on a single element reproduces a value worked out by hand") {
  // p 1, g 2, grad_scale 0.5, lr 0.5, betas (0.75, 0.875), eps 0.25, wd 0.5, step 1 (binary fractions):
  //   g = 1;  p = 1 * (1 - 0.25) = 0.75;  m = 0.25 * 1 = 0.25;  v = 0.125 * 1 = 0.125
  //   m_hat = 0.25 / 0.25 = 1;  v_hat = 0.125 / 0.125 = 1;  p = 0.75 - 0.5 * 1 / (1 + 0.25) = 0.35
  Param p("w", Tensor::from(std::vector<double>{1.0}, {1}));
  p.grad = Tensor::from(std::vector<double>{2.0}, {1});
  std::vector<Param*> params{&p};
  qlora::train::AdamW opt(params, {.lr = 0.5, .beta1 = 0.75, .beta2 = 0.875, .eps = 0.25, .weight_decay = 0.5});
  opt.step(0.5);
  CHECK(p.value.item<double>() == doctest::Approx(0.35).epsilon(1e-15));
  const auto state = opt.state_tensors();
  REQUIRE(state.size() == 2);
  CHECK(state[0].first == "w.exp_avg");
  CHECK(state[1].first == "w.exp_avg_sq");
  CHECK(state[0].second.item<double>() == 0.25);
  CHECK(state[1].second.item<double>() == 0.125);
  CHECK(opt.step_count() == 1);
}

TEST_CASE("adamw: one step and three steps match the float64 reference in f64 and f32") {
  const qlora::train::AdamWOptions o{.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1};
  Model m64 = Model::random<double>(kSizes, 10);
  Model m32 = Model::random<float>(kSizes, 10);
  AdamWReference ref{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay, flat(m64.values<double>()), {}, {}};
  ref.m.assign(ref.p.size(), 0.0);
  ref.v.assign(ref.p.size(), 0.0);
  const std::vector<double> start = ref.p;
  qlora::train::AdamW opt64(m64.params, o), opt32(m32.params, o);
  for (int t = 1; t <= 3; ++t) {
    CAPTURE(t);
    m64.set_grads<double>(t);
    m32.set_grads<float>(t);
    ref.step(flat(m64.grads<double>()), t);
    opt64.step();
    opt32.step();
    // Compare the updates p - p0 (parameters of size 1 would hide an error in an update of size lr).
    std::vector<double> update64 = flat(m64.values<double>()), update32 = flat(m32.values<float>()),
                        expected = ref.p;
    for (std::size_t i = 0; i < start.size(); ++i) {
      update64[i] -= start[i];
      update32[i] -= start[i];
      expected[i] -= start[i];
    }
    CHECK(rel_error(update64, expected) < 1e-12);
    CHECK(rel_error(update32, expected) < 2e-5);  // f32 parameters start rounded (~6e-8 of 1, ~1e-5 of an update)
  }
  std::vector<double> m_state, v_state;
  for (const auto& [name, t] : opt64.state_tensors()) {
    const auto values = t.to_vector<double>();
    (name.ends_with(".exp_avg") ? m_state : v_state).insert(
        (name.ends_with(".exp_avg") ? m_state : v_state).end(), values.begin(), values.end());
  }
  CHECK(rel_error(m_state, ref.m) < 1e-13);
  CHECK(rel_error(v_state, ref.v) < 1e-13);
}

TEST_CASE("adamw: weight decay is decoupled: p shrinks by lr*wd*p and the moments never see it") {
  const double lr = 1e-2, wd = 0.5;
  Model decayed = Model::random<double>(kSizes, 20), plain = Model::random<double>(kSizes, 20);
  const auto start = flat(plain.values<double>());
  qlora::train::AdamW with_decay(decayed.params, {.lr = lr, .weight_decay = wd});
  qlora::train::AdamW without(plain.params, {.lr = lr, .weight_decay = 0.0});
  decayed.set_grads<double>(1);
  plain.set_grads<double>(1);
  with_decay.step();
  without.step();
  const auto p_decayed = flat(decayed.values<double>()), p_plain = flat(plain.values<double>());
  double worst = 0;
  for (std::size_t i = 0; i < start.size(); ++i) {
    // Decoupled: p' = p (1 - lr wd) - u with the same Adam step u as without decay. (L2 regularisation would
    // add wd p to the gradient and change u.)
    const double expected = start[i] * (1 - lr * wd) + (p_plain[i] - start[i]);
    worst = std::max(worst, std::abs(p_decayed[i] - expected));
  }
  CHECK(worst < 1e-14);
  const auto sd = with_decay.state_tensors(), sp = without.state_tensors();
  for (std::size_t i = 0; i < sd.size(); ++i) CHECK(sd[i].second.to_vector<double>() == sp[i].second.to_vector<double>());
}

TEST_CASE("adamw: bias correction makes the first update lr * sign(g)") {
  // At t = 1: m_hat = g and v_hat = g^2, so the update is lr * g / (|g| + eps) = lr * sign(g) to 1e-8 / |g|.
  const double lr = 1e-3;
  Model model = Model::random<double>(kSizes, 30);
  const auto start = flat(model.values<double>());
  model.set_grads<double>(7, 0.1, 3.0);
  for (Param* p : model.params) {  // negate every other gradient: both signs
    auto g = p->grad.to_vector<double>();
    for (std::size_t i = 0; i < g.size(); i += 2) g[i] = -g[i];
    p->grad = Tensor::from(g, p->value.shape());
  }
  const auto grads = flat(model.grads<double>());
  qlora::train::AdamW opt(model.params, {.lr = lr});
  opt.step();
  const auto after = flat(model.values<double>());
  double worst = 0;
  for (std::size_t i = 0; i < start.size(); ++i)
    worst = std::max(worst, std::abs((after[i] - start[i]) + lr * (grads[i] > 0 ? 1.0 : -1.0)));
  CHECK(worst < lr * 1e-6);
}

TEST_CASE("adamw: step with a gradient scale equals scaling the gradients first") {
  Model folded = Model::random<double>(kSizes, 40), scaled = Model::random<double>(kSizes, 40);
  qlora::train::AdamW a(folded.params, {.lr = 1e-2}), b(scaled.params, {.lr = 1e-2});
  for (int t = 1; t <= 2; ++t) {
    folded.set_grads<double>(t);
    scaled.set_grads<double>(t);
    for (Param* p : scaled.params) qlora::ops::scale_(p->grad, 0.25f);
    a.step(0.25);
    b.step();
  }
  CHECK(rel_error(flat(folded.values<double>()), flat(scaled.values<double>())) < 1e-15);
}

TEST_CASE("adamw: saving and loading the state gives identical subsequent steps") {
  Model original = Model::random<float>(kSizes, 50);
  qlora::train::AdamW opt(original.params, {.lr = 3e-3, .weight_decay = 0.01});
  for (int t = 1; t <= 2; ++t) {
    original.set_grads<float>(t);
    opt.step();
  }
  // A checkpoint: parameter values, state tensors (copies), scalar state through its JSON text.
  const auto saved_values = original.values<float>();
  const auto saved_state = clone_all(opt.state_tensors());
  const auto saved_scalars = nlohmann::json::parse(opt.scalar_state().dump());
  CHECK(saved_scalars.at("step") == 2);

  Model resumed = Model::random<float>(kSizes, 999);  // different values, overwritten from the checkpoint
  for (std::size_t i = 0; i < resumed.params.size(); ++i)
    resumed.params[i]->value = Tensor::from(saved_values[i], resumed.params[i]->value.shape());
  qlora::train::AdamW opt2(resumed.params, {.lr = 1.0, .weight_decay = 0.01});  // lr comes from the checkpoint
  opt2.load_state(saved_scalars, saved_state);
  CHECK(opt2.step_count() == 2);
  CHECK(opt2.lr() == opt.lr());
  for (int t = 3; t <= 4; ++t) {
    original.set_grads<float>(t);
    resumed.set_grads<float>(t);
    opt.step();
    opt2.step();
  }
  CHECK(original.values<float>() == resumed.values<float>());  // bit for bit
}

TEST_CASE("adamw: bad state, missing gradients and unsupported parameters are refused") {
  Model model = Model::random<float>({4, 6}, 60);
  qlora::train::AdamW opt(model.params);
  CHECK_THROWS_WITH_AS(opt.step(), "adamw: parameter 'layer0.w' has no gradient (run backward before step)", Error);
  model.set_grads<float>(1);
  model.params[1]->grad = Tensor::from(random_vector<float>(5, 1), {5});
  CHECK_THROWS_AS(opt.step(), Error);

  auto state = clone_all(opt.state_tensors());
  const nlohmann::json scalars = opt.scalar_state();
  state.pop_back();
  CHECK_THROWS_AS(opt.load_state(scalars, state), Error);
  state = clone_all(opt.state_tensors());
  state[1].first = "layer0.w.other";
  CHECK_THROWS_WITH_AS(opt.load_state(scalars, state), "adamw: optimizer state lacks tensor 'layer0.w.exp_avg_sq'",
                       Error);
  state = clone_all(opt.state_tensors());
  state[0].second = Tensor::zeros({5});
  CHECK_THROWS_AS(opt.load_state(scalars, state), Error);
  nlohmann::json sgd_scalars = scalars;
  sgd_scalars["optimizer"] = "sgd";
  CHECK_THROWS_AS(opt.load_state(sgd_scalars, clone_all(opt.state_tensors())), Error);

  Param half("h", Tensor::zeros({3}, DType::bf16));
  std::vector<Param*> bf16_params{&half};
  CHECK_THROWS_AS(qlora::train::AdamW{bf16_params}, Error);
  std::vector<Param*> twice{model.params[0], model.params[0]};
  CHECK_THROWS_AS(qlora::train::AdamW{twice}, Error);
  CHECK_THROWS_AS(qlora::train::AdamW(model.params, {.beta1 = 1.0}), Error);

  // Frozen parameters are left out: no state, no gradient needed.
  Param frozen("base", Tensor::from(random_vector<float>(3, 2), {3}), /*requires_grad=*/false);
  std::vector<Param*> with_frozen{model.params[0], &frozen};
  qlora::train::AdamW only_trainable(with_frozen);
  CHECK(only_trainable.params().size() == 1);
  CHECK(only_trainable.state_tensors().size() == 2);
}

TEST_CASE("multi-tensor adamw CPU twin: the chunk table covers every element once") {
  const std::vector<std::int64_t> numels = {0, 1, 16384, 16385, 5};
  const auto chunks = qlora::cpu::make_tensor_chunks(numels);
  std::vector<std::int64_t> covered(numels.size(), 0);
  for (const auto& c : chunks) {
    CHECK(c.begin < c.end);
    CHECK(c.end - c.begin <= qlora::cpu::kAdamWChunkElements);
    CHECK(c.begin % qlora::cpu::kAdamWChunkElements == 0);
    covered[std::size_t(c.tensor)] += c.end - c.begin;
  }
  CHECK(covered == numels);
  CHECK(chunks.size() == 5);  // 0 + 1 + 1 + 2 + 1
}

// ---- SGD -----------------------------------------------------------------------------------------------

namespace {

// torch.optim.SGD (torch/optim/sgd.py) in double, one element at a time:
//   d = g + wd * p
//   b = d at t = 1, else b = mu * b + (1 - dampening) * d
//   d = d + mu * b (nesterov) or d = b
//   p = p - lr * d
void sgd_reference(std::vector<double>& p, std::vector<double>& b, const std::vector<double>& g,
                   const qlora::train::SgdOptions& o, int t) {
  for (std::size_t i = 0; i < p.size(); ++i) {
    double d = g[i] + o.weight_decay * p[i];
    if (o.momentum != 0) {
      b[i] = t == 1 ? d : o.momentum * b[i] + (1 - o.dampening) * d;
      d = o.nesterov ? d + o.momentum * b[i] : b[i];
    }
    p[i] = p[i] - o.lr * d;
  }
}

}  // namespace

TEST_CASE("sgd: momentum, dampening, nesterov and weight decay follow PyTorch over three steps") {
  // Hyperparameters are binary fractions: the ops take f32 scalars, and these are exact in f32.
  const std::vector<qlora::train::SgdOptions> variants = {
      {.lr = 0.125, .momentum = 0.0, .dampening = 0.0, .weight_decay = 0.0, .nesterov = false},
      {.lr = 0.125, .momentum = 0.875, .dampening = 0.0, .weight_decay = 0.0, .nesterov = false},
      {.lr = 0.125, .momentum = 0.875, .dampening = 0.25, .weight_decay = 0.0625, .nesterov = false},
      {.lr = 0.125, .momentum = 0.875, .dampening = 0.0, .weight_decay = 0.0625, .nesterov = true},
  };
  for (std::size_t k = 0; k < variants.size(); ++k) {
    CAPTURE(k);
    const auto& o = variants[k];
    Model model = Model::random<double>(kSizes, 70);
    std::vector<double> p = flat(model.values<double>()), b(p.size(), 0.0);
    const std::vector<double> start = p;
    qlora::train::Sgd opt(model.params, o);
    for (int t = 1; t <= 3; ++t) {
      model.set_grads<double>(t);
      sgd_reference(p, b, flat(model.grads<double>()), o, t);
      opt.step();
    }
    std::vector<double> update = flat(model.values<double>()), expected = p;
    for (std::size_t i = 0; i < start.size(); ++i) {
      update[i] -= start[i];
      expected[i] -= start[i];
    }
    CHECK(rel_error(update, expected) < 1e-14);
    CHECK(opt.state_tensors().size() == (o.momentum != 0 ? model.params.size() : 0));
  }
}

TEST_CASE("sgd: one momentum step worked out by hand, and the state roundtrip") {
  // p 1, g 2, lr 0.5, momentum 0.5, wd 0.25.  t=1: d = 2 + 0.25 = 2.25, b = 2.25, p = 1 - 1.125 = -0.125.
  // t=2 with g 1: d = 1 + 0.25 * (-0.125) = 0.96875, b = 0.5 * 2.25 + 0.96875 = 2.09375,
  // p = -0.125 - 0.5 * 2.09375 = -1.171875.
  Param p("w", Tensor::from(std::vector<double>{1.0}, {1}));
  std::vector<Param*> params{&p};
  qlora::train::Sgd opt(params, {.lr = 0.5, .momentum = 0.5, .weight_decay = 0.25});
  p.grad = Tensor::from(std::vector<double>{2.0}, {1});
  opt.step();
  CHECK(p.value.item<double>() == -0.125);
  const auto saved = clone_all(opt.state_tensors());
  const auto scalars = opt.scalar_state();

  Param q("w", p.value.clone());
  std::vector<Param*> resumed_params{&q};
  qlora::train::Sgd resumed(resumed_params, {.lr = 0.5, .momentum = 0.5, .weight_decay = 0.25});
  resumed.load_state(scalars, saved);
  p.grad = Tensor::from(std::vector<double>{1.0}, {1});
  q.grad = p.grad.clone();
  opt.step();
  resumed.step();
  CHECK(p.value.item<double>() == -1.171875);
  CHECK(q.value.item<double>() == -1.171875);

  CHECK_THROWS_AS(qlora::train::Sgd(params, {.momentum = 0.0, .nesterov = true}), Error);
}

// ---- gradient clipping ----------------------------------------------------------------------------------

TEST_CASE("clip_grad_norm_: scales the global norm to max_norm and returns the norm before clipping") {
  Model model = Model::random<float>(kSizes, 80);
  model.set_grads<float>(1);
  const auto grads = flat(model.grads<float>());
  double sum_sq = 0;
  for (double g : grads) sum_sq += g * g;
  const double norm = std::sqrt(sum_sq);  // ~ sqrt(40009 * 3) ~ 346, far above 0.3
  // f32 gradients summed in f32 by the kernel: 1e-5 relative.
  CHECK(qlora::train::global_grad_norm(model.params) == doctest::Approx(norm).epsilon(1e-5));

  const double returned = qlora::train::clip_grad_norm_(model.params);  // QLoRA's 0.3
  CHECK(returned == doctest::Approx(norm).epsilon(1e-5));
  const auto clipped = flat(model.grads<float>());
  double clipped_sq = 0;
  for (double g : clipped) clipped_sq += g * g;
  // PyTorch's coefficient max_norm / (norm + 1e-6): the new norm is 0.3 * norm / (norm + 1e-6).
  CHECK(std::sqrt(clipped_sq) == doctest::Approx(0.3 * norm / (norm + 1e-6)).epsilon(1e-5));
  CHECK(std::sqrt(clipped_sq) == doctest::Approx(0.3).epsilon(1e-5));
  // Direction kept: every gradient scaled by the same factor.
  std::vector<double> expected(grads.size());
  for (std::size_t i = 0; i < grads.size(); ++i) expected[i] = grads[i] * 0.3 / (norm + 1e-6);
  CHECK(rel_error(clipped, expected) < 1e-5);

  // Below max_norm: untouched.
  const auto before = model.grads<float>();
  const double small = qlora::train::clip_grad_norm_(model.params, 1.0);
  CHECK(small == doctest::Approx(0.3).epsilon(1e-5));
  CHECK(model.grads<float>() == before);
  CHECK(qlora::train::clip_coefficient(2.0, 0.5) == doctest::Approx(0.5 / (2.0 + 1e-6)).epsilon(1e-15));
  CHECK(qlora::train::clip_coefficient(0.1, 0.5) == 1.0);
  CHECK_THROWS_AS(qlora::train::clip_grad_norm_(model.params, 0.0), Error);
}

TEST_CASE("clip_grad_norm_: a non-finite gradient gives a non-finite norm, untouched gradients, all_finite false") {
  Model model = Model::random<float>(kSizes, 90);
  model.set_grads<float>(1);
  CHECK(qlora::train::all_finite(model.params));
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    CAPTURE(bad);
    model.set_grads<float>(1);
    model.params[2]->grad.data<float>()[12345] = bad;
    const auto before = flat(model.grads<float>());
    const double norm = qlora::train::clip_grad_norm_(model.params, 0.3);
    CHECK_FALSE(std::isfinite(norm));
    const auto after = flat(model.grads<float>());
    for (std::size_t i = 0; i < before.size(); ++i)
      if (std::isfinite(before[i]) && before[i] != after[i]) FAIL("gradient " << i << " changed");
    CHECK_FALSE(qlora::train::all_finite(model.params));
  }
}
