// GPTQ's column loop on the GPU (cuda/quant/gptq.cu through quant::gptq_quantize with options.device = cuda)
// against the CPU path. Both run the same f32 in-block arithmetic (cpu::gptq_block_row, one rounding per
// operation) from the same f32 U, so a block's codes agree bit for bit; the lazy trailing update is a GEMM
// (Eigen on the CPU, cuBLAS here) that sums in another order, and a weight that lands within an ulp of a
// rounding boundary can take the other code, which then shifts the updates of the rest of its row a
// little. Tolerance: at most 0.2% of codes differ, and the layer output errors agree within 1% (both are
// far below RTN's, checked too).

#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "qlora/quant/gptq.hpp"
#include "qlora/quant/layer_error.hpp"
#include "qlora/quant/quant.hpp"
#include "support/random.hpp"

using namespace qlora;

namespace {

// H = Y^T Y / n + 0.01 I for a random Y with correlated neighbouring columns: positive definite, uneven diagonal.
Tensor random_hessian(std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const std::int64_t n = 2 * cols;
  std::vector<double> y(std::size_t(n * cols));
  for (std::int64_t t = 0; t < n; ++t) {
    double prev = normal(gen);
    for (std::int64_t j = 0; j < cols; ++j) y[std::size_t(t * cols + j)] = prev = 0.7 * prev + normal(gen) * (1 + j % 5);
  }
  std::vector<float> h(std::size_t(cols * cols));
  for (std::int64_t a = 0; a < cols; ++a)
    for (std::int64_t b = 0; b < cols; ++b) {
      double s = 0;
      for (std::int64_t t = 0; t < n; ++t) s += y[std::size_t(t * cols + a)] * y[std::size_t(t * cols + b)];
      h[std::size_t(a * cols + b)] = float(s / double(n) + (a == b ? 0.01 : 0.0));
    }
  return Tensor::from(h, Shape{cols, cols});
}

std::vector<std::uint8_t> unpacked_codes(const quant::QuantizedTensor& q) {
  std::vector<std::uint8_t> codes(std::size_t(q.rows * q.cols));
  for (std::int64_t r = 0; r < q.rows; ++r)
    for (std::int64_t c = 0; c < q.cols; ++c)
      codes[std::size_t(r * q.cols + c)] = cpu::unpack_code(q.codes.data<std::uint8_t>() + r * q.row_stride_bytes(), c, q.config.bits);
  return codes;
}

}  // namespace

TEST_CASE("cuda gptq: the GPU column loop matches the CPU path") {
  const std::int64_t rows = 200, cols = 320;  // 200 rows: a partial thread block; 320: a partial last lazy block
  const Tensor w = Tensor::from(test::gaussian(std::size_t(rows * cols), 61), Shape{rows, cols});
  const Tensor h = random_hessian(cols, 62);
  struct Case {
    std::string name;
    bool act_order, static_groups;
    std::int64_t block;
    double grid_shrink = 1.0;  // MagR's beta
  };
  for (const Case& c : {Case{"int4-g128", false, false, 128}, Case{"int3-g0", true, false, 128},
                        Case{"int2-g64", false, false, 48}, Case{"int4-g32-sym", false, true, 128},
                        Case{"dint4-g64-fz", true, true, 64}, Case{"nf4", false, false, 128},
                        Case{"int4-g32-mse", false, false, 128}, Case{"int3-g0", false, false, 128, 0.9},
                        Case{"int2-g64", false, false, 48, 0.8}, Case{"dint4-g32", true, true, 64, 0.95}}) {
    CAPTURE(c.name);
    CAPTURE(c.grid_shrink);
    const quant::QuantConfig cfg = quant::QuantConfig::parse(c.name);
    quant::GptqOptions opt;
    opt.act_order = c.act_order;
    opt.static_groups = c.static_groups;
    opt.block_size = c.block;
    opt.grid_shrink = c.grid_shrink;
    const quant::QuantizedTensor on_cpu = quant::gptq_quantize(w, h, cfg, opt);
    opt.device = Device::cuda(0);
    const quant::QuantizedTensor on_gpu = quant::gptq_quantize(w, h, cfg, opt);
    on_gpu.check("gptq on cuda");
    const auto a = unpacked_codes(on_cpu), b = unpacked_codes(on_gpu);
    std::int64_t differ = 0;
    for (std::size_t i = 0; i < a.size(); ++i) differ += a[i] != b[i];
    MESSAGE(c.name << " (grid shrink " << c.grid_shrink << "): " << differ << " of " << a.size() << " codes differ");
    CHECK(double(differ) <= 0.002 * double(a.size()));
    const double e_cpu = quant::layer_output_error(w, quant::dequantize(on_cpu), h);
    const double e_gpu = quant::layer_output_error(w, quant::dequantize(on_gpu), h);
    const double e_rtn = quant::layer_output_error(w, quant::dequantize(quant::quantize(w, cfg)), h);
    CHECK(std::abs(e_gpu - e_cpu) <= 0.01 * e_cpu);
    CHECK(e_gpu < e_rtn);
  }
}
