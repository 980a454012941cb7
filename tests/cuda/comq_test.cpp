// COMQ on CUDA (cuda/quant/comq.cu) against its CPU twin (qlora/cpu/comq.hpp):
//  * the greedy order kernel (CUB's stable segmented sort of the twin's f64 keys) equals
//    cpu::comq_column_order exactly, ties and dead columns included;
//  * comq_quantize / comq_refine with W and H on the device equal the CPU path on a calibrated layer problem
//    (tests/quant/layer_problem.hpp, random non-zero W, H = X^T X / N with one dead input, H_jj = 0) over
//    asym/sym/dINT, per-channel and grouped, float zeros, 1 and 2 sweeps, scale updates on/off, RTN and Q = W
//    starts, greedy and natural order, f32 and f64 H.
// Tolerance: every decision is the twin's own QLORA_HD function (coordinate step, scale step, start value,
// greedy key); only the f64 dot products sum in another order, so a code changes only where its target t
// lies within ~1e-12 relative of a rounding midpoint (where both codes give the same error). Allowed: at most
// 1e-3 of the codes differ, layer errors tr((W - Q) H (W - Q)^T) agree to 1e-9 relative, and the scales of
// every row whose codes all agree are equal.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/comq.hpp"
#include "qlora/cuda/comq.hpp"
#include "qlora/quant/comq.hpp"
#include "qlora/quant/dequantize.hpp"
#include "qlora/quant/layer_error.hpp"
#include "qlora/quant/quantize.hpp"
#include "quant/layer_problem.hpp"
#include "support/random.hpp"

using namespace qlora;
using qlora::test::DeviceBuffer;

namespace {

std::vector<std::uint8_t> unpacked_codes(const quant::QuantizedTensor& q) {
  const quant::QuantizedTensor host = q.to(Device::cpu());
  std::vector<std::uint8_t> codes(std::size_t(q.rows * q.cols));
  cpu::unpack_codes(host.codes.data<std::uint8_t>(), q.rows, q.cols, q.config.bits, codes.data());
  return codes;
}

// H with input `dead` removed (its row and column zero: an input that never fires, H_jj = 0).
Tensor with_dead_input(const Tensor& h, std::int64_t dead) {
  Tensor out = h.clone();
  const std::int64_t n = h.dim(0);
  for (std::int64_t k = 0; k < n; ++k) out.data<float>()[dead * n + k] = out.data<float>()[k * n + dead] = 0.f;
  return out;
}

struct Comparison {
  std::int64_t codes_differ = 0, rows_differ = 0, scales_differ_in_equal_rows = 0;
  double error_cpu = 0, error_gpu = 0;
};

Comparison compare(const Tensor& w, const Tensor& h, const quant::QuantizedTensor& on_cpu,
                   const quant::QuantizedTensor& on_gpu) {
  Comparison c;
  const auto a = unpacked_codes(on_cpu), b = unpacked_codes(on_gpu);
  const auto sa = qlora::test::scales_of(on_cpu), sb = qlora::test::scales_of(on_gpu);
  const std::int64_t gpr = on_cpu.groups_per_row();
  for (std::int64_t r = 0; r < on_cpu.rows; ++r) {
    std::int64_t differ = 0;
    for (std::int64_t j = 0; j < on_cpu.cols; ++j) differ += a[std::size_t(r * on_cpu.cols + j)] != b[std::size_t(r * on_cpu.cols + j)];
    c.codes_differ += differ;
    c.rows_differ += differ > 0;
    if (differ == 0)
      for (std::int64_t g = 0; g < gpr; ++g) c.scales_differ_in_equal_rows += sa[std::size_t(r * gpr + g)] != sb[std::size_t(r * gpr + g)];
  }
  c.error_cpu = quant::layer_output_error(w, quant::dequantize(on_cpu), h);
  c.error_gpu = quant::layer_output_error(w, quant::dequantize(on_gpu.to(Device::cpu())), h);
  return c;
}

}  // namespace

TEST_CASE("cuda comq: the greedy order kernel equals cpu::comq_column_order") {
  // W rounded to a few values and H with repeated diagonal entries: many equal keys, which the stable sort
  // must leave in column order; every 7th input dead (H_jj = 0). Checked against the twin row by row,
  // exactly. (The sort's row chunks of 2^25 keys are not reached at these sizes.)
  for (const std::int64_t cols : {std::int64_t(1), std::int64_t(37), std::int64_t(300), std::int64_t(2048)}) {
    const std::int64_t rows = 45;
    CAPTURE(cols);
    auto w = qlora::test::random_vector<float>(std::size_t(rows * cols), 900 + std::uint64_t(cols));
    for (float& x : w) x = std::nearbyint(x * 4.f) / 4.f;  // 9 distinct values, +-0 among them
    std::vector<float> h(std::size_t(cols * cols), 0.25f);
    const auto diag = qlora::test::random_vector<float>(std::size_t(cols), 1000 + std::uint64_t(cols), 0.0, 3.0);
    for (std::int64_t j = 0; j < cols; ++j)
      h[std::size_t(j * cols + j)] = j % 7 == 3 ? 0.f : std::nearbyint(diag[std::size_t(j)]) + 1.f;
    std::vector<double> h64(h.begin(), h.end());
    for (const bool f64 : {false, true}) {
      CAPTURE(f64);
      DeviceBuffer<float> w_dev(w);
      DeviceBuffer<float> h_dev(h);
      DeviceBuffer<double> h64_dev(h64);
      DeviceBuffer<std::int32_t> order_dev(std::size_t(rows * cols));
      order_dev.poison();
      const std::size_t bytes = cuda::comq_greedy_order_scratch_bytes(rows, cols);
      DeviceBuffer<std::uint8_t> scratch(bytes);
      if (f64)
        cuda::comq_greedy_order(w_dev.data(), h64_dev.data(), rows, cols, order_dev.data(), scratch.data(), bytes, nullptr);
      else
        cuda::comq_greedy_order(w_dev.data(), h_dev.data(), rows, cols, order_dev.data(), scratch.data(), bytes, nullptr);
      const auto order = order_dev.download();
      cpu::ComqScratch s;
      std::int64_t mismatched_rows = 0;
      for (std::int64_t r = 0; r < rows; ++r) {
        cpu::comq_column_order(w.data() + r * cols, h.data(), cols, true, s);
        bool same = true;
        for (std::size_t i = 0; i < s.order.size(); ++i) same = same && order[std::size_t(r * cols) + i] == s.order[i];
        for (std::int64_t i = std::int64_t(s.order.size()); i < cols; ++i)  // the dead columns, after the others
          same = same && h[std::size_t(order[std::size_t(r * cols + i)] * (cols + 1))] == 0.f;
        mismatched_rows += !same;
      }
      CHECK(mismatched_rows == 0);
    }
  }
}

TEST_CASE("cuda comq: sweeps on the device match the CPU twin") {
  qlora::test::LayerProblemSpec spec;
  spec.rows = 70;  // not a multiple of anything
  spec.cols = 200;  // groups of 64: a short last group
  spec.tokens = 600;
  spec.seed = 23;
  const auto p = qlora::test::make_layer_problem(spec);
  const Tensor h32 = with_dead_input(p.h, 17);
  const Tensor h64 = h32.to(DType::f64);
  const Tensor w = p.w;
  const Device gpu = Device::cuda(0);
  const Tensor w_dev = w.to(gpu);
  std::int64_t runs = 0, total_codes = 0, total_differ = 0;
  for (const char* name : {"int4-g0", "int3-g64", "int2-g64-sym", "dint4-g64", "int3-g32-fz"}) {
    const quant::QuantConfig cfg = quant::QuantConfig::parse(name);
    for (const bool f64 : {false, true}) {
      const Tensor& h = f64 ? h64 : h32;
      const Tensor h_dev = h.to(gpu);
      for (const int sweeps : {1, 2})
        for (const bool scales : {false, true})
          for (const bool from_w : {false, true})
            for (const bool greedy : {true, false}) {
              CAPTURE(std::string(name));
              CAPTURE(f64);
              CAPTURE(sweeps);
              CAPTURE(scales);
              CAPTURE(from_w);
              CAPTURE(greedy);
              quant::ComqOptions o;
              o.sweeps = sweeps;
              o.update_scales = scales;
              o.start_from_weights = from_w;
              o.greedy_order = greedy;
              const quant::QuantizedTensor on_cpu = quant::comq_quantize(w, h, cfg, o);
              const quant::QuantizedTensor on_gpu = quant::comq_quantize(w_dev, h_dev, cfg, o);
              CHECK(on_gpu.device() == gpu);
              on_gpu.check("comq on cuda");
              const Comparison c = compare(w, h32, on_cpu, on_gpu);
              CHECK(double(c.codes_differ) <= 1e-3 * double(w.numel()));
              CHECK(std::abs(c.error_gpu - c.error_cpu) <= 1e-9 * c.error_cpu);
              CHECK(c.scales_differ_in_equal_rows == 0);
              ++runs;
              total_codes += w.numel();
              total_differ += c.codes_differ;
            }
    }
  }
  MESSAGE(runs << " runs: " << total_differ << " of " << total_codes << " codes differ between CUDA and the CPU twin");
}

TEST_CASE("cuda comq: refine from a start on either device, and H without live inputs") {
  qlora::test::LayerProblemSpec spec;
  spec.rows = 33;
  spec.cols = 96;
  spec.tokens = 300;
  spec.seed = 29;
  const auto p = qlora::test::make_layer_problem(spec);
  const Device gpu = Device::cuda(0);
  const quant::QuantConfig cfg = quant::QuantConfig::parse("int4-g32");
  const quant::QuantizedTensor start = quant::quantize(p.w, cfg);
  const quant::QuantizedTensor on_cpu = quant::comq_refine(p.w, p.h, start);
  for (const bool start_on_gpu : {false, true}) {
    CAPTURE(start_on_gpu);
    const quant::QuantizedTensor on_gpu =
        quant::comq_refine(p.w.to(gpu), p.h.to(gpu), start_on_gpu ? start.to(gpu) : start);
    CHECK(on_gpu.device() == gpu);
    const Comparison c = compare(p.w, p.h, on_cpu, on_gpu);
    CHECK(double(c.codes_differ) <= 1e-3 * double(p.w.numel()));
    CHECK(std::abs(c.error_gpu - c.error_cpu) <= 1e-9 * c.error_cpu);
    CHECK(c.error_gpu <= quant::layer_output_error(p.w, quant::dequantize(start), p.h));  // never above the start
  }
  // H = 0: no live column, no step; the codes stay RTN's (the CPU's rule), scale steps refuse (den = 0).
  const Tensor zero_h = Tensor::empty(Shape{spec.cols, spec.cols}, DType::f32).zero_();
  quant::ComqOptions o;
  o.update_scales = true;
  const quant::QuantizedTensor none = quant::comq_quantize(p.w.to(gpu), zero_h.to(gpu), cfg, o);
  CHECK(unpacked_codes(none) == unpacked_codes(start));
  CHECK(qlora::test::scales_of(none.to(Device::cpu())) == qlora::test::scales_of(start));
}

TEST_CASE("cuda comq: W and H on different devices is one clear error") {
  const Tensor w = Tensor::from(qlora::test::gaussian(8 * 16, 5), Shape{8, 16});
  Tensor h = Tensor::empty(Shape{16, 16}, DType::f32).zero_();
  for (std::int64_t j = 0; j < 16; ++j) h.data<float>()[j * 17] = 1.f;
  CHECK_THROWS_WITH_AS(quant::comq_quantize(w.to(Device::cuda(0)), h, quant::QuantConfig::parse("int4-g0")),
                       doctest::Contains("both must be on one device"), Error);
}
