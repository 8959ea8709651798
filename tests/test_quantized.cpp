// SPDX-License-Identifier: MIT
// quantized.hpp: the q8 and q4 block formats. Every code is checked to be the nearest one to
// x / s (ties to even) and every value's error to be within s / 2, in long double; the scale
// to be the smallest fp16 number >= (largest magnitude) / C up to fp16's rounding; the layouts
// byte for byte; partial last blocks, strided views, every input type, dequantize's
// exactness, and the argument errors with nothing written.

#include "xattn/quantized.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

namespace {

using xattn::index_t;
using xattn::make_view;
using xattn::q4_block;
using xattn::q8_block;
using xattn_test::throws_with;

template <class B>
int max_code() {
  return xattn::quant_max_code<B>;
}

TEST(Quantized, BlocksHaveGgmlsSizesAndRowsRoundUpToWholeBlocks) {
  EXPECT_EQ(sizeof(q8_block), 34u);
  EXPECT_EQ(sizeof(q4_block), 18u);
  EXPECT_EQ(xattn::quant_blocks_per_row(0), 0);
  EXPECT_EQ(xattn::quant_blocks_per_row(1), 1);
  EXPECT_EQ(xattn::quant_blocks_per_row(32), 1);
  EXPECT_EQ(xattn::quant_blocks_per_row(33), 2);
  EXPECT_EQ(xattn::quant_blocks_per_row(64), 2);
  EXPECT_EQ(xattn::quant_blocks_per_row(80), 3);
  // The Whisper-base cross-attention cache: 1500 frames of Dm 512, keys and values.
  const double f32 = 2.0 * 1500 * 512 * 4;
  EXPECT_LE(double(2 * xattn::quantized_bytes<q8_block>(1500, 512)) / f32, 0.27);
  EXPECT_LE(double(2 * xattn::quantized_bytes<q4_block>(1500, 512)) / f32, 0.15);
}

// Every block of the rows of x against the format's rules, in long double.
template <class B, class T>
void expect_block_rules(const std::vector<T>& x, index_t rows, index_t d, index_t ldx,
                        const std::vector<B>& blocks) {
  const index_t nb = xattn::quant_blocks_per_row(d);
  const long double c = max_code<B>();
  int reported = 0;
  for (index_t r = 0; r < rows; ++r)
    for (index_t b = 0; b < nb; ++b) {
      const B& blk = blocks[std::size_t(r * nb + b)];
      const index_t j0 = b * 32, n = std::min<index_t>(32, d - j0);
      long double a = 0;
      for (index_t j = 0; j < n; ++j)
        a = std::max(a, std::fabs((long double)x[std::size_t(r * ldx + j0 + j)]));
      const long double s = (long double)static_cast<float>(blk.scale);
      // The scale: covers a (s·C >= a) and is the smallest fp16 number that does, or the
      // nearest to a / C (which may be one below when a / C rounds down).
      if (a == 0) {
        EXPECT_EQ(s, 0.0L);
      } else {
        EXPECT_GE(s * c, a) << "row " << r << " block " << b;
        const std::uint16_t bits = Eigen::numext::bit_cast<std::uint16_t>(blk.scale);
        const Eigen::half below = Eigen::numext::bit_cast<Eigen::half>(std::uint16_t(bits - 1));
        EXPECT_LT((long double)static_cast<float>(below) * c, a) << "row " << r << " block " << b;
      }
      for (index_t j = 0; j < 32; ++j) {
        const int code = xattn::block_code(blk, j);
        if (j >= n || s == 0) {
          EXPECT_EQ(code, 0) << "row " << r << " block " << b << " value " << j;
          continue;
        }
        const long double v = (long double)x[std::size_t(r * ldx + j0 + j)];
        const long double err = std::fabs(v - code * s);
        EXPECT_LE(std::abs(code), max_code<B>());
        // Nearest: no other code is closer, and a tie goes to the even code.
        const long double up = std::fabs(v - (code + 1) * s), down = std::fabs(v - (code - 1) * s);
        const bool nearest = err <= up && err <= down && !(err == up && code % 2 != 0) &&
                             !(err == down && code % 2 != 0);
        if ((!nearest || !(err <= s / 2)) && reported++ < 5)
          ADD_FAILURE() << "row " << r << " value " << j0 + j << ": x " << (double)v << ", code "
                        << code << ", scale " << (double)s;
      }
    }
}

template <class B, class T>
void check_round_trip(index_t rows, index_t d, index_t pad, double magnitude, unsigned seed) {
  SCOPED_TRACE(::testing::Message()
               << xattn::quant_name<B>() << " " << xattn::element_name<T>() << " rows " << rows
               << " d " << d << " pad " << pad << " magnitude " << magnitude);
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, magnitude);
  const index_t ldx = d + pad;
  std::vector<T> x(std::size_t(rows * ldx));
  for (T& e : x) e = T(normal(gen));
  // An outlier channel now and then, as keys have.
  if (d > 3)
    for (index_t r = 0; r < rows; r += 3) x[std::size_t(r * ldx + 3)] = T(20 * magnitude);
  const index_t nb = xattn::quant_blocks_per_row(d);
  std::vector<B> blocks(std::size_t(rows * nb));
  xattn::quantize(make_view(x.data(), {rows, d}, {ldx, 1}), make_view(blocks.data(), {rows, nb}));
  expect_block_rules(x, rows, d, ldx, blocks);

  // dequantize: s·c exactly, in float and double, into a strided view; padding untouched.
  std::vector<float> y(std::size_t(rows * ldx), -7.0f);
  std::vector<double> yd(std::size_t(rows * d));
  xattn::dequantize(make_view(blocks.data(), {rows, nb}), make_view(y.data(), {rows, d}, {ldx, 1}));
  const std::vector<B>& cb = blocks;
  xattn::dequantize(make_view(cb.data(), {rows, nb}), make_view(yd.data(), {rows, d}));
  for (index_t r = 0; r < rows; ++r) {
    for (index_t j = 0; j < d; ++j) {
      const B& blk = blocks[std::size_t(r * nb + j / 32)];
      const double want = double(static_cast<float>(blk.scale)) * xattn::block_code(blk, j % 32);
      ASSERT_EQ(y[std::size_t(r * ldx + j)], float(want)) << "row " << r << " value " << j;
      ASSERT_EQ(float(want), want);  // exact in float
      ASSERT_EQ(yd[std::size_t(r * d + j)], want);
    }
    for (index_t j = d; j < ldx; ++j) ASSERT_EQ(y[std::size_t(r * ldx + j)], -7.0f);
  }
}

template <class B>
void check_every_input_type() {
  const index_t ds[] = {1, 5, 31, 32, 33, 64, 100, 128};
  unsigned seed = 1;
  for (index_t d : ds)
    for (index_t pad : {index_t(0), index_t(3)}) {
      check_round_trip<B, float>(7, d, pad, 1.0, seed++);
      check_round_trip<B, double>(4, d, pad, 0.05, seed++);
      check_round_trip<B, Eigen::half>(5, d, pad, 3.0, seed++);
      check_round_trip<B, Eigen::bfloat16>(5, d, pad, 300.0, seed++);
    }
  // Magnitudes at fp16's ends: tiny blocks (subnormal or smallest scales), large ones.
  check_round_trip<B, float>(6, 40, 0, 1e-9, seed++);
  check_round_trip<B, float>(6, 40, 0, 1e-5, seed++);
  check_round_trip<B, float>(6, 40, 0, 1e3, seed++);
}

TEST(Quantized, Q8CodesAreNearestAndWithinHalfAScale) { check_every_input_type<q8_block>(); }
TEST(Quantized, Q4CodesAreNearestAndWithinHalfAScale) { check_every_input_type<q4_block>(); }

TEST(Quantized, LayoutsAreGgmlsByteForByte) {
  // Values j - 16 for j in [0, 32): largest magnitude 16 at j = 0.
  float x[32];
  for (int j = 0; j < 32; ++j) x[j] = float(j - 16);
  q8_block b8[1];
  xattn::quantize(make_view(x, {1, 32}), make_view(b8, {1, 1}));
  EXPECT_EQ(static_cast<float>(b8[0].scale) * 127.0f >= 16.0f, true);
  unsigned char raw8[34];
  std::memcpy(raw8, b8, 34);
  const std::uint16_t scale_bits = Eigen::numext::bit_cast<std::uint16_t>(b8[0].scale);
  EXPECT_EQ(raw8[0] | (raw8[1] << 8), scale_bits);  // the fp16 scale first, little-endian
  for (int j = 0; j < 32; ++j) EXPECT_EQ(std::int8_t(raw8[2 + j]), b8[0].q[j]);
  EXPECT_EQ(b8[0].q[0], -127);

  // q4: scale 16 / 7 rounded to fp16; byte j = code(j) + 8 | (code(j + 16) + 8) << 4.
  q4_block b4[1];
  xattn::quantize(make_view(x, {1, 32}), make_view(b4, {1, 1}));
  const double s = static_cast<float>(b4[0].scale);
  EXPECT_GE(s * 7, 16.0);
  unsigned char raw4[18];
  std::memcpy(raw4, b4, 18);
  for (int j = 0; j < 16; ++j) {
    const int lo = int(std::nearbyint(x[j] / s)) + 8, hi = int(std::nearbyint(x[j + 16] / s)) + 8;
    EXPECT_EQ(raw4[2 + j], lo | (hi << 4)) << "byte " << j;
  }
  EXPECT_EQ(xattn::block_code(b4[0], 0), -7);

  // A ggml q4_0 block may use nibble 0 (code -8): dequantize reads it as -8 · s.
  q4_block g{};
  g.scale = Eigen::half(0.5f);
  g.nibbles[0] = 0x0F;  // value 0: nibble 15 (code 7), value 16: nibble 0 (code -8)
  float y[32];
  xattn::dequantize(make_view(&g, {1, 1}), make_view(y, {1, 32}));
  EXPECT_EQ(y[0], 3.5f);
  EXPECT_EQ(y[16], -4.0f);
  EXPECT_EQ(y[1], -4.0f);  // nibble 0 in a zeroed byte
}

TEST(Quantized, ExactlyRepresentableValuesComeBackExactly) {
  // Codes times a power-of-two scale: the scale is a / C exactly, every code is exact.
  std::vector<float> x(64);
  for (int j = 0; j < 64; ++j) x[std::size_t(j)] = float((j * 37) % 255 - 127) * 0.25f;
  x[0] = -127 * 0.25f;
  x[32] = 127 * 0.25f;
  std::vector<q8_block> b(2);
  xattn::quantize(make_view(x.data(), {1, 64}), make_view(b.data(), {1, 2}));
  std::vector<float> y(64);
  xattn::dequantize(make_view(b.data(), {1, 2}), make_view(y.data(), {1, 64}));
  EXPECT_EQ(y, x);
  // Zeros: scale 0, codes 0.
  std::vector<float> z(40, 0.0f), back(40, 1.0f);
  std::vector<q4_block> bz(2);
  xattn::quantize(make_view(z.data(), {1, 40}), make_view(bz.data(), {1, 2}));
  EXPECT_EQ(static_cast<float>(bz[0].scale), 0.0f);
  xattn::dequantize(make_view(bz.data(), {1, 2}), make_view(back.data(), {1, 40}));
  EXPECT_EQ(back, z);
}

// Scale 0.25 exactly (largest magnitude 127 · 0.25); x / s = 0.5, 1.5, 2.5, -0.5, -1.5, 126.5,
// and one value a last bit of T above a tie (not a tie: it rounds up), then one a last bit
// below the tie at 3.5 (rounds down). Double values take quantize's long-double arithmetic,
// float ones its double arithmetic.
template <class T>
void check_ties() {
  SCOPED_TRACE(xattn::element_name<T>());
  std::vector<T> x(32, T(0));
  x[0] = T(127 * 0.25);
  const double halves[] = {0.5, 1.5, 2.5, -0.5, -1.5, 126.5};
  const int want[] = {0, 2, 2, 0, -2, 126};
  for (int i = 0; i < 6; ++i) x[std::size_t(i + 1)] = T(halves[i] * 0.25);
  x[7] = std::nextafter(T(0.5 * 0.25), T(1));
  x[8] = std::nextafter(T(3.5 * 0.25), T(0));
  q8_block b[1];
  xattn::quantize(make_view(x.data(), {1, 32}), make_view(b, {1, 1}));
  ASSERT_EQ(static_cast<float>(b[0].scale), 0.25f);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(b[0].q[i + 1], want[i]) << "x / s = " << halves[i];
  EXPECT_EQ(b[0].q[7], 1);
  EXPECT_EQ(b[0].q[8], 3);
}

TEST(Quantized, TiesGoToTheEvenCode) {
  check_ties<double>();
  check_ties<float>();
}

TEST(Quantized, RanksAboveTwoQuantizeEveryRow) {
  // [B, H, L, D] keys with a strided head dimension layout (split heads of [B, L, H·D]).
  const index_t B = 2, H = 3, L = 5, D = 40, nb = xattn::quant_blocks_per_row(D);
  std::vector<float> x(std::size_t(B * L * H * D));
  std::mt19937 gen(9);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  for (float& e : x) e = u(gen);
  const auto xv = make_view(x.data(), {B, H, L, D}, {L * H * D, D, H * D, 1});
  std::vector<q8_block> blocks(std::size_t(B * H * L * nb));
  xattn::quantize(xv, make_view(blocks.data(), {B, H, L, nb}));
  std::vector<double> y(std::size_t(B * H * L * D));
  xattn::dequantize(make_view(blocks.data(), {B, H, L, nb}), make_view(y.data(), {B, H, L, D}));
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t l = 0; l < L; ++l) {
        const q8_block* row = &blocks[std::size_t(((b * H + h) * L + l) * nb)];
        for (index_t e = 0; e < D; ++e) {
          const double s = static_cast<float>(row[e / 32].scale);
          EXPECT_LE(std::fabs(y[std::size_t(((b * H + h) * L + l) * D + e)] - xv(b, h, l, e)),
                    s / 2);
        }
      }
}

TEST(Quantized, BadArgumentsAreNamedErrorsAndWriteNothing) {
  std::vector<float> x(2 * 40, 1.0f);
  std::vector<q8_block> out(4);
  std::memset(static_cast<void*>(out.data()), 0x5A, out.size() * sizeof(q8_block));
  const std::vector<q8_block> before = out;
  auto unchanged = [&] {
    return std::memcmp(out.data(), before.data(), out.size() * sizeof(q8_block)) == 0;
  };
  const auto xv = make_view(x.data(), {2, 40});
  const auto ov = make_view(out.data(), {2, 2});

  x[45] = std::numeric_limits<float>::quiet_NaN();  // row 1, value 5
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { xattn::quantize(xv, ov); },
                                              {"quantize", "non-finite", "row 1", "at 5"}));
  EXPECT_TRUE(unchanged());
  x[45] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { xattn::quantize(xv, ov); }, {"non-finite"}));
  EXPECT_TRUE(unchanged());
  x[45] = 1.0f;

  x[39] = 1e7f;  // row 0's second block: 1e7 / 127 > 65504
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { xattn::quantize(xv, ov); },
                                              {"quantize", "row 0", "values 32..39", "fp16"}));
  EXPECT_TRUE(unchanged());
  x[39] = 1.0f;

  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        xattn::quantize(xv, make_view(out.data(), {2, 1}));
      },
      {"quantize", "out.extent(1) is 1, expected 2", "rows of 40 values"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        xattn::quantize(xv, make_view(out.data(), {1, 2}));
      },
      {"out.extent(0) is 1, expected 2"}));
  EXPECT_TRUE(unchanged());

  // Overlap: blocks written over the values they are made from.
  std::vector<float> big(200, 0.5f);
  auto* as_blocks = reinterpret_cast<q8_block*>(big.data());
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        xattn::quantize(make_view(big.data(), {1, 40}), make_view(as_blocks, {1, 2}));
      },
      {"overlaps"}));

  std::vector<float> y(80, 3.0f);
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        xattn::dequantize(make_view(out.data(), {2, 2}), make_view(y.data(), {2, 65}));
      },
      {"dequantize", "blocks.extent(1) is 2, expected 3"}));
  EXPECT_EQ(y, std::vector<float>(80, 3.0f));
}

}  // namespace
