// Embedding qlora: build tensors, run ops, check the result against a direct computation.
#include <cmath>
#include <cstdio>
#include <vector>

#include "qlora/core/tensor.hpp"
#include "qlora/cpu/random.hpp"

int main() {
  using namespace qlora;
  std::vector<float> values(64);
  cpu::fill_normal(values.data(), 64, /*seed=*/1, /*offset=*/0, 0.f, 1.f);
  const Tensor x = Tensor::from(values, {8, 8});
  const Tensor rounded = x.to(DType::bf16).to(DType::f32);
  double worst = 0;
  for (int i = 0; i < 64; ++i)
    worst = std::fmax(worst, std::fabs(rounded.data<float>()[i] - values[i]) / std::fabs(values[i]));
  if (worst > 0x1p-8) {
    std::printf("embed: bf16 round trip error %g exceeds 2^-8\n", worst);
    return 1;
  }
  std::printf("embed: ok (%s, bf16 round-trip relative error %.2e)\n", x.str().c_str(), worst);
  return 0;
}
