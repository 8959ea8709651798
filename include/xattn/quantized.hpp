// SPDX-License-Identifier: MIT
// Block-quantized storage for keys and values. A decoder step reads the whole cache of keys and
// values once per token, so its time is the cache's bytes over the memory's speed; storing them
// in 8 or 4 bits instead of 32 divides those bytes by about 3.8 or 7.1.
//
// A row of d values (one key or value, along the head dimension) is stored as ceil(d / 32)
// blocks of 32 values, each with its own scale s, an fp16 number:
//
//   q8_block (34 bytes):  x ≈ s · c,        c an int8 code in [-127, 127]
//   q4_block (18 bytes):  x ≈ s · (n - 8),  n a nibble in [1, 15] (codes c = n - 8 in [-7, 7])
//
// The layouts are those of ggml's q8_0 and q4_0 blocks: the scale first, then the codes; a
// q4_block's byte j holds value j in its low nibble and value j + 16 in its high nibble.
// dequantize reads ggml's blocks as they are (a q4_0 nibble 0, code -8, included).
//
// quantize, for each block with largest magnitude a (C = 127 for q8, 7 for q4):
//   - the scale s is a / C rounded to the nearest fp16, raised to the next fp16 if s · C < a,
//     so every value's code is in range; a block of zeros gets s = 0, and a block too small for
//     an fp16 scale gets the smallest one (2^-24);
//   - each code is x / s rounded to the nearest integer, ties to even (exactly, whatever x's
//     type);
//   - so |x - s·c| <= s / 2 for every value, with s <= (a / C)(1 + 2^-10) where s is a normal
//     fp16 number: a relative error of at most 1/254 (q8) or 1/14 (q4) of the block's largest
//     magnitude.
// A row whose d is not a multiple of 32 ends in a partial block: its codes past d are 0, and
// dequantize never writes them. NaN and infinite values are rejected (value_error), as are
// blocks whose scale would overflow fp16 (a > 65504 · C); nothing is written then.
// dequantize is exact: s · c is a float (an 11-bit scale times a code of at most 8 bits).
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/overlap.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace xattn {

/// Values per quantized block.
inline constexpr index_t quant_block_values = 32;

/// 32 values in 8 bits each: x ≈ scale · q[i] (the layout of ggml's q8_0).
struct q8_block {
  Eigen::half scale;  ///< s, an fp16 number >= 0
  std::int8_t q[32];  ///< the codes c of the 32 values, in [-127, 127]
};

/// 32 values in 4 bits each: x ≈ scale · (nibble - 8); byte j holds value j in its low nibble
/// and value j + 16 in its high nibble (the layout of ggml's q4_0).
struct q4_block {
  Eigen::half scale;         ///< s, an fp16 number >= 0
  std::uint8_t nibbles[16];  ///< code + 8 of values j (low nibble) and j + 16 (high nibble)
};

static_assert(sizeof(q8_block) == 34 && sizeof(q4_block) == 18,
              "xattn's quantized blocks must have ggml's sizes: 34 and 18 bytes");

/// True for the quantized block types: q8_block and q4_block.
template <class B>
inline constexpr bool is_quant_block_v =
    std::is_same_v<std::remove_cv_t<B>, q8_block> || std::is_same_v<std::remove_cv_t<B>, q4_block>;

/// The largest code of a block type: 127 (q8_block) or 7 (q4_block).
template <class B>
inline constexpr int quant_max_code = std::is_same_v<std::remove_cv_t<B>, q8_block> ? 127 : 7;

/// "q8" or "q4": for messages and benchmark labels.
template <class B>
constexpr const char* quant_name() noexcept {
  return std::is_same_v<std::remove_cv_t<B>, q8_block> ? "q8" : "q4";
}

/// The blocks a row of d values takes: ceil(d / 32).
constexpr index_t quant_blocks_per_row(index_t d) noexcept {
  return (d + quant_block_values - 1) / quant_block_values;
}

/// The bytes of `rows` rows of d values in blocks of type B.
template <class B>
constexpr std::size_t quantized_bytes(index_t rows, index_t d) noexcept {
  return std::size_t(rows) * std::size_t(quant_blocks_per_row(d)) * sizeof(B);
}

/// The code of value i of a block (q4: nibble - 8).
inline int block_code(const q8_block& b, index_t i) noexcept { return b.q[i]; }
inline int block_code(const q4_block& b, index_t i) noexcept {
  const unsigned byte = b.nibbles[i % 16];
  return int(i < 16 ? byte & 0xFu : byte >> 4) - 8;
}

namespace detail {

/// The scale of a block whose largest magnitude is a (finite, >= 0, a / C within fp16's range).
template <class B>
Eigen::half quant_scale(double a) noexcept {
  constexpr double c = quant_max_code<B>;
  if (a == 0) return Eigen::half(0.0f);
  Eigen::half s(static_cast<float>(a / c));
  if (static_cast<double>(static_cast<float>(s)) * c < a)
    s = Eigen::numext::bit_cast<Eigen::half>(
        std::uint16_t(Eigen::numext::bit_cast<std::uint16_t>(s) + 1));
  return s;
}

/// x / s rounded to the nearest integer, ties to even, exactly, for |x| <= 128 s: the rounded
/// quotient k (in double by adding and subtracting 1.5 · 2^52) is corrected by the remainder
/// r = x - k·s, which A holds exactly: k·s has at most 19 bits, and r spans at most 9 bits above
/// s and x's own significand below it (24 bits for a float x, 53 for a double), so double
/// suffices for float and half values and long double (64 bits) for doubles.
template <class A>
A rounded_quotient(A y) noexcept {
  if constexpr (std::is_same_v<A, double>) {
    volatile A big = 0x1.8p52;  // volatile: the two additions are not folded away
    return (y + big) - big;
  } else {
    return std::nearbyint(y);
  }
}

template <class A>
int nearest_code(A x, A s) noexcept {
  A k = rounded_quotient(x / s);
  const A r = x - k * s;
  if (2 * std::fabs(r) > s || (2 * std::fabs(r) == s && std::fmod(k, A(2)) != 0))
    k += r > 0 ? 1 : -1;
  return int(k);
}

inline void set_code(q8_block& b, index_t i, int c) noexcept { b.q[i] = std::int8_t(c); }
inline void set_code(q4_block& b, index_t i, int c) noexcept {
  const unsigned n = unsigned(c + 8);
  std::uint8_t& byte = b.nibbles[i % 16];
  byte = i < 16 ? std::uint8_t((byte & 0xF0u) | n) : std::uint8_t((byte & 0x0Fu) | (n << 4));
}

/// The largest magnitude of values [j0, j0 + n) of a row.
template <class V>
double block_magnitude(const tensor_view<const V, 1>& row, index_t j0, index_t n) {
  double a = 0;
  for (index_t j = j0; j < j0 + n; ++j) a = std::max(a, std::fabs(static_cast<double>(row(j))));
  return a;
}

/// Calls f(row view of x, row view of y) for each row of two views of equal leading extents.
template <class X, class Y, std::size_t Rank, class F>
void for_each_row(const tensor_view<X, Rank>& x, const tensor_view<Y, Rank>& y, F&& f) {
  if constexpr (Rank == 1) {
    f(x, y);
  } else {
    for (index_t i = 0; i < x.extent(0); ++i) for_each_row(x.select(0, i), y.select(0, i), f);
  }
}

/// Checks that x's and y's leading extents agree and y's last is blocks_per_row(x's last), or
/// (dequantize) the other way round.
template <class X, class Y, std::size_t Rank>
void require_block_shape(const char* fn, const char* values_name,
                         const tensor_view<X, Rank>& values, const char* blocks_name,
                         const tensor_view<Y, Rank>& blocks) {
  for (std::size_t r = 0; r + 1 < Rank; ++r)
    if (values.extent(r) != blocks.extent(r))
      fail_shape(message(fn, ": ", blocks_name, ".extent(", r, ") is ", blocks.extent(r),
                         ", expected ", values.extent(r), " (", values_name, ".extent(", r, "))"));
  const index_t d = values.extent(Rank - 1);
  if (blocks.extent(Rank - 1) != quant_blocks_per_row(d))
    fail_shape(message(fn, ": ", blocks_name, ".extent(", Rank - 1, ") is ",
                       blocks.extent(Rank - 1), ", expected ", quant_blocks_per_row(d),
                       " blocks of 32 for rows of ", d, " values"));
}

}  // namespace detail

/// out = the rows of x (the last dimension: d values per row) in blocks of type B, d rounded up
/// to whole blocks: out has x's leading extents and quant_blocks_per_row(d) blocks per row. x
/// may be float, double, fp16 or bf16, with any strides. The rounding and its bound are in this
/// file's top comment. Throws value_error for a NaN or infinite value, or a block too large for
/// an fp16 scale, and shape_error for extents that do not fit or out overlapping x; nothing is
/// written then.
template <class T, class B, std::size_t Rank>
void quantize(const tensor_view<T, Rank>& x_in, const tensor_view<B, Rank>& out) {
  using V = std::remove_const_t<T>;
  static_assert(is_quant_block_v<B> && !std::is_const_v<B>,
                "quantize writes q8_block or q4_block views");
  static_assert(std::is_floating_point_v<V> || is_half_v<V>,
                "quantize reads float, double, fp16 or bf16 values");
  // The arithmetic that finds each code exactly (detail::nearest_code).
  using A = std::conditional_t<std::is_same_v<V, double>, long double, double>;
  constexpr const char* fn = "quantize";
  const tensor_view<const V, Rank> x = x_in;
  detail::require_block_shape(fn, "x", x, "out", out);
  detail::require_disjoint(fn, "out", out, "x", x);
  detail::require_no_self_overlap(fn, "out", out);
  constexpr double c = quant_max_code<B>;
  const index_t d = x.extent(Rank - 1);
  // First pass: every value finite and every block's scale within fp16's range.
  index_t row = 0;
  detail::for_each_row(x, out, [&](const tensor_view<const V, 1>& xr, const tensor_view<B, 1>&) {
    for (index_t j = 0; j < d; ++j) {
      const double v = static_cast<double>(xr(j));
      if (!std::isfinite(v))
        detail::fail_value(detail::message(fn, ": x has a non-finite value (", v, ") in row ", row,
                                           " at ", j, " (NaN and infinity have no code)"));
    }
    for (index_t j0 = 0; j0 < d; j0 += quant_block_values) {
      const index_t n = std::min(quant_block_values, d - j0);
      const double a = detail::block_magnitude(xr, j0, n);
      if (a / c > 65504.0)
        detail::fail_value(detail::message(fn, ": x's block at row ", row, ", values ", j0, "..",
                                           j0 + n - 1, " has largest magnitude ", a, ", above ",
                                           65504.0 * c, " (its ", quant_name<B>(),
                                           " scale would overflow fp16)"));
    }
    ++row;
  });
  // Second pass: write the blocks.
  detail::for_each_row(x, out, [&](const tensor_view<const V, 1>& xr, const tensor_view<B, 1>& br) {
    for (index_t b = 0; b < br.extent(0); ++b) {
      const index_t j0 = b * quant_block_values;
      const index_t n = std::min(quant_block_values, d - j0);
      B blk{};
      blk.scale = detail::quant_scale<B>(detail::block_magnitude(xr, j0, n));
      const A s = static_cast<A>(static_cast<float>(blk.scale));
      for (index_t j = 0; j < quant_block_values; ++j) {
        // |x / s| <= C by the scale's choice, so the code is in range.
        const int code = j < n && s > 0 ? detail::nearest_code(static_cast<A>(xr(j0 + j)), s) : 0;
        detail::set_code(blk, j, code);
      }
      br(b) = blk;
    }
  });
}

/// out = the values of the blocks, exactly (s · c is a float): out's last extent d says how
/// many values each row holds (blocks has quant_blocks_per_row(d) per row), and the codes past
/// d in a row's last block are not read. out is float or double, with any strides. Reads
/// ggml's q8_0 and q4_0 blocks as they are.
template <class B, class T, std::size_t Rank>
void dequantize(const tensor_view<B, Rank>& blocks_in, const tensor_view<T, Rank>& out) {
  using Q = std::remove_const_t<B>;
  static_assert(is_quant_block_v<Q>, "dequantize reads q8_block or q4_block views");
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "dequantize writes float or double values (exact: s·c is a float)");
  constexpr const char* fn = "dequantize";
  const tensor_view<const Q, Rank> blocks = blocks_in;
  detail::require_block_shape(fn, "out", out, "blocks", blocks);
  detail::require_disjoint(fn, "out", out, "blocks", blocks);
  detail::require_no_self_overlap(fn, "out", out);
  const index_t d = out.extent(Rank - 1);
  detail::for_each_row(
      blocks, out, [&](const tensor_view<const Q, 1>& br, const tensor_view<T, 1>& yr) {
        for (index_t j = 0; j < d; ++j) {
          const Q& blk = br(j / quant_block_values);
          yr(j) = static_cast<T>(static_cast<float>(blk.scale) *
                                 static_cast<float>(block_code(blk, j % quant_block_values)));
        }
      });
}

}  // namespace xattn
