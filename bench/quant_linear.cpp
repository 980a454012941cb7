// The core operator QuantLinear<Base, Adapter> (include/qlora/nn/quant_linear.hpp), forward + backward (dx and
// the adapter's gradients; the base gets none), at Llama-7B training shapes: 4096 tokens, r = 64, bf16
// activations, for every adapter preset on an NF4 and an INT4-g64 base.
// Reference, measured in the same program: the two cuBLAS bf16 GEMMs a dense frozen layer needs for the
// same step, y = x W^T and dx = dy W (FLOP 2 * 2 m n k). pct_of_ref = the operator's FLOP/s over the
// reference's at that same FLOP count, so 85 means the quantized operator (dequantization, adapter,
// pooling) costs 15% on top of the dense GEMMs (target: >= 85, docs/design.md).
// CPU: one small shape (256 tokens, 1024 x 1024, r = 16) against two Eigen f32 GEMMs.

#include "bench_util.hpp"
#include "qlora/nn/linear_factory.hpp"
#include "qlora/ops/random.hpp"
#include "qlora/quant/quant.hpp"

namespace {

using namespace qlora::bench;
namespace nn = qlora::nn;

struct LayerShape {
  std::int64_t tokens, d_out, d_in;
};

std::string suffix(const LayerShape& s) { return args({{"tokens", s.tokens}, {"out", s.d_out}, {"in", s.d_in}}); }
double step_flops(const LayerShape& s) { return 2.0 * 2.0 * double(s.tokens) * double(s.d_out) * double(s.d_in); }

const char* const kAdapters[] = {"lora", "qblora", "qalora", "qablora", "hira"};

std::unique_ptr<nn::Linear> make_layer(const LayerShape& s, const std::string& format, const char* adapter, int rank,
                                       qlora::Device device) {
  const qlora::Tensor w = qlora::ops::randn(qlora::Shape{s.d_out, s.d_in}, 1, qlora::Device::cpu(), 0.f, 0.02f);
  nn::AdapterConfig cfg;
  cfg.kind = nn::parse_adapter_kind(adapter);
  cfg.rank = rank;
  auto layer = nn::make_linear("bench", qlora::quant::quantize(w, qlora::quant::QuantConfig::parse(format)).to(device),
                               cfg, 2, 3);
  std::uint64_t seed = 10;  // non-zero B (or M): the adapter's arithmetic is real
  for (qlora::autograd::Param* p : layer->params())
    p->value.copy_from(qlora::ops::randn(p->value.shape(), seed++, device, 0.f, 0.01f));
  return layer;
}

void register_cpu() {
  const LayerShape s{256, 1024, 1024};
  const ReferencePtr ref = make_reference("BM_reference_eigen_2gemm_f32" + suffix(s), Work::flops);
  add(
      ref->name,
      [=](benchmark::State& state) {
        const std::vector<float> x = uniform(s.tokens * s.d_in, 1), w = uniform(s.d_out * s.d_in, 2),
                                 dy = uniform(s.tokens * s.d_out, 3);
        std::vector<float> y = zeros(s.tokens * s.d_out), dx = zeros(s.tokens * s.d_in);
        const double seconds = time_cpu(state, [&] {
          eigen_gemm(x.data(), w.data(), y.data(), s.tokens, s.d_out, s.d_in, false, true, 1, 0, 0, 0);
          eigen_gemm(dy.data(), w.data(), dx.data(), s.tokens, s.d_in, s.d_out, false, false, 1, 0, 0, 0);
        });
        report_reference(state, *ref, step_flops(s), seconds);
      },
      benchmark::kMillisecond);
  for (const std::string format : {"nf4", "int4-g64"}) {
    for (const char* adapter : kAdapters) {
      add(
          "BM_quant_linear_cpu_f32/" + format + "/" + adapter + suffix(s),
          [=](benchmark::State& state) {
            auto layer = make_layer(s, format, adapter, 16, qlora::Device::cpu());
            nn::Context ctx;
            const qlora::Tensor x = qlora::ops::randn(qlora::Shape{s.tokens, s.d_in}, 4);
            const qlora::Tensor dy = qlora::ops::randn(qlora::Shape{s.tokens, s.d_out}, 5);
            const double seconds = time_cpu(state, [&] {
              layer->forward(ctx, x);
              layer->backward(ctx, dy);
            });
            report_kernel(state, *ref, step_flops(s), seconds);
          },
          benchmark::kMillisecond);
    }
  }
}

#if defined(QLORA_WITH_CUDA)

void register_cuda() {
  for (const LayerShape s : {LayerShape{4096, 4096, 4096}, LayerShape{4096, 11008, 4096}, LayerShape{4096, 4096, 11008}}) {
    const ReferencePtr ref = make_reference("BM_reference_cublas_2gemm_bf16" + suffix(s), Work::flops);
    add(
        ref->name,
        [=](benchmark::State& state) {
          DeviceBuffer<qlora::bf16> x(s.tokens * s.d_in), w(s.d_out * s.d_in), y(s.tokens * s.d_out),
              dy(s.tokens * s.d_out), dx(s.tokens * s.d_in);
          fill_uniform(x, 1);
          fill_uniform(w, 2);
          fill_uniform(dy, 3);
          const double seconds = time_cuda(state, [&] {
            cublas_gemm(x.get(), w.get(), y.get(), s.tokens, s.d_out, s.d_in, false, true, 1, 0, 0, 0);
            cublas_gemm(dy.get(), w.get(), dx.get(), s.tokens, s.d_in, s.d_out, false, false, 1, 0, 0, 0);
          });
          report_reference(state, *ref, step_flops(s), seconds);
        },
        benchmark::kMicrosecond);
    for (const std::string format : {"nf4", "int4-g64"}) {
      for (const char* adapter : kAdapters) {
        add(
            "BM_quant_linear_cuda_bf16/" + format + "/" + adapter + suffix(s),
            [=](benchmark::State& state) {
              qlora::cuda::set_current_stream(stream());  // the operator's work is what the events time
              const qlora::Device gpu = qlora::Device::cuda(0);
              auto layer = make_layer(s, format, adapter, 64, gpu);
              nn::Context ctx;
              const qlora::Tensor x = qlora::ops::randn(qlora::Shape{s.tokens, s.d_in}, 4, gpu).to(qlora::DType::bf16);
              const qlora::Tensor dy = qlora::ops::randn(qlora::Shape{s.tokens, s.d_out}, 5, gpu).to(qlora::DType::bf16);
              const double seconds = time_cuda(state, [&] {
                layer->forward(ctx, x);
                layer->backward(ctx, dy);
              });
              report_kernel(state, *ref, step_flops(s), seconds);
            },
            benchmark::kMicrosecond);
      }
    }
  }
}

#endif  // QLORA_WITH_CUDA

}  // namespace

int main(int argc, char** argv) {
#if defined(QLORA_WITH_CUDA)
  return bench_main(argc, argv, register_cpu, register_cuda);
#else
  return bench_main(argc, argv, register_cpu, nullptr);
#endif
}
