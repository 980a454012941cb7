#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "qlora/cpu/quant_pack.hpp"

using qlora::cpu::pack_codes;
using qlora::cpu::pack_codes_row;
using qlora::cpu::packed_row_bytes;
using qlora::cpu::unpack_code;
using qlora::cpu::unpack_codes;

namespace {

std::vector<std::uint8_t> random_codes(std::size_t n, int bits, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int> dist(0, (1 << bits) - 1);
  std::vector<std::uint8_t> codes(n);
  for (auto& c : codes) c = std::uint8_t(dist(gen));
  return codes;
}

}  // namespace

TEST_CASE("quant pack: rows are padded to 16 bytes") {
  CHECK(packed_row_bytes(172, 4) == 96);   // 86 bytes of codes
  CHECK(packed_row_bytes(172, 3) == 80);   // 64.5 -> 65 bytes
  CHECK(packed_row_bytes(172, 2) == 48);   // 43 bytes
  CHECK(packed_row_bytes(172, 8) == 176);  // 172 bytes
  CHECK(packed_row_bytes(4096, 4) == 2048);
  CHECK(packed_row_bytes(4096, 3) == 1536);
  CHECK(packed_row_bytes(13, 2) == 16);
  CHECK(packed_row_bytes(1, 8) == 16);
}

TEST_CASE("quant pack: round trip for 2, 3, 4 and 8 bits with odd row lengths") {
  for (int bits : {2, 3, 4, 8}) {
    for (std::int64_t cols : {1, 13, 172, 257}) {
      CAPTURE(bits);
      CAPTURE(cols);
      const std::int64_t rows = 5;
      const auto codes = random_codes(std::size_t(rows * cols), bits, std::uint64_t(bits * 1000 + cols));
      const std::int64_t stride = packed_row_bytes(cols, bits);
      std::vector<std::uint8_t> packed(std::size_t(rows * stride), 0xAB);
      pack_codes(codes.data(), rows, cols, bits, packed.data());
      std::vector<std::uint8_t> back(codes.size(), 0xFF);
      unpack_codes(packed.data(), rows, cols, bits, back.data());
      CHECK(back == codes);
      // The padding after the last code of each row is zero (all bits past cols * bits).
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t used_bits = cols * bits;
        for (std::int64_t bit = used_bits; bit < stride * 8; ++bit)
          REQUIRE(((packed[std::size_t(r * stride + bit / 8)] >> (bit % 8)) & 1) == 0);
      }
    }
  }
}

TEST_CASE("quant pack: byte layout is little-endian within bytes") {
  SUBCASE("4 bits: code 2j is the low nibble of byte j") {
    const std::vector<std::uint8_t> codes = {0x1, 0x2, 0xF, 0x0, 0x9};
    std::vector<std::uint8_t> row(std::size_t(packed_row_bytes(5, 4)));
    pack_codes_row(codes.data(), 5, 4, row.data());
    CHECK(row[0] == 0x21);
    CHECK(row[1] == 0x0F);
    CHECK(row[2] == 0x09);
  }
  SUBCASE("2 bits: code 4j + k at bits 2k of byte j") {
    const std::vector<std::uint8_t> codes = {1, 2, 3, 0, 2};
    std::vector<std::uint8_t> row(std::size_t(packed_row_bytes(5, 2)));
    pack_codes_row(codes.data(), 5, 2, row.data());
    CHECK(row[0] == (1 | 2 << 2 | 3 << 4 | 0 << 6));
    CHECK(row[1] == 2);
  }
  SUBCASE("3 bits: eight codes fill three bytes, code 2 straddles bytes 0 and 1") {
    const std::vector<std::uint8_t> codes = {1, 2, 3, 4, 5, 6, 7, 0, 5};
    std::vector<std::uint8_t> row(std::size_t(packed_row_bytes(9, 3)));
    pack_codes_row(codes.data(), 9, 3, row.data());
    std::uint32_t word = 0;  // the 24-bit little-endian word of bytes 0..2, written independently
    for (int i = 0; i < 8; ++i) word |= std::uint32_t(codes[std::size_t(i)]) << (3 * i);
    CHECK(row[0] == (word & 0xFF));
    CHECK(row[1] == ((word >> 8) & 0xFF));
    CHECK(row[2] == ((word >> 16) & 0xFF));
    CHECK(row[3] == 5);
    for (int i = 0; i < 9; ++i) CHECK(unpack_code(row.data(), i, 3) == codes[std::size_t(i)]);
  }
  SUBCASE("8 bits: one code per byte") {
    const std::vector<std::uint8_t> codes = {200, 0, 17};
    std::vector<std::uint8_t> row(std::size_t(packed_row_bytes(3, 8)));
    pack_codes_row(codes.data(), 3, 8, row.data());
    CHECK(row[0] == 200);
    CHECK(row[1] == 0);
    CHECK(row[2] == 17);
  }
}
