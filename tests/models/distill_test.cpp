// Teacher Intervention on the tiny Llama (methods/teacher-intervention.md): the schedule's modes at given
// steps against the method file's formula; substituting the teacher's attention signals reproduces the
// teacher's logits exactly when everything downstream of the intervened point is the teacher's; the
// intervened paths get no gradient; a student equal to its teacher is unchanged by any mode; float64 finite
// differences of the whole TI objective in every mode; the objective factory and its refusals.

#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "models/llama/distill.hpp"
#include "models/llama/load.hpp"
#include "qlora/autograd/gradcheck.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/quantize.hpp"
#include "support/files.hpp"
#include "support/random.hpp"
#include "support/tiny_llama.hpp"

using namespace qlora;
using namespace qlora::models::llama;
using train::InterventionPoint;

namespace {

using qlora::test::tiny_llama_config;

const std::vector<std::int32_t> kIds = {1, 5, 17, 33, 8, 2, 1, 30, 4, 4, 19, 36};
const std::vector<std::int32_t> kTargets = {5, 17, 33, 8, 2, -100, 30, 4, 4, 19, 36, 11};
Tensor ids_tensor(const std::vector<std::int32_t>& ids) { return Tensor::from(ids, {2, std::int64_t(ids.size()) / 2}); }

LoadOptions options(DType dtype, nn::AdapterKind kind) {
  LoadOptions o;
  o.dtype = dtype;
  o.param_dtype = dtype;
  o.adapter.kind = kind;
  o.adapter.rank = 2;
  o.adapter.alpha = 4.f;
  o.seed = 5;
  return o;
}

void randomize_adapters(Model& m, std::uint64_t seed) {
  for (autograd::Param* p : m.params())
    p->value.copy_from(ops::randn(p->value.shape(), seed++, Device::cpu(), 0.f, 0.3f).to(p->value.dtype()));
}

// Replaces the student's `projs` of every block by int2 (group 16) quantizations of the same weights, with
// the student's adapter kind (so the student differs from the teacher exactly there).
void quantize_projections(Model& student, const std::vector<DecoderBlock::Proj>& projs, const LoadOptions& o) {
  const auto cfg = quant::QuantConfig::parse("int2-g16");
  for (std::int64_t i = 0; i < student.num_layers(); ++i)
    for (const DecoderBlock::Proj p : projs) {
      nn::Linear& old = student.block(i).linear(p);
      const Tensor w = old.merged_weight(DType::f32);
      student.block(i).replace_linear(p, nn::make_linear(old.name(), quant::quantize(w, cfg), o.adapter, 11, 3,
                                                         o.param_dtype));
    }
}

std::map<std::string, double> terms_of(const train::ObjectiveResult& r) {
  return std::map<std::string, double>(r.terms.begin(), r.terms.end());
}

// A fixed-mode TI schedule over the first 100 steps.
TiOptions fixed_mode(InterventionPoint point) {
  TiOptions o;
  o.schedule = train::TiSchedule::parse(std::string(train::intervention_point_name(point)), 100);
  return o;
}

}  // namespace

TEST_CASE("ti schedule: the gradual, inverted, single and stochastic modes at given steps") {
  // methods/teacher-intervention.md: for s = 60, output for steps 0-9, context 10-19, map 20-59; then none.
  const train::TiSchedule g = train::TiSchedule::parse("gradual", 60);
  for (std::int64_t t = 0; t < 70; ++t) {
    CAPTURE(t);
    const InterventionPoint want = t < 10   ? InterventionPoint::output
                                   : t < 20 ? InterventionPoint::context
                                   : t < 60 ? InterventionPoint::map
                                            : InterventionPoint::none;
    CHECK(g.at(t) == want);
  }
  // s = 7 (not a multiple of 6): output while 6t < 7 (t = 0, 1), context while 3t < 7 (t = 2), map to t = 6.
  const train::TiSchedule g7 = train::TiSchedule::parse("gradual", 7);
  const std::vector<InterventionPoint> want7 = {InterventionPoint::output, InterventionPoint::output,
                                                InterventionPoint::context, InterventionPoint::map,
                                                InterventionPoint::map,    InterventionPoint::map,
                                                InterventionPoint::map,    InterventionPoint::none};
  for (std::int64_t t = 0; t < 8; ++t) CHECK(g7.at(t) == want7[std::size_t(t)]);
  // Inverted: map for the first third, context the second, output the last.
  const train::TiSchedule inv = train::TiSchedule::parse("inverted", 60);
  CHECK(inv.at(0) == InterventionPoint::map);
  CHECK(inv.at(19) == InterventionPoint::map);
  CHECK(inv.at(20) == InterventionPoint::context);
  CHECK(inv.at(39) == InterventionPoint::context);
  CHECK(inv.at(40) == InterventionPoint::output);
  CHECK(inv.at(59) == InterventionPoint::output);
  CHECK(inv.at(60) == InterventionPoint::none);
  // s = 0: plain distillation from the start.
  CHECK(train::TiSchedule::parse("gradual", 0).at(0) == InterventionPoint::none);
  for (const char* mode : {"map", "context", "output"}) {
    const train::TiSchedule s = train::TiSchedule::parse(mode, 5);
    CHECK(train::intervention_point_name(s.at(4)) == mode);
    CHECK(s.at(5) == InterventionPoint::none);
  }
  // Stochastic: the same draws for the same seed, each mode about a third of the time.
  const train::TiSchedule a = train::TiSchedule::parse("stochastic", 3000, 9), b = train::TiSchedule::parse("stochastic", 3000, 9);
  std::map<InterventionPoint, int> counts;
  for (std::int64_t t = 0; t < 3000; ++t) {
    CHECK(a.at(t) == b.at(t));
    ++counts[a.at(t)];
  }
  CHECK(counts.count(InterventionPoint::none) == 0);
  for (const auto p : {InterventionPoint::output, InterventionPoint::context, InterventionPoint::map})
    CHECK(counts[p] / 3000.0 == doctest::Approx(1.0 / 3).epsilon(0.1));
  CHECK(test::error_of([] { (void)train::TiSchedule::parse("sideways", 60); }).find("--ti-schedule 'sideways'") !=
        std::string::npos);
  CHECK(test::error_of([] { (void)train::TiSchedule::parse("gradual", -1); }).find("--ti-steps") != std::string::npos);
}

TEST_CASE("ti: the teacher's attention signals reproduce the teacher's logits downstream of the intervened point") {
  // The student differs from the teacher only in the projections the intervention bypasses: q, k under map,
  // q, k, v under context, q, k, v, o under output; its adapters are at B = 0 (exactly the base). With the
  // teacher's signal substituted, every remaining operation sees the teacher's inputs and weights, in the
  // same order, so the logits must be bit-identical (tolerance 0). Without it they differ.
  const LoadOptions o = options(DType::f32, nn::AdapterKind::lora);
  Model teacher = random_model(tiny_llama_config(), teacher_load_options(o), 7, 0.3f);
  const Tensor ids = ids_tensor(kIds);
  const std::vector<float> teacher_logits = teacher.logits(ids).to_vector<float>();
  const HiddenStates signals = hidden_states(teacher, ids, true, false);
  REQUIRE(signals.attention.size() == 2);
  CHECK(signals.attention[0].q.shape() == Shape{2, 6, 4, 4});
  CHECK(signals.attention[0].k.shape() == Shape{2, 6, 2, 4});
  CHECK(signals.attention[0].context.shape() == Shape{2, 6, 16});
  CHECK(signals.attention[0].output.shape() == Shape{2, 6, 16});

  const std::vector<std::pair<InterventionPoint, std::vector<DecoderBlock::Proj>>> cases = {
      {InterventionPoint::map, {DecoderBlock::q_proj, DecoderBlock::k_proj}},
      {InterventionPoint::context, {DecoderBlock::q_proj, DecoderBlock::k_proj, DecoderBlock::v_proj}},
      {InterventionPoint::output, {DecoderBlock::q_proj, DecoderBlock::k_proj, DecoderBlock::v_proj, DecoderBlock::o_proj}}};
  for (const auto& [point, projs] : cases) {
    CAPTURE(std::string(train::intervention_point_name(point)));
    Model student = random_model(tiny_llama_config(), o, 7, 0.3f);
    quantize_projections(student, projs, o);
    const std::vector<float> own = student.logits(ids).to_vector<float>();
    CHECK(test::rel_error(own, teacher_logits) > 1e-2);  // int2 q/k/v/o: the student is visibly different
    {
      TeacherInterventionObjective::InterventionScope scope(student, point, signals.attention);
      const std::vector<float> intervened = student.logits(ids).to_vector<float>();
      CHECK(intervened == teacher_logits);
    }
    CHECK(student.block(0).intervention() == InterventionPoint::none);  // the scope cleared it
    CHECK(student.logits(ids).to_vector<float>() == own);
  }
}

TEST_CASE("ti: intervened paths get no gradient (map: q, k; context: q, k, v; output: q, k, v, o)") {
  const LoadOptions o = options(DType::f32, nn::AdapterKind::lora);
  Model teacher = random_model(tiny_llama_config(), teacher_load_options(o), 7, 0.3f);
  const std::map<InterventionPoint, std::vector<std::string>> frozen = {
      {InterventionPoint::none, {}},
      {InterventionPoint::map, {"q_proj", "k_proj"}},
      {InterventionPoint::context, {"q_proj", "k_proj", "v_proj"}},
      {InterventionPoint::output, {"q_proj", "k_proj", "v_proj", "o_proj"}}};
  for (const auto& [point, zero] : frozen) {
    CAPTURE(std::string(train::intervention_point_name(point)));
    Model student = random_model(tiny_llama_config(), o, 7, 0.3f);
    quantize_projections(student, {DecoderBlock::q_proj, DecoderBlock::v_proj, DecoderBlock::up_proj}, o);
    randomize_adapters(student, 100);
    TeacherInterventionObjective ti(teacher, point == InterventionPoint::none ? TiOptions{} : fixed_mode(point));
    nn::Context ctx;
    const train::ObjectiveResult r = ti.forward_backward(student, ctx, ids_tensor(kIds), ids_tensor(kTargets),
                                                         point == InterventionPoint::none ? 1000 : 0);
    CHECK(std::isfinite(r.loss));
    CHECK(terms_of(r)["intervention"] == double(int(point)));
    for (autograd::Param* p : student.params()) {
      CAPTURE(p->name);
      bool should_be_zero = false;
      for (const std::string& z : zero) should_be_zero |= p->name.find(z) != std::string::npos;
      REQUIRE(p->grad.defined());  // a zero gradient where the path is bypassed: the optimizer needs one
      const double norm = std::sqrt(ops::sum_squares(std::vector<Tensor>{p->grad}));
      if (should_be_zero) CHECK(norm == 0.0);
      else CHECK(norm > 0.0);
    }
  }
}

TEST_CASE("ti: a student equal to its teacher is unchanged by every intervention mode") {
  const LoadOptions o = options(DType::f64, nn::AdapterKind::lora);
  Model teacher = random_model(tiny_llama_config(), teacher_load_options(o), 7, 0.3f);
  Model student = random_model(tiny_llama_config(), o, 7, 0.3f);  // B = 0: the teacher's function
  const Tensor ids = ids_tensor(kIds), targets = ids_tensor(kTargets);
  // Reference: the teacher's own soft cross-entropy with itself = the mean entropy of its next-token
  // distribution, computed here directly from its logits.
  const std::vector<double> z = teacher.logits(ids).to_vector<double>();
  double entropy = 0;
  for (std::size_t r = 0; r < 12; ++r) {
    double m = -1e300, s = 0, e = 0;
    for (std::size_t v = 0; v < 37; ++v) m = std::max(m, z[r * 37 + v]);
    for (std::size_t v = 0; v < 37; ++v) s += std::exp(z[r * 37 + v] - m);
    for (std::size_t v = 0; v < 37; ++v) {
      const double p = std::exp(z[r * 37 + v] - m) / s;
      e -= p * std::log(p);
    }
    entropy += e / 12;
  }
  for (const auto point : {InterventionPoint::none, InterventionPoint::map, InterventionPoint::context,
                           InterventionPoint::output}) {
    CAPTURE(std::string(train::intervention_point_name(point)));
    TeacherInterventionObjective ti(teacher, point == InterventionPoint::none ? TiOptions{} : fixed_mode(point));
    const auto t = terms_of(ti.evaluate(student, ids, targets, point == InterventionPoint::none ? 1000 : 0));
    CHECK(t.at("hidden_mse") == 0.0);
    CHECK(t.at("attention_mse") == 0.0);
    CHECK(t.at("logits_kd") == doctest::Approx(entropy).epsilon(1e-12));
    nn::Context ctx;
    student.zero_grad();
    (void)ti.forward_backward(student, ctx, ids, targets, point == InterventionPoint::none ? 1000 : 0);
    // At the teacher, soft-CE (softmax(z_S) - p_T) and both MSE gradients vanish: only rounding remains.
    CHECK(std::sqrt(ops::sum_squares(std::vector<Tensor>{student.params()[1]->grad})) < 1e-12);
  }
}

TEST_CASE("ti: float64 finite differences of the whole objective in every mode, with and without checkpointing") {
  const LoadOptions o = options(DType::f64, nn::AdapterKind::lora);
  Model teacher = random_model(tiny_llama_config(), teacher_load_options(o), 7, 0.3f);
  for (const auto point : {InterventionPoint::none, InterventionPoint::map, InterventionPoint::context,
                           InterventionPoint::output}) {
    for (const bool checkpointing : {false, true}) {
      CAPTURE(std::string(train::intervention_point_name(point)));
      CAPTURE(checkpointing);
      Model student = random_model(tiny_llama_config(), o, 8, 0.3f);  // other base weights than the teacher's
      student.checkpointing = checkpointing;
      randomize_adapters(student, 100);
      TiOptions opts = point == InterventionPoint::none ? TiOptions{} : fixed_mode(point);
      opts.weights.cross_entropy = 0.5;  // every term of the loss in play
      opts.logits_chunk_rows = 5;        // the soft cross-entropy in ragged chunks
      TeacherInterventionObjective ti(teacher, opts);
      const std::int64_t step = point == InterventionPoint::none ? 1000 : 0;
      const Tensor ids = ids_tensor(kIds), targets = ids_tensor(kTargets);
      nn::Context ctx;
      const train::ObjectiveResult r = ti.forward_backward(student, ctx, ids, targets, step);
      const auto loss = [&] { return ti.evaluate(student, ids, targets, step).loss; };
      CHECK(std::abs(loss() - r.loss) < 1e-12);
      const auto t = terms_of(r);
      CHECK(t.at("hidden_mse") > 0);
      CHECK(t.at("logits_kd") > 0);
      if (point == InterventionPoint::output) CHECK(t.at("attention_mse") == 0.0);  // o_S is o_T
      else CHECK(t.at("attention_mse") > 0);
      for (autograd::Param* p : student.params()) {
        CAPTURE(p->name);
        const Tensor analytic = p->grad.clone();
        CHECK(autograd::gradient_error(loss, p->value, analytic) < 1e-6);
      }
    }
  }
}

TEST_CASE("objectives: the factory by name, its refusals, and the trainer's view of an objective") {
  const LoadOptions o = options(DType::f32, nn::AdapterKind::lora);
  Model teacher = random_model(tiny_llama_config(), teacher_load_options(o), 7, 0.3f);
  Model student = random_model(tiny_llama_config(), o, 7, 0.3f);
  ObjectiveOptions opts;
  for (const char* name : {"sft", "rilq", "ti"}) {
    opts.name = name;
    CHECK(make_objective(opts, &teacher)->name() == name);
  }
  opts.name = "dpo";
  CHECK(test::error_of([&] { (void)make_objective(opts, &teacher); }) == "--objective 'dpo' is not one of sft, rilq, ti");
  opts.name = "rilq";
  CHECK(test::error_of([&] { (void)make_objective(opts, nullptr); }).find("needs a teacher") != std::string::npos);

  // A teacher of another shape is refused naming the mismatch.
  Config narrow = tiny_llama_config();
  narrow.num_hidden_layers = 1;
  Model other = random_model(narrow, teacher_load_options(o), 7, 0.3f);
  const auto rilq = make_objective(opts, &other);
  nn::Context ctx;
  CHECK(test::error_of([&] { (void)rilq->forward_backward(student, ctx, ids_tensor(kIds), ids_tensor(kTargets), 0); })
            .find("num_hidden_layers") != std::string::npos);

  // sft through ObjectiveModel is the model's own forward_backward; the step given to the objective is the
  // optimizer step (micro-batch index / micro-batches per step).
  opts.name = "sft";
  const auto sft = make_objective(opts, nullptr);
  train::ObjectiveModel<Model> view(student, *sft, 4);
  randomize_adapters(student, 3);
  student.zero_grad();
  ctx.step = 9;
  const train::ObjectiveResult a = view.forward_backward(ctx, ids_tensor(kIds), ids_tensor(kTargets));
  const std::vector<float> ga = view.params()[1]->grad.to_vector<float>();
  view.zero_grad();
  const LossResult b = student.forward_backward(ctx, ids_tensor(kIds), ids_tensor(kTargets));
  CHECK(a.loss == b.loss);
  CHECK(a.cross_entropy == b.loss);
  CHECK(ga == student.params()[1]->grad.to_vector<float>());
  CHECK(view.evaluate_loss(ids_tensor(kIds), ids_tensor(kTargets)).loss == doctest::Approx(b.loss).epsilon(1e-6));

  opts.name = "ti";
  opts.ti = fixed_mode(InterventionPoint::map);
  opts.ti.schedule.intervention_steps = 2;  // map for optimizer steps 0 and 1
  const auto ti = make_objective(opts, &teacher);
  train::ObjectiveModel<Model> ti_view(student, *ti, 4);
  ctx.step = 7;  // optimizer step 1: intervened
  CHECK(terms_of(ti_view.forward_backward(ctx, ids_tensor(kIds), ids_tensor(kTargets)))["intervention"] ==
        double(int(InterventionPoint::map)));
  ctx.step = 8;  // optimizer step 2: plain distillation
  CHECK(terms_of(ti_view.forward_backward(ctx, ids_tensor(kIds), ids_tensor(kTargets)))["intervention"] ==
        double(int(InterventionPoint::none)));
}
