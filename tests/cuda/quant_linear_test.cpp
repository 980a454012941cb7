// QuantLinear on CUDA against the same layer on the CPU (the reference backend), for every Base x Adapter
// pair the tools use: forward, dx, and the adapter gradients; f32 activations (f32-accurate) and bf16
// activations (bf16 tolerance; adapter masters and their gradients stay f32).

#include <doctest/doctest.h>

#include <string>
#include <variant>

#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/quant.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {

const Device gpu = Device::cuda(0);

double rel(const Tensor& got, const Tensor& want) {
  return test::rel_error(got.to(Device::cpu()).to(DType::f32).to_vector<float>(), want.to(DType::f32).to_vector<float>());
}

nn::BaseWeight base_weight(const std::string& format, const Tensor& w, Device device) {
  if (format == "dense") return w.to(device);
  return quant::quantize(w, quant::QuantConfig::parse(format)).to(device);
}

}  // namespace

TEST_CASE("quant_linear on cuda: every base x adapter pair matches the CPU layer") {
  const std::int64_t n = 40, d_out = 128, d_in = 256;
  const Tensor w = ops::randn(Shape{d_out, d_in}, 1, Device::cpu(), 0.f, 0.05f);
  for (const std::string format : {"dense", "nf4", "int4-g64", "int2-g64", "dint4-g64"}) {
    for (const char* adapter : {"lora", "qblora", "qalora", "qablora", "hira"}) {
      for (const DType act : {DType::f32, DType::bf16}) {
        CAPTURE(format);
        CAPTURE(std::string(adapter));
        CAPTURE(std::string(dtype_name(act)));
        nn::AdapterConfig cfg;
        cfg.kind = nn::parse_adapter_kind(adapter);
        cfg.rank = 8;
        cfg.dropout = 0.1f;  // the Philox mask is the same on both backends
        auto cpu_layer = nn::make_linear("l", base_weight(format, w, Device::cpu()), cfg, 3, 5);
        auto gpu_layer = nn::make_linear("l", base_weight(format, w, gpu), cfg, 3, 5);
        std::uint64_t seed = 10;
        for (autograd::Param* p : cpu_layer->params()) p->value.copy_from(ops::randn(p->value.shape(), seed++, Device::cpu(), 0.f, 0.1f));
        for (std::size_t i = 0; i < cpu_layer->params().size(); ++i)
          gpu_layer->params()[i]->value.copy_from(cpu_layer->params()[i]->value);

        const Tensor x = ops::randn(Shape{n, d_in}, 2).to(act).to(DType::f32);  // values the bf16 run sees exactly
        const Tensor dy = ops::randn(Shape{n, d_out}, 3).to(act).to(DType::f32);
        nn::Context cpu_ctx, gpu_ctx;
        cpu_ctx.seed = gpu_ctx.seed = 77;
        const Tensor y_cpu = cpu_layer->forward(cpu_ctx, x);
        const Tensor y_gpu = gpu_layer->forward(gpu_ctx, x.to(gpu).to(act));
        const Tensor dx_cpu = cpu_layer->backward(cpu_ctx, dy);
        const Tensor dx_gpu = gpu_layer->backward(gpu_ctx, dy.to(gpu).to(act));
        const double tolerance = act == DType::f32 ? 1e-5 : 2e-2;
        CHECK(y_gpu.dtype() == act);
        CHECK(rel(y_gpu, y_cpu) < tolerance);
        CHECK(rel(dx_gpu, dx_cpu) < tolerance);
        for (std::size_t i = 0; i < cpu_layer->params().size(); ++i) {
          CHECK(gpu_layer->params()[i]->grad.dtype() == DType::f32);
          CHECK(rel(gpu_layer->params()[i]->grad, cpu_layer->params()[i]->grad) < tolerance);
        }
      }
    }
  }
}
