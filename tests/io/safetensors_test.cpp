#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "io/io_test_util.hpp"
#include "qlora/io/safetensors.hpp"
#include "support/random.hpp"

using qlora::DType;
using qlora::Shape;
using qlora::Tensor;
using qlora::io::SafetensorsCheckpoint;
using qlora::io::SafetensorsFile;
using qlora::test::TempDir;
using qlora::test::append_value;
using qlora::test::check_names;
using qlora::test::error_of;

namespace {

// A safetensors file assembled by hand from the format description (8-byte length, JSON, data), so the
// reader is tested against the format and not against our own writer.
std::string safetensors_bytes(const std::string& header_json, const std::string& data) {
  std::string s;
  append_value<std::uint64_t>(s, header_json.size());
  return s + header_json + data;
}

template <class T>
std::string raw(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

}  // namespace

TEST_CASE("safetensors: reads a hand-made file: dtypes, shapes, metadata, zero-copy views") {
  TempDir dir;
  const std::vector<float> a = {1.5f, -2.25f, 3.0f, 4.125f, -5.5f, 6.0f};
  const std::vector<qlora::bf16> b = {qlora::to_bf16(0.5f), qlora::to_bf16(-3.0f)};
  const std::vector<std::int32_t> c = {7, -8, 9};
  const std::string data = raw(a) + raw(b) + raw(c);
  const std::string header =
      R"({"__metadata__":{"format":"pt","note":"hand made"},)"
      R"("a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
      R"("b":{"dtype":"BF16","shape":[2],"data_offsets":[24,28]},)"
      R"("c":{"dtype":"I32","shape":[3],"data_offsets":[28,40]},)"
      R"("d":{"dtype":"I64","shape":[0],"data_offsets":[40,40]}})";
  // Padded with spaces to a multiple of 8 bytes, as the reference writer does, so the data is aligned.
  qlora::test::write_raw(dir / "m.safetensors",
                         safetensors_bytes(header + std::string((8 - header.size() % 8) % 8, ' '), data));

  const SafetensorsFile f(dir / "m.safetensors");
  CHECK(f.names() == std::vector<std::string>{"a", "b", "c", "d"});  // header order
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note") == "hand made");
  CHECK(f.entry("a").dtype_name == "F32");
  CHECK(f.entry("a").dims == std::vector<std::int64_t>{2, 3});

  const Tensor ta = f.load("a");
  CHECK(ta.shape() == Shape{2, 3});
  CHECK(ta.dtype() == DType::f32);
  CHECK(ta.to_vector<float>() == a);
  // Zero-copy: the view points into the mapped file's bytes (8 + header length + offset 0).
  CHECK(static_cast<const void*>(ta.data()) == static_cast<const void*>(f.bytes("a").data()));

  const Tensor tb = f.load("b", DType::f32);  // converted copy
  CHECK(tb.to_vector<float>() == std::vector<float>{0.5f, -3.0f});
  CHECK(f.load("b").dtype() == DType::bf16);
  CHECK(f.load("c").to_vector<std::int32_t>() == c);
  const Tensor a16 = f.load("a", DType::f16);
  CHECK(a16.dtype() == DType::f16);
  CHECK(a16.to(DType::f32).to_vector<float>() == a);  // all values are exact in f16

  check_names(error_of([&] { (void)f.load("d"); }), {"tensor d", "m.safetensors", "I64"});
  check_names(error_of([&] { (void)f.load("c", DType::f32); }), {"tensor c", "i32", "cannot be converted"});
  check_names(error_of([&] { (void)f.load("nope"); }), {"tensor nope", "m.safetensors"});
}

TEST_CASE("safetensors: a view outlives the file object that made it") {
  TempDir dir;
  const std::vector<float> a = {3.0f, 1.0f, 4.0f, 1.0f, 5.0f, 9.0f, 2.0f, 6.0f};
  qlora::test::write_raw(dir / "v.safetensors",
                         safetensors_bytes(R"({"w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})", raw(a)));
  Tensor view;
  {
    const SafetensorsFile f(dir / "v.safetensors");
    view = f.load("w");
  }
  CHECK(view.to_vector<float>() == a);  // the mapping is kept alive by the view
  view.data<float>()[0] = 100.0f;       // private copy-on-write page: allowed, the file is unchanged
  CHECK(SafetensorsFile(dir / "v.safetensors").load("w").to_vector<float>() == a);
}

TEST_CASE("safetensors: writer output is byte-exact: space-padded header, then data in order") {
  TempDir dir;
  const Tensor a = Tensor::from(std::vector<float>{1.0f, 2.0f, 3.0f, 4.0f}, Shape{2, 2});
  const Tensor b = Tensor::from(std::vector<qlora::f16>{qlora::to_f16(1.0f)}, Shape{1});
  qlora::io::write_safetensors(dir / "w.safetensors", {{"z.weight", a}, {"a.bias", b}}, {{"format", "pt"}});
  const std::string json =
      R"({"__metadata__":{"format":"pt"},"z.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("a.bias":{"dtype":"F16","shape":[1],"data_offsets":[16,18]}})";
  const std::string padded = json + std::string((8 - json.size() % 8) % 8, ' ');
  const std::string expected =
      safetensors_bytes(padded, raw(a.to_vector<float>()) + raw(std::vector<qlora::f16>{qlora::to_f16(1.0f)}));
  CHECK(qlora::test::read_raw(dir / "w.safetensors") == expected);
  CHECK((8 + padded.size()) % 8 == 0);
}

TEST_CASE("safetensors: write then read round-trips random tensors of every supported dtype") {
  TempDir dir;
  const auto values = qlora::test::random_vector<float>(7 * 33, 11, -3.0, 3.0);
  const Tensor f32 = Tensor::from(values, Shape{7, 33});
  const Tensor bf = f32.to(DType::bf16);
  const Tensor f64 = f32.to(DType::f64);
  const Tensor i8 = Tensor::from(std::vector<std::int8_t>{-128, -1, 0, 5, 127}, Shape{5});
  const Tensor u8 = Tensor::from(std::vector<std::uint8_t>{0, 200, 255}, Shape{1, 3});
  const Tensor i32 = Tensor::from(std::vector<std::int32_t>{-70000, 3, 1 << 30}, Shape{3, 1, 1, 1});
  qlora::io::write_safetensors(dir / "r.safetensors",
                               {{"f32", f32}, {"bf16", bf}, {"f64", f64}, {"i8", i8}, {"u8", u8}, {"i32", i32}});
  const SafetensorsFile f(dir / "r.safetensors");
  CHECK(f.load("f32").to_vector<float>() == values);
  CHECK(f.load("bf16").dtype() == DType::bf16);
  CHECK(f.load("bf16", DType::f32).to_vector<float>() == bf.to(DType::f32).to_vector<float>());
  CHECK(f.load("f64").to_vector<double>() == f64.to_vector<double>());
  CHECK(f.load("i8").to_vector<std::int8_t>() == i8.to_vector<std::int8_t>());
  CHECK(f.load("u8").shape() == Shape{1, 3});
  CHECK(f.load("u8").to_vector<std::uint8_t>() == u8.to_vector<std::uint8_t>());
  CHECK(f.load("i32").shape() == Shape{3, 1, 1, 1});
  CHECK(f.load("i32").to_vector<std::int32_t>() == i32.to_vector<std::int32_t>());
  check_names(error_of([&] { qlora::io::write_safetensors(dir / "dup.safetensors", {{"x", f32}, {"x", bf}}); }),
              {"dup.safetensors", "tensor x", "twice"});
  CHECK_FALSE(std::filesystem::exists(dir / "dup.safetensors"));
}

TEST_CASE("safetensors: a sharded checkpoint is read through model.safetensors.index.json") {
  TempDir dir;
  const Tensor a = Tensor::from(qlora::test::random_vector<float>(12, 1), Shape{3, 4});
  const Tensor b = Tensor::from(qlora::test::random_vector<float>(5, 2), Shape{5});
  const Tensor c = Tensor::from(qlora::test::random_vector<float>(6, 3), Shape{2, 3});
  qlora::io::write_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", a}, {"b", b}}, {{"format", "pt"}});
  qlora::io::write_safetensors(dir / "model-00002-of-00002.safetensors", {{"c", c}});
  qlora::test::write_raw(dir / "model.safetensors.index.json",
                         R"({"metadata":{"total_size":92},"weight_map":{"a":"model-00001-of-00002.safetensors",)"
                         R"("b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}})");
  const SafetensorsCheckpoint ck(dir.path());
  CHECK(ck.shards().size() == 2);
  CHECK(ck.names() == std::vector<std::string>{"a", "b", "c"});
  CHECK(ck.load("a").to_vector<float>() == a.to_vector<float>());
  CHECK(ck.load("c").to_vector<float>() == c.to_vector<float>());
  CHECK(ck.file_of("c").path().filename() == "model-00002-of-00002.safetensors");
  CHECK(ck.metadata().at("format") == "pt");
  check_names(error_of([&] { (void)ck.load("d"); }), {"tensor d"});

  // An index that places a tensor in the wrong shard is refused, naming index, tensor and shard.
  qlora::test::write_raw(dir / "model.safetensors.index.json",
                         R"({"weight_map":{"a":"model-00002-of-00002.safetensors"}})");
  check_names(error_of([&] { SafetensorsCheckpoint bad(dir.path()); }),
              {"model.safetensors.index.json", "tensor a", "model-00002-of-00002.safetensors"});
  qlora::test::write_raw(dir / "model.safetensors.index.json", R"({"weight_map":{"a":"missing.safetensors"}})");
  check_names(error_of([&] { SafetensorsCheckpoint bad(dir.path()); }), {"missing.safetensors", "cannot open"});
}

TEST_CASE("safetensors: bad input is refused with the file and the tensor named") {
  TempDir dir;
  const auto p = dir / "bad.safetensors";
  const std::string data(16, '\x01');
  const auto refuse = [&](const std::string& bytes, std::initializer_list<std::string> parts) {
    qlora::test::write_raw(p, bytes);
    check_names(error_of([&] { SafetensorsFile f(p); }), parts);
  };
  SUBCASE("header length past the end of the file") {
    std::string s;
    append_value<std::uint64_t>(s, 1000);
    refuse(s + "{}", {"bad.safetensors", "header length 1000", "past the end"});
  }
  SUBCASE("shorter than the length field") { refuse("abc", {"bad.safetensors", "too short"}); }
  SUBCASE("a tensor past the end of the data section (truncated file)") {
    refuse(safetensors_bytes(R"({"w":{"dtype":"F32","shape":[8],"data_offsets":[0,32]}})", data),
           {"bad.safetensors", "tensor w", "outside the data section"});
  }
  SUBCASE("offsets inconsistent with shape x dtype") {
    refuse(safetensors_bytes(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", data),
           {"bad.safetensors", "tensor w", "needs 12"});
  }
  SUBCASE("overlapping tensors") {
    refuse(safetensors_bytes(R"({"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                             data),
           {"bad.safetensors", "tensors v and w overlap"});
  }
  SUBCASE("unknown dtype") {
    refuse(safetensors_bytes(R"({"w":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", data),
           {"bad.safetensors", "tensor w", "unknown dtype 'F17'"});
  }
  SUBCASE("duplicate names") {
    refuse(safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                             R"("w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                             data),
           {"bad.safetensors", "tensor w appears twice"});
  }
  SUBCASE("header that is not JSON") {
    refuse(safetensors_bytes("{not json", data), {"bad.safetensors", "not valid JSON"});
  }
  SUBCASE("negative dimension") {
    refuse(safetensors_bytes(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data),
           {"bad.safetensors", "tensor w", "shape"});
  }
  SUBCASE("a missing file") {
    check_names(error_of([&] { SafetensorsFile f(dir / "absent.safetensors"); }), {"cannot open", "absent.safetensors"});
  }
}
