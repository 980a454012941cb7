// Time to quantize one layer with COMQ and with MagR (+ RTN), against plain RTN of the same layer measured in
// the same process (qlora/quant/comq.hpp, qlora/quant/magr.hpp; docs/ptq-comq-magr.md).
//
// Shapes: Llama-7B projections W [d_out, d_in] = 4096 x 4096 (attention) and 11008 x 4096 (MLP up/gate), and
// smaller ones that finish in seconds on a small CPU. The Gram matrix is H = X^T X / N + 0.01 I from N = 512
// uniform random tokens: COMQ's and MagR's costs depend on the shapes only (COMQ reads one row of H per
// coordinate: rows * cols^2 multiply-adds per sweep; MagR runs 200 GEMMs [rows, cols] x [cols, cols]).
//
// Counters: "weights/s" (rows * cols per second) and "x_rtn_time", this quantizer's time as a multiple of
// RTN's on the same shape (BM_reference_rtn_*, registered first). One iteration each: the large CPU cases
// take minutes. CUDA: MagR's iterations on the device (the prox kernel + cuBLASLt f32 GEMMs); COMQ's sweeps
// on the device (cuda/quant/comq.cu), timed like GPTQ's CUDA cases in ptq_layer.cpp: from host W and H,
// the uploads, RTN's grid on the host and the download of the result included.

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bench_util.hpp"
#include "qlora/quant/comq.hpp"
#include "qlora/quant/magr.hpp"
#include "qlora/quant/quantize.hpp"

namespace {

using namespace qlora::bench;

struct Layer {
  qlora::Tensor w, h;
};

// W [rows, cols] uniform in [-0.05, 0.05); H = X^T X / N + 0.01 I with X [512, cols] uniform in [-1, 1).
Layer make_layer(std::int64_t rows, std::int64_t cols) {
  constexpr std::int64_t kTokens = 512;
  Layer l;
  l.w = qlora::Tensor::from(uniform(rows * cols, 11, -0.05f, 0.05f), qlora::Shape{rows, cols});
  const std::vector<float> x = uniform(kTokens * cols, 12);
  std::vector<float> h = zeros(cols * cols);
  eigen_gemm(x.data(), x.data(), h.data(), cols, cols, kTokens, true, false, 1, 0, 0, 0);
  for (std::int64_t i = 0; i < cols * cols; ++i) h[std::size_t(i)] /= float(kTokens);
  for (std::int64_t j = 0; j < cols; ++j) h[std::size_t(j * cols + j)] += 0.01f;
  l.h = qlora::Tensor::from(h, qlora::Shape{cols, cols});
  return l;
}

// The layer of a shape, built once per process (the 11008 x 4096 one holds 180 MiB of W and 64 MiB of H).
std::shared_ptr<Layer> layer(std::int64_t rows, std::int64_t cols) {
  static std::vector<std::pair<std::pair<std::int64_t, std::int64_t>, std::shared_ptr<Layer>>> cache;
  for (auto& [shape, l] : cache)
    if (shape.first == rows && shape.second == cols) return l;
  cache.push_back({{rows, cols}, std::make_shared<Layer>(make_layer(rows, cols))});
  return cache.back().second;
}

// Times op() once per iteration on the wall clock, without bench_util's untimed warm-up call (a COMQ or MagR
// run of a large layer takes minutes; there is nothing to warm up at that scale).
template <class Op>
double time_runs(benchmark::State& state, Op&& op) {
  double total = 0;
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    op();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    state.SetIterationTime(seconds);
    total += seconds;
  }
  return total;
}

// Reports weights/s and the time as a multiple of the reference's (rtn->rate holds RTN's weights per second).
void report(benchmark::State& state, const Reference* rtn, double weights, double seconds) {
  state.counters["weights/s"] = benchmark::Counter(weights, benchmark::Counter::kIsIterationInvariantRate,
                                                   benchmark::Counter::OneK::kIs1000);
  if (rtn == nullptr) {
    return;
  }
  state.SetLabel("vs " + rtn->name);
  if (rtn->rate > 0 && seconds > 0)
    state.counters["x_rtn_time"] = (seconds / double(state.iterations())) / (weights / rtn->rate);
}

const char* const kFormat = "int4-g128";

void register_shape(std::int64_t rows, std::int64_t cols, bool cuda) {
  const std::string suffix = std::string("_") + kFormat + args({{"rows", rows}, {"cols", cols}});
  const double weights = double(rows) * double(cols);
  auto rtn = make_reference(std::string(cuda ? "BM_reference_rtn_for_cuda" : "BM_reference_rtn") + suffix, Work::flops);
  add(
      rtn->name,
      [=](benchmark::State& state) {
        const auto l = layer(rows, cols);
        const auto cfg = qlora::quant::QuantConfig::parse(kFormat);
        const double seconds = time_cpu(state, [&] { benchmark::DoNotOptimize(qlora::quant::quantize(l->w, cfg)); });
        report(state, nullptr, weights, seconds);
        rtn->rate = weights * double(state.iterations()) / seconds;
      },
      benchmark::kMillisecond);
  add(
      std::string(cuda ? "BM_comq_cuda" : "BM_comq_cpu") + "_greedy_1sweep" + suffix,
      [=](benchmark::State& state) {
        const auto l = layer(rows, cols);
        const auto cfg = qlora::quant::QuantConfig::parse(kFormat);
        const qlora::Device device = cuda ? qlora::Device::cuda(0) : qlora::Device::cpu();
        const double seconds = time_runs(state, [&] {
          benchmark::DoNotOptimize(qlora::quant::comq_quantize(l->w.to(device), l->h.to(device), cfg));
        });
        report(state, rtn.get(), weights, seconds);
      },
      benchmark::kMillisecond)
      ->Iterations(1);
  add(
      std::string(cuda ? "BM_magr_cuda" : "BM_magr_cpu") + "_200it_rtn" + suffix,
      [=](benchmark::State& state) {
        const auto l = layer(rows, cols);
        const auto cfg = qlora::quant::QuantConfig::parse(kFormat);
        qlora::quant::MagrOptions o = qlora::quant::magr_options_for_group(cfg.group);
        if (cuda) o.device = qlora::Device::cuda(0);
        const double beta = qlora::quant::magr_default_beta(cfg);
        const double seconds = time_runs(state, [&] {
          benchmark::DoNotOptimize(qlora::quant::magr_rtn_quantize(qlora::quant::magr_preprocess(l->w, l->h, o), cfg, beta));
        });
        report(state, rtn.get(), weights, seconds);
      },
      benchmark::kMillisecond)
      ->Iterations(1);
}

const std::int64_t kShapes[][2] = {{512, 512}, {1024, 1024}, {4096, 4096}, {11008, 4096}};

// MagR on the CPU costs 200 iterations of a cols^2 x rows product: hours at the Llama shapes on a few cores.
// The CPU runs the two small shapes unless QLORA_BENCH_SLOW=1 (scripts/gpu-check's ten-minute calls included).
void register_cpu() {
  const char* slow = std::getenv("QLORA_BENCH_SLOW");
  const bool all = slow != nullptr && std::string(slow) == "1";
  for (const auto& s : kShapes)
    if (all || s[0] * s[1] <= 1024 * 1024) register_shape(s[0], s[1], false);
}

void register_cuda() {
  for (const auto& s : kShapes) register_shape(s[0], s[1], true);
}

}  // namespace

int main(int argc, char** argv) { return qlora::bench::bench_main(argc, argv, register_cpu, register_cuda); }
