// The collectives of the world communicator (MPI when built with it: world size 1 when started directly,
// N under mpirun -np N; else the single-process one) against closed forms: each rank fills values that
// depend on its rank, and every rank recomputes the other ranks' values to know the expected result.

#include <doctest/doctest.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>
#include <vector>

#include "dist/dist_test_util.hpp"
#include "qlora/dist/single_process.hpp"

using qlora::Device;
using qlora::DType;
using qlora::Error;
using qlora::Tensor;
using qlora::test::rank_values;
using qlora::test::rel_error;
using qlora::test::sum_over_ranks;
using qlora::test::world;

TEST_CASE("dist: the world communicator knows its rank and size") {
  auto& comm = world();
  CHECK(comm.size() >= 1);
  CHECK(comm.rank() >= 0);
  CHECK(comm.rank() < comm.size());
  CHECK(comm.is_root() == (comm.rank() == 0));
  CHECK(comm.supports(Device::cpu()));
  // Every rank contributes rank + 1: the sum is size (size + 1) / 2, exact in double.
  const double sum = comm.all_reduce_sum(double(comm.rank() + 1));
  CHECK(sum == double(comm.size()) * (comm.size() + 1) / 2);
  if (comm.is_root()) MESSAGE("world: ", std::string(comm.backend()), " of ", comm.size(), " ranks");
}

TEST_CASE("dist: all_reduce_sum_ and all_reduce_mean_ of f32 equal the closed form") {
  auto& comm = world();
  const int n = comm.size();
  for (const std::int64_t count : {1, 1000, 4099}) {
    CAPTURE(count);
    const auto mine = rank_values<float>(std::size_t(count), 11 + std::uint64_t(count), comm.rank());
    const auto expected_sum = sum_over_ranks(std::size_t(count), 11 + std::uint64_t(count), n);
    std::vector<double> expected_mean(expected_sum);
    for (double& x : expected_mean) x /= n;

    Tensor sum = Tensor::from(mine, {count});
    comm.all_reduce_sum_(sum);
    // f32 sums of n values of magnitude <= 1, in whatever order MPI chose: a few ulp.
    CHECK(rel_error(sum.to_vector<float>(), expected_sum) < 1e-6);

    Tensor mean = Tensor::from(mine, {count});
    comm.all_reduce_mean_(mean);
    CHECK(rel_error(mean.to_vector<float>(), expected_mean) < 1e-6);
  }
}

TEST_CASE("dist: all_reduce of f64, i32 and u8 is exact") {
  auto& comm = world();
  const int n = comm.size();
  // f64: the same closed form, to double rounding.
  const std::size_t count = 37;
  Tensor d = Tensor::from(rank_values<double>(count, 5, comm.rank()), {std::int64_t(count)});
  comm.all_reduce_mean_(d);
  auto expected = sum_over_ranks(count, 5, n);
  for (double& x : expected) x /= n;
  CHECK(rel_error(d.to_vector<double>(), expected) < 1e-14);

  // i32: rank * 1000 - i, sums exactly; u8: (37 rank + i) mod 256, and the sum wraps mod 256 like uint8_t.
  std::vector<std::int32_t> ints(count);
  std::vector<std::uint8_t> bytes(count);
  for (std::size_t i = 0; i < count; ++i) {
    ints[i] = comm.rank() * 1000 - std::int32_t(i);
    bytes[i] = std::uint8_t((37 * comm.rank() + int(i)) % 256);
  }
  Tensor ti = Tensor::from(ints, {std::int64_t(count)});
  Tensor tb = Tensor::from(bytes, {std::int64_t(count)});
  comm.all_reduce_sum_(ti);
  comm.all_reduce_sum_(tb);
  const auto got_i = ti.to_vector<std::int32_t>();
  const auto got_b = tb.to_vector<std::uint8_t>();
  for (std::size_t i = 0; i < count; ++i) {
    std::int32_t want_i = 0;
    std::uint8_t want_b = 0;
    for (int r = 0; r < n; ++r) {
      want_i += r * 1000 - std::int32_t(i);
      want_b = std::uint8_t(want_b + std::uint8_t((37 * r + int(i)) % 256));
    }
    CHECK(got_i[i] == want_i);
    CHECK(got_b[i] == want_b);
  }
}

TEST_CASE("dist: broadcast_ copies the root's tensor to every rank") {
  auto& comm = world();
  const int root = comm.size() > 1 ? 1 : 0;  // not rank 0, where a root is possible
  // f32, and bf16 which the collective copies as bytes.
  Tensor f = Tensor::from(rank_values<float>(301, 21, comm.rank()), {7, 43});
  comm.broadcast_(f, root);
  CHECK(f.to_vector<float>() == rank_values<float>(301, 21, root));

  const auto root_floats = rank_values<float>(64, 22, root);
  Tensor b = Tensor::from(rank_values<float>(64, 22, comm.rank()), {64}).to(DType::bf16);
  comm.broadcast_(b, root);
  const auto got = b.to(DType::f32).to_vector<float>();
  const auto want = Tensor::from(root_floats, {64}).to(DType::bf16).to(DType::f32).to_vector<float>();
  CHECK(got == want);
}

TEST_CASE("dist: all_gather concatenates the ranks' rows in rank order, uneven shards included") {
  auto& comm = world();
  const int n = comm.size();
  // Rank r holds r + 1 rows of 3 columns, valued 100 r + 10 row + col.
  const std::int64_t rows = comm.rank() + 1;
  std::vector<std::int32_t> mine;
  for (std::int64_t row = 0; row < rows; ++row)
    for (int col = 0; col < 3; ++col) mine.push_back(std::int32_t(100 * comm.rank() + 10 * row + col));
  const Tensor gathered = comm.all_gather(Tensor::from(mine, {rows, 3}));
  REQUIRE(gathered.rank() == 2);
  CHECK(gathered.dim(0) == std::int64_t(n) * (n + 1) / 2);
  CHECK(gathered.dim(1) == 3);
  std::vector<std::int32_t> want;
  for (int r = 0; r < n; ++r)
    for (int row = 0; row <= r; ++row)
      for (int col = 0; col < 3; ++col) want.push_back(100 * r + 10 * row + col);
  CHECK(gathered.to_vector<std::int32_t>() == want);

  // Equal shards of f32.
  const Tensor even = comm.all_gather(Tensor::from(rank_values<float>(10, 31, comm.rank()), {2, 5}));
  std::vector<float> want_even;
  for (int r = 0; r < n; ++r)
    for (float x : rank_values<float>(10, 31, r)) want_even.push_back(x);
  CHECK(even.shape() == qlora::Shape{2 * std::int64_t(n), 5});
  CHECK(even.to_vector<float>() == want_even);
}

TEST_CASE("dist: broadcast_bytes carries the root's string, zero bytes included") {
  auto& comm = world();
  const int root = comm.size() - 1;
  // Lengths differ between ranks; the result is the root's.
  const std::string mine = "rank " + std::to_string(comm.rank()) + std::string(std::size_t(comm.rank()) + 1, '\0') + "end";
  const std::string got = comm.broadcast_bytes(mine, root);
  const std::string want = "rank " + std::to_string(root) + std::string(std::size_t(root) + 1, '\0') + "end";
  CHECK(got == want);
  CHECK(comm.broadcast_bytes("", 0).empty());
}

TEST_CASE("dist: no rank leaves barrier before every rank has reached it") {
  auto& comm = world();
  // Rank 0 names a fresh folder; each rank writes its file, then passes the barrier; after it, every rank
  // must see every file. Without the barrier a fast rank would look before a slow one wrote.
  const std::string name = comm.broadcast_bytes(
      (std::filesystem::temp_directory_path() / ("qlora-dist-barrier-" + std::to_string(::getpid()))).string(), 0);
  const std::filesystem::path folder(name);
  std::filesystem::create_directories(folder);
  if (comm.rank() == comm.size() - 1) ::usleep(200 * 1000);  // the last rank is late on purpose
  std::ofstream(folder / ("rank" + std::to_string(comm.rank()))) << comm.rank();
  comm.barrier();
  for (int r = 0; r < comm.size(); ++r) CHECK(std::filesystem::exists(folder / ("rank" + std::to_string(r))));
  comm.barrier();  // everyone has looked: the folder may go
  if (comm.is_root()) std::filesystem::remove_all(folder);
}

TEST_CASE("dist: bad arguments throw qlora::Error on every rank alike") {
  auto& comm = world();
  Tensor ints = Tensor::from(std::vector<std::int32_t>{1, 2, 3}, {3});
  CHECK_THROWS_WITH_AS(comm.all_reduce_mean_(ints), doctest::Contains("only floating dtypes have a mean"), Error);
  Tensor raw = Tensor::zeros({4}, DType::bytes);
  CHECK_THROWS_WITH_AS(comm.all_reduce_sum_(raw), doctest::Contains("raw bytes have no sum"), Error);
  Tensor f = Tensor::from(std::vector<float>{1, 2}, {2});
  CHECK_THROWS_WITH_AS(comm.broadcast_(f, comm.size()), doctest::Contains("root rank"), Error);
  CHECK_THROWS_WITH_AS(comm.broadcast_bytes("x", -1), doctest::Contains("root rank -1"), Error);
  Tensor undefined;
  CHECK_THROWS_WITH_AS(comm.all_reduce_sum_(undefined), doctest::Contains("undefined"), Error);
  CHECK_THROWS_WITH_AS(comm.all_gather(Tensor::from(std::vector<float>{1}, {})), doctest::Contains("no leading dimension"),
                       Error);
}

TEST_CASE("dist: ranks that disagree on a tensor all throw instead of reducing garbage") {
  auto& comm = world();
  if (comm.size() == 1) {
    MESSAGE("world size 1: nothing to disagree with (run under mpirun -np 2)");
    return;
  }
  Tensor uneven = Tensor::from(rank_values<float>(std::size_t(5 + comm.rank()), 41, comm.rank()), {5 + comm.rank()});
  CHECK_THROWS_WITH_AS(comm.all_reduce_sum_(uneven), doctest::Contains("disagree"), Error);
  Tensor other_dtype = comm.rank() == 0 ? Tensor::zeros({4}, DType::f32) : Tensor::zeros({4}, DType::f64);
  CHECK_THROWS_WITH_AS(comm.broadcast_(other_dtype, 0), doctest::Contains("disagree"), Error);
  const Tensor other_columns = Tensor::zeros({2, 3 + comm.rank()});
  CHECK_THROWS_WITH_AS(comm.all_gather(other_columns), doctest::Contains("trailing shape"), Error);
  // The communicator is still usable afterwards.
  CHECK(comm.all_reduce_sum(1.0) == double(comm.size()));
}

TEST_CASE("dist: the single-process communicator is the identity with the same checks") {
  qlora::dist::SingleProcessCommunicator single;
  CHECK(single.rank() == 0);
  CHECK(single.size() == 1);
  const auto values = rank_values<float>(33, 51, 0);
  Tensor t = Tensor::from(values, {3, 11});
  single.all_reduce_sum_(t);
  single.all_reduce_mean_(t);
  single.broadcast_(t, 0);
  CHECK(t.to_vector<float>() == values);
  const Tensor gathered = single.all_gather(t);
  CHECK(gathered.shape() == t.shape());
  CHECK(gathered.data() != t.data());  // a copy, as with more ranks
  CHECK(gathered.to_vector<float>() == values);
  CHECK(single.all_reduce_sum(2.5) == 2.5);
  CHECK(single.broadcast_bytes("abc", 0) == "abc");
  Tensor ints = Tensor::from(std::vector<std::int32_t>{1}, {1});
  CHECK_THROWS_AS(single.all_reduce_mean_(ints), Error);
  CHECK_THROWS_WITH_AS(single.broadcast_(t, 1), doctest::Contains("not in [0, 1)"), Error);
}
