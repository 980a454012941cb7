// RA-LoRA in training (train/rank_adaptive.hpp): the schedule, the parameter budget over many reallocations of
// layers of different shapes while their factors keep changing (as training changes them), AdamW's state mapped
// over a resize (kept entries keep their moments, new ones start at exp_avg 0 and the tensor's mean exp_avg_sq)
// and an optimizer rebuilt on it, the checkpoint shapes restored by prepare_resume, rank_pattern, and refusals.

#include <doctest/doctest.h>

#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "qlora/nn/linear_factory.hpp"
#include "qlora/train/adamw.hpp"
#include "qlora/train/checkpoint.hpp"
#include "qlora/train/rank_adaptive.hpp"
#include "support/files.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {

// Linears of several shapes (dense random bases) with LoRA adapters of rank r.
std::vector<std::unique_ptr<nn::Linear>> make_layers(int rank, nn::AdapterKind kind = nn::AdapterKind::lora) {
  nn::AdapterConfig cfg;
  cfg.kind = kind;
  cfg.rank = rank;
  cfg.alpha = 2.f * float(rank);
  std::vector<std::unique_ptr<nn::Linear>> out;
  const std::int64_t shapes[][2] = {{16, 32}, {32, 16}, {24, 24}, {8, 40}, {40, 8}};
  for (std::size_t i = 0; i < std::size(shapes); ++i) {
    const auto [o, n] = shapes[i];
    out.push_back(nn::make_linear("l" + std::to_string(i), Tensor::from(test::gaussian(std::size_t(o * n), i), Shape{o, n}), cfg,
                                  100 + i, i));
  }
  return out;
}

std::vector<nn::Linear*> pointers(const std::vector<std::unique_ptr<nn::Linear>>& layers) {
  std::vector<nn::Linear*> out;
  for (const auto& l : layers) out.push_back(l.get());
  return out;
}

// What training does between analyses: every factor moves (B away from 0), in place at its current shape.
void perturb(const std::vector<std::unique_ptr<nn::Linear>>& layers, std::uint64_t seed, float step = 0.3f) {
  for (const auto& l : layers)
    for (autograd::Param* p : l->params()) {
      const Tensor noise = ops::randn(p->value.shape(), seed++, Device::cpu(), 0.f, step);
      ops::axpy_(p->value, 1.f, noise);
    }
}

// Training that concentrates each layer's update in a different, changing number of directions: the components
// of A and B beyond a drawn count are damped, then everything moves a little.
void concentrate(const std::vector<std::unique_ptr<nn::Linear>>& layers, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  for (const auto& l : layers) {
    nn::LowRank& a = *l->low_rank_adapter();
    const std::int64_t r = a.shape().rank, keep = 1 + std::int64_t(gen() % std::uint64_t(r));
    std::vector<float> av = a.A.value.to_vector<float>(), bv = a.B.value.to_vector<float>();
    const std::int64_t in = a.A.value.dim(1), out = a.B.value.dim(0);
    for (std::int64_t j = keep; j < r; ++j) {
      for (std::int64_t i = 0; i < in; ++i) av[std::size_t(j * in + i)] *= 0.05f;
      for (std::int64_t o = 0; o < out; ++o) bv[std::size_t(o * r + j)] *= 0.05f;
    }
    a.A.value.copy_from(Tensor::from(av, a.A.value.shape()));
    a.B.value.copy_from(Tensor::from(bv, a.B.value.shape()));
  }
  perturb(layers, seed, 0.01f);
}

std::vector<autograd::Param*> all_params(const std::vector<std::unique_ptr<nn::Linear>>& layers) {
  std::vector<autograd::Param*> out;
  for (const auto& l : layers)
    for (autograd::Param* p : l->params()) out.push_back(p);
  return out;
}

}  // namespace

TEST_CASE("rank-adaptive: the schedule: from the warm-up every N steps until stop") {
  auto layers = make_layers(4);
  train::RankAdaptiveOptions o;
  o.start = 10, o.every = 5, o.stop = 30;
  train::RankAdaptiveLora ra(pointers(layers), o, 100);
  std::vector<std::int64_t> due;
  for (std::int64_t t = 1; t <= 100; ++t)
    if (ra.due(t)) due.push_back(t);
  CHECK(due == std::vector<std::int64_t>{10, 15, 20, 25, 30});
  train::RankAdaptiveOptions defaults;
  defaults.every = 20;
  train::RankAdaptiveLora d(pointers(layers), defaults, 200);  // start = every, stop = 30% of 200
  CHECK(d.options().start == 20);
  CHECK(d.options().stop == 60);
  CHECK(d.options().rule.min_rank == 4);  // min(8, 4)
  CHECK(d.options().rule.max_rank == 8);  // 2 x 4
  CHECK(d.budget() == 4 * (48 + 48 + 48 + 48 + 48));
}

TEST_CASE("rank-adaptive: the budget is never exceeded over many reallocations") {
  for (const std::int64_t multiple : {1, 2}) {
    CAPTURE(multiple);
    auto layers = make_layers(6);
    train::RankAdaptiveOptions o;
    o.every = 1;
    o.stop = 1000;
    o.rule.min_rank = 2, o.rule.max_rank = 16, o.rule.margin = 3, o.rule.multiple = multiple;
    o.budget = 6 * 5 * 48 - 100;  // below the start: refused
    CHECK(test::error_of([&] { train::RankAdaptiveLora(pointers(layers), o, 1000); }).find("below the adapters' 1440") !=
          std::string::npos);
    o.budget = 0;  // the start's count
    train::RankAdaptiveLora ra(pointers(layers), o, 1000);
    std::int64_t resized = 0, below = 0;
    std::set<std::int64_t> ranks_seen;
    for (std::int64_t t = 1; t <= 60; ++t) {
      // Broad moves (every direction wanted: growth up to the budget) alternate with concentrated ones.
      if (t % 4 == 0) perturb(layers, std::uint64_t(1000 * t), 0.5f);
      else concentrate(layers, std::uint64_t(1000 * t));
      const auto report = ra.after_step(t);
      REQUIRE(!report.record.is_null());
      const std::int64_t n = ra.parameter_count();
      CHECK(n <= ra.budget());
      CHECK(report.record["rank_adjustment"]["parameters"] == n);
      std::int64_t counted = 0;
      for (autograd::Param* p : all_params(layers)) counted += p->value.numel();
      CHECK(counted == n);  // the layers' own parameters are what the budget counts
      if (report.reshaped) ++resized;
      if (n < ra.budget()) ++below;
      for (const auto& [name, r] : ra.ranks()) {
        CHECK(r >= 2);
        CHECK(r <= 16);
        ranks_seen.insert(r);
      }
    }
    CHECK(resized > 10);           // it did reallocate, many times
    CHECK(ranks_seen.size() > 3);  // to several different ranks
    MESSAGE("multiple " << multiple << ": " << resized << " reallocations, " << below << " of 60 below the budget");
  }
}

TEST_CASE("rank-adaptive: AdamW's state after a resize: kept entries keep their moments, new ones restart") {
  auto layers = make_layers(4);
  std::vector<autograd::Param*> params = all_params(layers);
  train::AdamW adam(params, train::AdamWOptions{1e-2});
  for (int step = 0; step < 3; ++step) {
    for (autograd::Param* p : params)
      p->grad = ops::randn(p->value.shape(), 50 + std::uint64_t(step), Device::cpu(), 0.f, 1.f);
    adam.step();
  }
  train::RankAdaptiveOptions o;
  o.every = 1, o.stop = 10;
  o.rule.min_rank = 1, o.rule.max_rank = 8, o.rule.margin = 0, o.rule.energy = 0.5;
  o.budget = 4 * 5 * 48;
  train::RankAdaptiveLora ra(pointers(layers), o, 10);
  const auto before = adam.state_tensors();
  std::map<std::string, std::vector<float>> old;
  for (const auto& [k, t] : before) old[k] = t.to_vector<float>();
  const auto r0 = ra.ranks();
  perturb(layers, 7, 1.0f);  // B A of rank 4 with a spread spectrum: tau = 0.5 shrinks every layer
  REQUIRE(ra.after_step(1).reshaped);
  const auto after = ra.remap_optimizer_state(before);
  REQUIRE(after.size() == before.size());
  bool some_shrunk = false;
  for (const auto& [key, t] : after) {
    const std::string param = key.substr(0, key.rfind('.'));
    autograd::Param* p = nullptr;
    for (autograd::Param* q : params)
      if (q->name == param) p = q;
    REQUIRE(p != nullptr);
    CHECK(t.shape() == p->value.shape());
    const std::vector<float> v = t.to_vector<float>();
    if (v.size() == old[key].size()) {
      CHECK(v == old[key]);  // an unchanged layer keeps its state
      continue;
    }
    some_shrunk = true;
    if (key.ends_with("exp_avg")) {
      for (float x : v) CHECK(x == 0.f);
    } else {
      double mean = 0;
      for (float x : old[key]) mean += double(x) / double(old[key].size());
      for (float x : v) CHECK(x == doctest::Approx(mean).epsilon(1e-6));
    }
  }
  CHECK(some_shrunk);
  // An optimizer over the new shapes takes the mapped state and keeps the step count.
  train::AdamW rebuilt(params, adam.options());
  rebuilt.load_state(adam.scalar_state(), after);
  CHECK(rebuilt.step_count() == 3);
  for (autograd::Param* p : params) p->grad = ops::randn(p->value.shape(), 99, Device::cpu(), 0.f, 1.f);
  rebuilt.step();
  for (autograd::Param* p : params)
    for (float x : p->value.to_vector<float>()) REQUIRE(std::isfinite(x));
  (void)r0;
}

TEST_CASE("rank-adaptive: a checkpoint restores the ranks and the subspace memory") {
  test::TempDir dir;
  auto layers = make_layers(4);
  train::RankAdaptiveOptions o;
  o.every = 1, o.stop = 10;
  o.rule.min_rank = 1, o.rule.max_rank = 8, o.rule.energy = 0.5, o.rule.margin = 0;
  train::RankAdaptiveLora ra(pointers(layers), o, 10);
  perturb(layers, 3, 1.0f);
  REQUIRE(ra.after_step(1).reshaped);
  std::vector<autograd::Param*> saved = all_params(layers);
  train::AdamW adam(saved);
  for (autograd::Param* p : ra.checkpoint_state()) saved.push_back(p);
  train::save_checkpoint(dir.path(), saved, adam, train::TrainerState{1, {}, {}});

  auto fresh = make_layers(4);  // as a resumed process builds them: rank 4 everywhere
  train::RankAdaptiveLora resumed(pointers(fresh), o, 10);
  const auto checkpoint = *train::latest_checkpoint(dir.path());
  resumed.prepare_resume(checkpoint);
  CHECK(resumed.ranks() == ra.ranks());
  CHECK(resumed.rank_pattern() == ra.rank_pattern());
  CHECK(!ra.rank_pattern().empty());
  std::vector<autograd::Param*> into = all_params(fresh);
  train::AdamW adam2(into);
  for (autograd::Param* p : resumed.checkpoint_state()) into.push_back(p);
  (void)train::load_checkpoint(checkpoint, into, adam2);
  for (std::size_t i = 0; i < into.size(); ++i) CHECK(into[i]->value.to_vector<float>() == saved[i]->value.to_vector<float>());
  // And the next analysis decides the same.
  perturb(layers, 5), perturb(fresh, 5);
  CHECK(ra.after_step(2).record == resumed.after_step(2).record);

  // A checkpoint without the subspace tensors (another run) is refused, naming the tensor.
  test::TempDir plain;
  train::save_checkpoint(plain.path(), all_params(layers), adam, train::TrainerState{1, {}, {}});
  CHECK(test::error_of([&] { resumed.prepare_resume(*train::latest_checkpoint(plain.path())); }).find("rank_adaptive.l0.subspace") !=
        std::string::npos);
}

TEST_CASE("rank-adaptive: presets: every low-rank one; hira is refused") {
  auto qblora = make_layers(2, nn::AdapterKind::qblora);  // r' = 4
  train::RankAdaptiveOptions o;
  train::RankAdaptiveLora ra(pointers(qblora), o, 100);
  CHECK(ra.ranks().at("l0") == 4);
  CHECK(ra.budget() == 4 * (8 + 16 + 16 + 8 + 12 + 12 + 4 + 20 + 20 + 4));
  auto hira = make_layers(2, nn::AdapterKind::hira);
  CHECK(test::error_of([&] { train::RankAdaptiveLora(pointers(hira), o, 100); }).find("has no rank to adapt") !=
        std::string::npos);
  // rank_pattern naming a layer the model lacks.
  auto lora = make_layers(4);
  CHECK(test::error_of([&] { train::apply_rank_pattern(pointers(lora), {{"l9", 3}}, "cfg.json"); }) ==
        "cfg.json: rank_pattern names l9, which is not a low-rank adapter of the model");
  train::apply_rank_pattern(pointers(lora), {{"l1", 7}}, "cfg.json");
  CHECK(lora[1]->params()[0]->value.shape() == Shape{7, 16});
}
