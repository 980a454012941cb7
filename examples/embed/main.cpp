// Embedding qlora: build tensors, run ops, check the result against a direct computation.
#include <cmath>
#include <cstdio>

#include "qlora/ops/ops.hpp"

int main() {
  using namespace qlora;
  const Tensor x = ops::randn({8, 16}, /*seed=*/1);
  const Tensor w = ops::rand({16}, /*seed=*/2, Device::cpu(), 0.5f, 1.5f);
  const ops::RmsNormResult norm = ops::rmsnorm(x, w, 1e-5f);
  const Tensor gram = ops::matmul(norm.y, norm.y, false, true);  // (8, 8): y y^T
  // Row 0 of y has squared norm sum_j (x_0j * rstd_0 * w_j)^2; gram(0, 0) must equal it.
  double expected = 0;
  for (int j = 0; j < 16; ++j) {
    const double v = double(x.data<float>()[j]) * norm.rstd.data<float>()[0] * w.data<float>()[j];
    expected += v * v;
  }
  const double got = gram.data<float>()[0];
  if (std::fabs(got - expected) > 1e-4 * expected) {
    std::printf("embed: gram(0,0) = %g, expected %g\n", got, expected);
    return 1;
  }
  std::printf("embed: ok (%s, gram(0,0) = %.6f)\n", gram.str().c_str(), got);
  return 0;
}
