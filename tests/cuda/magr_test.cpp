// MagR on CUDA: the prox kernel (cuda/quant/magr.cu) against its CPU twin (qlora/cpu/magr.hpp) on random
// non-zero inputs, per row and per group, with t from 0 (identity) to beyond ||v||_1 (zeros), in place; and
// magr_preprocess with the iterations on the device against the CPU path.

#include <doctest/doctest.h>

#include <cstdint>
#include <vector>

#include "device_buffer.hpp"
#include "qlora/cpu/magr.hpp"
#include "qlora/cuda/magr.hpp"
#include "qlora/quant/magr.hpp"

using qlora::test::DeviceBuffer;
using qlora::test::rel_error;

TEST_CASE("cuda magr: the prox kernel matches the CPU twin") {
  // The kernel brackets the clip level by bisection in f32 and sums in f32, the twin sorts and sums in f64:
  // relative error 1e-5 (outputs are the inputs or +-c, so the error is that of c).
  struct Case {
    std::int64_t rows, cols, group;
  };
  for (const Case c : {Case{7, 300, 300}, Case{64, 4096, 4096}, Case{33, 1000, 128}, Case{5, 70, 16}}) {
    for (const double t_fraction : {0.0, 1e-3, 0.05, 0.5, 2.0}) {
      CAPTURE(c.rows);
      CAPTURE(c.cols);
      CAPTURE(c.group);
      CAPTURE(t_fraction);
      const auto v = qlora::test::random_vector<float>(std::size_t(c.rows * c.cols), 70 + c.cols, -1.0, 1.0);
      // t relative to a segment's typical l1 mass (about group / 2): 2.0 zeroes every segment.
      const double t = t_fraction * 0.5 * double(std::min(c.group, c.cols));
      std::vector<float> expected(v.size());
      qlora::cpu::linf_prox_rows(v.data(), expected.data(), c.rows, c.cols, c.group, t);
      DeviceBuffer<float> v_dev(v), out_dev(v.size());
      out_dev.poison();
      qlora::cuda::linf_prox_rows(v_dev.data(), out_dev.data(), c.rows, c.cols, c.group, float(t), nullptr);
      const auto got = out_dev.download();
      if (t_fraction >= 2.0) {
        for (const float x : got) CHECK(x == 0.f);
      } else {
        CHECK(rel_error(got, expected) < 1e-5);
      }
      // In place.
      qlora::cuda::linf_prox_rows(v_dev.data(), v_dev.data(), c.rows, c.cols, c.group, float(t), nullptr);
      CHECK(rel_error(v_dev.download(), got) == 0.0);
    }
  }
}

TEST_CASE("cuda magr: preprocessing on the device matches the CPU path") {
  // 200 iterations of cuBLASLt f32 GEMMs and the f32 prox against Eigen and the f64-summed prox: the two
  // paths round differently at every step; the map is non-expansive (prox of a convex function after a step
  // of size 1/L), so the difference stays at f32 rounding level amplified by the iteration count: 1e-4.
  const std::int64_t rows = 96, cols = 256;
  std::vector<float> x = qlora::test::random_vector<float>(std::size_t(512 * cols), 81);
  for (std::int64_t t = 0; t < 512; ++t) x[std::size_t(t * cols + 3)] *= 10.f;  // an outlier channel
  std::vector<float> h(std::size_t(cols * cols), 0.f);
  for (std::int64_t i = 0; i < cols; ++i)
    for (std::int64_t k = 0; k < cols; ++k) {
      double s = 0;
      for (std::int64_t t = 0; t < 512; ++t) s += double(x[std::size_t(t * cols + i)]) * x[std::size_t(t * cols + k)];
      h[std::size_t(i * cols + k)] = float(s / 512);
    }
  const qlora::Tensor w = qlora::Tensor::from(qlora::test::gaussian(std::size_t(rows * cols), 82), {rows, cols});
  const qlora::Tensor ht = qlora::Tensor::from(h, {cols, cols});
  for (const int group : {0, 128}) {
    CAPTURE(group);
    qlora::quant::MagrOptions o = qlora::quant::magr_options_for_group(group);
    const auto cpu = qlora::quant::magr_preprocess(w, ht, o).to_vector<float>();
    o.device = qlora::Device::cuda(0);
    const auto gpu = qlora::quant::magr_preprocess(w, ht, o).to_vector<float>();
    CHECK(rel_error(gpu, cpu) < 1e-4);
  }
}
