// The Llama model on CUDA against the same model on the CPU (the reference backend): the tiny random
// model (2 layers, hidden 16, GQA 4/2 heads, vocab 37) with LoRA adapters, dense and NF4 bases; logits,
// loss and adapter gradients in f32 activations (f32-accurate) and bf16 activations (bf16 tolerance;
// adapter masters and gradients stay f32). Also KV-cache decoding on the device against its full forward.

#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "models/llama/generate.hpp"
#include "models/llama/load.hpp"
#include "qlora/ops/random.hpp"
#include "support/random.hpp"
#include "support/tiny_llama.hpp"

using namespace qlora;
using namespace qlora::models::llama;

namespace {

const Device gpu = Device::cuda(0);

using qlora::test::tiny_llama_config;

// Random weights already rounded to `act` (so the bf16 run and its f32 CPU reference see the same values).
TensorSource rounded_source(const Config& c, DType act) {
  return [c, act](const std::string& name) {
    Shape shape;
    std::uint64_t seed = 1;
    for (const auto& s : io::llama_tensor_specs(c)) {
      ++seed;
      if (s.name == name) shape = s.shape;
    }
    const Tensor t = shape.rank() == 1 ? ops::rand(shape, seed, Device::cpu(), 0.8f, 1.2f)
                                       : ops::randn(shape, seed, Device::cpu(), 0.f, 0.3f);
    return t.to(act).to(DType::f32);
  };
}

double rel(const Tensor& got, const Tensor& want) {
  return test::rel_error(got.to(Device::cpu()).to(DType::f32).to_vector<float>(), want.to(Device::cpu()).to(DType::f32).to_vector<float>());
}

const std::vector<std::int32_t> kIds = {1, 5, 17, 33, 8, 2, 1, 30, 4, 4, 19, 36};
const std::vector<std::int32_t> kTargets = {5, 17, 33, 8, 2, -100, 30, 4, 4, 19, 36, 11};

}  // namespace

TEST_CASE("llama on cuda: logits, loss and adapter gradients match the CPU model") {
  const Config c = tiny_llama_config();
  for (const std::string base : {"dense", "nf4"}) {
    for (const DType act : {DType::f32, DType::bf16}) {
      for (const bool checkpointing : {false, true}) {
        CAPTURE(base);
        CAPTURE(std::string(dtype_name(act)));
        CAPTURE(checkpointing);
        LoadOptions o;
        o.adapter.kind = nn::AdapterKind::lora;
        o.adapter.rank = 4;
        if (base != "dense") o.quant = quant::QuantConfig::parse(base);
        Model cpu_model = build_model(c, rounded_source(c, act), o);
        o.device = gpu;
        o.dtype = act;
        Model gpu_model = build_model(c, rounded_source(c, act), o);
        gpu_model.checkpointing = checkpointing;
        const auto cpu_params = cpu_model.params(), gpu_params = gpu_model.params();
        REQUIRE(cpu_params.size() == gpu_params.size());
        std::uint64_t seed = 50;
        for (std::size_t i = 0; i < cpu_params.size(); ++i) {
          cpu_params[i]->value.copy_from(ops::randn(cpu_params[i]->value.shape(), seed++, Device::cpu(), 0.f, 0.3f));
          gpu_params[i]->value.copy_from(cpu_params[i]->value);
        }
        const Tensor ids = Tensor::from(kIds, {2, 6}), targets = Tensor::from(kTargets, {2, 6});
        const double tolerance = act == DType::f32 ? 1e-4 : 5e-2;

        const Tensor gpu_logits = gpu_model.logits(ids);
        CHECK(rel(gpu_logits, cpu_model.logits(ids)) < tolerance);

        nn::Context cpu_ctx, gpu_ctx;
        const LossResult cl = cpu_model.forward_backward(cpu_ctx, ids, targets);
        const LossResult gl = gpu_model.forward_backward(gpu_ctx, ids, targets);
        CHECK(gl.valid_tokens == cl.valid_tokens);
        CHECK(gl.loss == doctest::Approx(cl.loss).epsilon(act == DType::f32 ? 1e-5 : 2e-2));
        for (std::size_t i = 0; i < cpu_params.size(); ++i) {
          CAPTURE(cpu_params[i]->name);
          REQUIRE(gpu_params[i]->grad.defined());
          CHECK(gpu_params[i]->grad.dtype() == DType::f32);
          CHECK(rel(gpu_params[i]->grad, cpu_params[i]->grad) < (act == DType::f32 ? 1e-4 : 8e-2));
        }
      }
    }
  }
}

TEST_CASE("llama on cuda: KV-cache decoding equals the device's full forward") {
  const Config c = tiny_llama_config();
  for (const DType act : {DType::f32, DType::bf16}) {
    CAPTURE(std::string(dtype_name(act)));
    LoadOptions o;
    o.device = gpu;
    o.dtype = act;
    Model m = build_model(c, rounded_source(c, act), o);
    const std::vector<std::int32_t> ids = {1, 5, 17, 33, 8, 2, 9, 14};
    const Tensor full = m.logits(Tensor::from(ids, {1, 8}));
    KvCache cache(c, 1, 8, act, gpu);
    std::vector<float> inc = m.logits(Tensor::from(std::vector<std::int32_t>(ids.begin(), ids.begin() + 4), {1, 4}), &cache)
                                 .to_vector<float>();
    for (std::size_t p = 4; p < ids.size(); ++p) {
      const std::vector<float> l = m.logits(Tensor::from(std::vector<std::int32_t>{ids[p]}, {1, 1}), &cache).to_vector<float>();
      inc.insert(inc.end(), l.begin(), l.end());
    }
    // bf16: K/V rounded identically in both paths; differences come from the f32 accumulation order only.
    CHECK(test::rel_error(inc, full.to_vector<float>()) < (act == DType::f32 ? 1e-5 : 2e-2));
  }
}
