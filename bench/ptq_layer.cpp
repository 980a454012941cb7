// Post-training quantization of one linear layer: RTN (quant::quantize) against GPTQ (quant::gptq_quantize),
// int4-g128, on Llama-7B projection shapes (W is [d_out, d_in]: 4096 x 4096 attention, 11008 x 4096 up/gate)
// and a small 1024 x 1024. Compute-bound and dominated, for GPTQ, by the lazy trailing updates (about
// rows * cols^2 multiply-adds) and the O(cols^3) Cholesky and inverse in double (on the CPU in both cases).
//
// Counters: "gptq_over_rtn" on the GPTQ run is its time over the RTN time of the same shape measured just
// before it in this process (RTN is registered first; the CUDA runs use the CPU's RTN time). The Hessian is X^T X / n of n = cols uniform inputs,
// prepared outside the timed region. The whole call is timed: argument checks, H preparation, Cholesky,
// column loop, packing (and for CUDA the transfers both ways).

#include <map>
#include <memory>
#include <utility>
#include <string>

#include "bench_util.hpp"
#include "qlora/quant/gptq.hpp"
#include "qlora/quant/gram.hpp"
#include "qlora/quant/quant.hpp"

namespace {

using namespace qlora::bench;

constexpr const char* kFormat = "int4-g128";

qlora::Tensor weight(std::int64_t rows, std::int64_t cols) {
  return qlora::Tensor::from(uniform(rows * cols, 11, -0.05f, 0.05f), qlora::Shape{rows, cols});
}

qlora::Tensor hessian(std::int64_t cols) {
  qlora::quant::GramAccumulator acc(cols, qlora::Device::cpu());
  acc.add(qlora::Tensor::from(uniform(cols * cols, 12), qlora::Shape{cols, cols}));
  return acc.gram();
}

void register_shape(std::int64_t rows, std::int64_t cols, bool cuda) {
  const std::string suffix = std::string("_") + kFormat + args({{"rows", rows}, {"cols", cols}});
  // One RTN time per shape, shared by the CPU and CUDA GPTQ runs (RTN runs on the CPU only).
  static std::map<std::pair<std::int64_t, std::int64_t>, std::shared_ptr<double>> rtn_times;
  auto& rtn_seconds = rtn_times[{rows, cols}];
  if (!rtn_seconds) rtn_seconds = std::make_shared<double>(0.0);
  const qlora::quant::QuantConfig cfg = qlora::quant::QuantConfig::parse(kFormat);
  const benchmark::TimeUnit unit = rows * cols >= (1 << 24) ? benchmark::kSecond : benchmark::kMillisecond;
  if (!cuda) {
    add(
        "BM_rtn_cpu" + suffix,
        [=, rtn_seconds = rtn_seconds](benchmark::State& state) {
          const qlora::Tensor w = weight(rows, cols);
          const double seconds = time_cpu(state, [&] { benchmark::DoNotOptimize(qlora::quant::quantize(w, cfg)); });
          *rtn_seconds = seconds / double(state.iterations());
        },
        unit)
        ->Iterations(rows * cols >= (1 << 24) ? 2 : 5);
  }
  add(
      std::string(cuda ? "BM_gptq_cuda" : "BM_gptq_cpu") + suffix,
      [=, rtn_seconds = rtn_seconds](benchmark::State& state) {
        const qlora::Tensor w = weight(rows, cols);
        const qlora::Tensor h = hessian(cols);
        qlora::quant::GptqOptions opt;
        if (cuda) opt.device = qlora::Device::cuda(0);
        const double seconds =
            time_cpu(state, [&] { benchmark::DoNotOptimize(qlora::quant::gptq_quantize(w, h, cfg, opt)); });
        if (*rtn_seconds > 0) state.counters["gptq_over_rtn"] = seconds / double(state.iterations()) / *rtn_seconds;
      },
      unit)
      ->Iterations(1);
}

void register_cpu() {
  for (const auto& [rows, cols] : {std::pair<std::int64_t, std::int64_t>{1024, 1024}, {4096, 4096}, {11008, 4096}})
    register_shape(rows, cols, false);
}

#if defined(QLORA_WITH_CUDA)
void register_cuda() {
  for (const auto& [rows, cols] : {std::pair<std::int64_t, std::int64_t>{4096, 4096}, {11008, 4096}})
    register_shape(rows, cols, true);
}
#endif

}  // namespace

int main(int argc, char** argv) {
#if defined(QLORA_WITH_CUDA)
  return bench_main(argc, argv, register_cpu, register_cuda);
#else
  return bench_main(argc, argv, register_cpu, nullptr);
#endif
}
