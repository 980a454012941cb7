// Tensor, Shape, Device, DType: construction, views, conversions and the errors users see.

#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "qlora/core/tensor.hpp"
#include "support/random.hpp"

using namespace qlora;

TEST_CASE("tensor: shape, dtype and device basics") {
  const Shape s{2, 3, 4};
  CHECK(s.rank() == 3);
  CHECK(s.numel() == 24);
  CHECK(s[-1] == 4);
  CHECK(s.rows() == 6);
  CHECK(s.str() == "(2, 3, 4)");
  CHECK(Shape{}.numel() == 1);
  CHECK_THROWS_WITH_AS((Shape{1, 2, 3, 4, 5}), "shape of rank 5 exceeds the maximum rank 4", Error);
  CHECK_THROWS_AS(s[3], Error);
  CHECK(s.without_last() == Shape{2, 3});
  CHECK(s.without_first() == Shape{3, 4});
  CHECK(s.appended(5) == Shape{2, 3, 4, 5});
  CHECK(Shape{}.without_last() == Shape{});
  CHECK_THROWS_WITH_AS(s.appended(5).appended(6), "appending a dimension to (2, 3, 4, 5) exceeds the maximum rank 4", Error);
  CHECK(dtype_size(DType::bf16) == 2);
  CHECK(parse_dtype("i32") == DType::i32);
  CHECK_THROWS_AS(parse_dtype("f8"), Error);
  CHECK(Device::parse("cuda:3") == Device::cuda(3));
  CHECK(Device::parse("cpu").is_cpu());
  CHECK_THROWS_WITH_AS(Device::parse("gpu"), "unknown device 'gpu' (expected cpu, cuda or cuda:N)", Error);
  CHECK_THROWS_AS(Device::parse("cuda:x"), Error);
}

TEST_CASE("tensor: slices and selects are views of the leading dimension") {
  const std::vector<float> v = test::random_vector(24, 1);
  Tensor t = Tensor::from(v, {4, 3, 2});
  Tensor mid = t.slice(1, 3);
  CHECK(mid.shape() == Shape{2, 3, 2});
  CHECK(mid.data<float>() == t.data<float>() + 6);
  mid.data<float>()[0] = 42.f;  // shares storage
  CHECK(t.data<float>()[6] == 42.f);
  Tensor row = t.select(3);
  CHECK(row.shape() == Shape{3, 2});
  CHECK(row.data<float>()[5] == v[23]);
  CHECK_THROWS_AS(t.slice(2, 5), Error);
  Tensor flat = t.reshape({24});
  CHECK(flat.data() == t.data());
  CHECK_THROWS_WITH_AS(t.reshape({5, 5}), "cannot reshape tensor(4, 3, 2) f32 on cpu to (5, 5)", Error);
  CHECK_THROWS_AS(t.data<double>(), Error);
  Tensor c = t.clone();
  c.data<float>()[0] = -1.f;
  CHECK(t.data<float>()[0] == v[0]);
}

TEST_CASE("tensor: to(dtype) rounds to nearest even and round-trips") {
  const std::vector<float> v = test::random_vector(1000, 2, -100, 100);
  Tensor t = Tensor::from(v, {10, 100});
  Tensor b = t.to(DType::bf16);
  CHECK(b.dtype() == DType::bf16);
  const std::vector<float> back = b.to(DType::f32).to_vector<float>();
  for (std::size_t i = 0; i < v.size(); ++i) CHECK(std::abs(back[i] - v[i]) <= std::abs(v[i]) * 0x1p-8f);
  // bf16 keeps the top 16 bits of an f32, rounded: 1 + 2^-8 is a tie and rounds to even (1.0);
  // 1 + 3 * 2^-9 rounds up to 1 + 2^-7.
  Tensor ties = Tensor::from(std::vector<float>{1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-9f}, {2}).to(DType::bf16);
  CHECK(ties.data<bf16>()[0].bits == 0x3F80);
  CHECK(ties.data<bf16>()[1].bits == 0x3F81);
  Tensor d = t.to(DType::f64);
  CHECK(d.to_vector<double>()[7] == double(v[7]));
  CHECK_THROWS_AS(t.to(DType::i32), Error);
}

TEST_CASE("tensor: zeros, item and the host allocator's accounting") {
  const std::size_t before = CpuAllocator::instance().stats().allocated_bytes;
  {
    Tensor z = Tensor::zeros({3, 5}, DType::f32);
    CHECK(z.to_vector<float>() == std::vector<float>(15, 0.f));
    CHECK(CpuAllocator::instance().stats().allocated_bytes == before + 60);
    CHECK(Tensor::from(std::vector<int>{7}, {}).item<int>() == 7);
  }
  CHECK(CpuAllocator::instance().stats().allocated_bytes == before);
}

#if !defined(QLORA_WITH_CUDA)
TEST_CASE("tensor: asking for a CUDA tensor in a CPU-only build is a clear error") {
  CHECK_THROWS_WITH_AS(Tensor::empty({2}, DType::f32, Device::cuda(0)),
                       "cannot allocate on cuda:0: qlora was built without CUDA (configure with -DQLORA_CUDA=ON)",
                       Error);
}
#endif
