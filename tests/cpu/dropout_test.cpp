// Dropout twin: the mask is a pure function of (seed, offset + i), kept elements are scaled by 1/(1-p), and
// the kept fraction is close to 1-p.

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "qlora/cpu/dropout.hpp"
#include "support/random.hpp"

TEST_CASE("dropout: keeps about 1-p of the elements, scaled by 1/(1-p), reproducibly") {
  const std::int64_t n = 200000;
  const float p = 0.1f;
  const auto x = qlora::test::random_vector<float>(n, 5, 0.5, 1.5);  // never zero: a zero output means dropped
  std::vector<float> y(n), again(n), shifted(n);
  qlora::cpu::dropout(x.data(), y.data(), n, p, 42, 0);
  qlora::cpu::dropout(x.data(), again.data(), n, p, 42, 0);
  CHECK(y == again);
  std::int64_t kept = 0, wrongly_scaled = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    if (y[i] == 0.f) continue;
    ++kept;
    wrongly_scaled += y[i] != x[i] * (1.0f / (1.0f - p));
  }
  CHECK(wrongly_scaled == 0);
  // Binomial(n, 0.9): standard deviation sqrt(n p (1-p)) ~ 134; allow 5 sigma.
  CHECK(std::abs(double(kept) - 0.9 * n) < 5 * std::sqrt(n * 0.1 * 0.9));
  // An offset of 7 shifts the mask stream by 7 elements.
  qlora::cpu::dropout(x.data() + 7, shifted.data(), n - 7, p, 42, 7);
  for (std::int64_t i = 0; i < n - 7; i += 997) CHECK((shifted[i] == 0.f) == (y[i + 7] == 0.f));
}
