#pragma once
// Test inputs: seeded random values (never zeros, never constant) and comparison helpers.

#include <cmath>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "qlora/autograd/gradcheck.hpp"

namespace qlora::test {

// Uniform in [lo, hi), reproducible for a given seed.
template <class T = float>
std::vector<T> random_vector(std::size_t n, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = T(dist(gen));
  return v;
}

// Normal(0, sigma^2) floats, reproducible for a given seed: weights shaped like a trained layer's.
inline std::vector<float> gaussian(std::size_t n, std::uint64_t seed, double sigma = 0.02) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, sigma);
  std::vector<float> v(n);
  for (auto& x : v) x = float(dist(gen));
  return v;
}

template <class T>
std::vector<double> to_double(std::span<const T> x) {
  return std::vector<double>(x.begin(), x.end());
}

// ||a - b|| / ||b|| over any two arithmetic sequences, computed in double.
template <class A, class B>
double rel_error(const A& a, const B& b) {
  std::vector<double> da(std::begin(a), std::end(a)), db(std::begin(b), std::end(b));
  return autograd::relative_error(da, db);
}

}  // namespace qlora::test
