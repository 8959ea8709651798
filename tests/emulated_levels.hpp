// SPDX-License-Identifier: MIT
// The avx512 and avx512bf16 levels emulated on AVX2, for testing their arithmetic on every
// machine: the same vocabulary (detail/simd.hpp) with 16-float packets held as two AVX2
// registers, every operation the one the AVX-512 instruction performs (the same lanes, the same
// order of additions in every reduction, vscalef's one rounding, vdpbf16ps's and
// vcvtne2ps2bf16's treatment of subnormal numbers), compiled for AVX2 and run through the same
// loops (detail/online_softmax.inl, detail/bf16_products.inl, detail/gemm.inl). The tests that include this file
// run every case on these levels too (each_path, tests/kernels.hpp), and on a CPU with
// AVX-512 a test holds them equal, bit for bit, to the native levels (test_dispatch.cpp), so the
// emulation cannot drift from the hardware. Test-only: nothing in include/ uses it.
#pragma once

#include "xattn/detail/gemm.hpp"
#include "xattn/detail/kernels.hpp"
#include "xattn/detail/simd.hpp"  // the packets, in builds whose loops are prebuilt too
#include "xattn/detail/simd_avx2.hpp"

#include "kernels.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if XATTN_DISPATCH
XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX2)
namespace xattn::detail::cpu_avx512_emulated {

namespace simd {

namespace v = cpu_avx2::simd;  // the 256-bit operations each half runs

#  define XATTN_DETAIL_SIMD_INLINE inline __attribute__((always_inline))

inline constexpr const char* name = "avx512-emulated";

/// 16 floats (8 doubles, 16 bf16 pairs) as two AVX2 registers: lanes 0-7 (0-3) in lo, the
/// rest in hi, as the low and high 256-bit halves of a zmm register.
struct f32x16 {
  __m256 lo, hi;
};
struct f64x8 {
  __m256d lo, hi;
};
struct i32x16 {
  __m256i lo, hi;
};
template <class T>
struct traits;
template <>
struct traits<float> {
  using packet = f32x16;
  static constexpr index_t lanes = 16;
};
template <>
struct traits<double> {
  using packet = f64x8;
  static constexpr index_t lanes = 8;
};
template <class T>
using packet = typename traits<T>::packet;
template <class T>
inline constexpr index_t lanes = traits<T>::lanes;

inline constexpr int block_rows = 6;  // the avx512 level's blocking
inline constexpr int block_cols = 4;

// Each operation on both halves, with the avx2 level's instruction.
#  define XATTN_TEST_EACH1(op)                                         \
    template <class P>                                                 \
    XATTN_DETAIL_SIMD_INLINE P op(const P& a) {                        \
      return {v::op(a.lo), v::op(a.hi)};                               \
    }
#  define XATTN_TEST_EACH2(op)                                         \
    template <class P>                                                 \
    XATTN_DETAIL_SIMD_INLINE P op(const P& a, const P& b) {            \
      return {v::op(a.lo, b.lo), v::op(a.hi, b.hi)};                   \
    }
#  define XATTN_TEST_EACH3(op)                                         \
    template <class P>                                                 \
    XATTN_DETAIL_SIMD_INLINE P op(const P& a, const P& b, const P& c) { \
      return {v::op(a.lo, b.lo, c.lo), v::op(a.hi, b.hi, c.hi)};       \
    }
XATTN_TEST_EACH2(add)
XATTN_TEST_EACH2(sub)
XATTN_TEST_EACH2(mul)
XATTN_TEST_EACH3(fma)
XATTN_TEST_EACH3(fnma)
XATTN_TEST_EACH2(max)  // vmaxps: the second operand where either is NaN, at every width
XATTN_TEST_EACH3(clamp)
XATTN_TEST_EACH1(finite_shift)
XATTN_TEST_EACH1(flush_tiny)
XATTN_TEST_EACH1(round_even)
/// vscalef by an integral m: y · 2^m rounded once. The avx2 level's two exact scalings give
/// the same value for every m the exp produces (|m| <= 150 in float, 1077 in double): the first
/// keeps y normal, only the second rounds (to a subnormal, or to inf past the largest float).
XATTN_TEST_EACH2(times_pow2)
#  undef XATTN_TEST_EACH1
#  undef XATTN_TEST_EACH2
#  undef XATTN_TEST_EACH3

XATTN_DETAIL_SIMD_INLINE packet<float> load(const float* p) { return {v::load(p), v::load(p + 8)}; }
XATTN_DETAIL_SIMD_INLINE packet<double> load(const double* p) {
  return {v::load(p), v::load(p + 4)};
}
/// fp16 (vcvtph2ps) and bf16 (exact: a bf16 is the high half of a float) widened, 8 at a time.
XATTN_DETAIL_SIMD_INLINE packet<float> load(const Eigen::half* p) {
  return {v::load(p), v::load(p + 8)};
}
XATTN_DETAIL_SIMD_INLINE packet<float> load(const Eigen::bfloat16* p) {
  return {v::load(p), v::load(p + 8)};
}
/// int8 codes of a quantized block, 8 at a time (exact).
XATTN_DETAIL_SIMD_INLINE packet<float> load_codes(const std::int8_t* p) {
  return {v::load_codes(p), v::load_codes(p + 8)};
}
XATTN_DETAIL_SIMD_INLINE packet<float> load_nibble_codes(const std::uint8_t* p, bool high) {
  return {v::load_nibble_codes(p, high), v::load_nibble_codes(p + 8, high)};
}
using v::scale_of;
XATTN_DETAIL_SIMD_INLINE void store(float* p, const packet<float>& x) {
  v::store(p, x.lo);
  v::store(p + 8, x.hi);
}
XATTN_DETAIL_SIMD_INLINE void store(double* p, const packet<double>& x) {
  v::store(p, x.lo);
  v::store(p + 4, x.hi);
}
XATTN_DETAIL_SIMD_INLINE packet<float> broadcast(float x) {
  return {v::broadcast(x), v::broadcast(x)};
}
XATTN_DETAIL_SIMD_INLINE packet<double> broadcast(double x) {
  return {v::broadcast(x), v::broadcast(x)};
}
template <class P>
XATTN_DETAIL_SIMD_INLINE P in_register(const P& x) {
  return x;
}
template <class T>
XATTN_DETAIL_SIMD_INLINE packet<T> zero() {
  return broadcast(T(0));
}

/// The avx512 level's reductions: the high 256 bits added to (or maxed with) the low, then the
/// 256-bit tree of the avx2 level (simd_avx512.hpp writes it the same way).
XATTN_DETAIL_SIMD_INLINE float reduce_add(const packet<float>& x) {
  return v::reduce_add(v::add(x.lo, x.hi));
}
XATTN_DETAIL_SIMD_INLINE double reduce_add(const packet<double>& x) {
  return v::reduce_add(v::add(x.lo, x.hi));
}
XATTN_DETAIL_SIMD_INLINE float reduce_max(const packet<float>& x) {
  return v::reduce_max(v::max(x.lo, x.hi));
}
XATTN_DETAIL_SIMD_INLINE double reduce_max(const packet<double>& x) {
  return v::reduce_max(v::max(x.lo, x.hi));
}
template <class T>
XATTN_DETAIL_SIMD_INLINE void reduce_add4(const packet<T>* a, T* out) {
  using R = decltype(a[0].lo);
  R f[4];
  for (int r = 0; r < 4; ++r) f[r] = v::add(a[r].lo, a[r].hi);
  v::reduce_add4(f, out);
}
using v::scalar_fma;
using v::scalar_mul;

/// Widens or rounds the first n - n mod 16 elements (as the avx512 level) and returns that
/// count; every conversion is exact or rounds to nearest even, whatever the width.
template <class S>
XATTN_DETAIL_SIMD_INLINE index_t widen(const S* x, index_t n, float* y) {
  return v::widen(x, n / 16 * 16, y);
}
template <class S>
XATTN_DETAIL_SIMD_INLINE index_t narrow(const float* x, index_t n, S* y) {
  return v::narrow(x, n / 16 * 16, y);
}

#  include "xattn/detail/simd_exp.inl"

// ---- bf16 pairs, as AVX-512 BF16 computes them ------------------------------------------------

/// 16 lanes of two bf16 each, in two AVX2 registers.
using pairs = i32x16;
XATTN_DETAIL_SIMD_INLINE pairs load_pairs(const Eigen::bfloat16* p) {
  return {v::load_pairs(p), v::load_pairs(p + 16)};
}
XATTN_DETAIL_SIMD_INLINE void store_pairs(Eigen::bfloat16* p, const pairs& x) {
  v::store_pairs(p, x.lo);
  v::store_pairs(p + 16, x.hi);
}
XATTN_DETAIL_SIMD_INLINE pairs broadcast_pair(const Eigen::bfloat16* p) {
  const __m256i w = v::broadcast_pair(p);
  return {w, w};
}
/// Subnormal lanes as zeros of their sign (denormals-are-zero, flush-to-zero).
XATTN_DETAIL_SIMD_INLINE __m256 flush_subnormal(__m256 x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 small = _mm256_cmp_ps(_mm256_andnot_ps(sign, x),
                                     _mm256_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ);
  return _mm256_blendv_ps(x, _mm256_and_ps(x, sign), small);
}
/// vdpbf16ps, lane by lane, as measured on AMD Zen 4 (the equality test of test_dispatch.cpp
/// holds it to each CPU that runs the instruction): subnormal inputs (bf16 and the float
/// accumulator) count as zeros, then acc + a₁·b₁ and then + a₀·b₀, each product exact and each
/// sum rounded to nearest even, a subnormal sum flushed to zero; Intel documents the same.
XATTN_DETAIL_SIMD_INLINE __m256 dot2_half(__m256 acc, __m256i a, __m256i b) {
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  const __m256 a1 = flush_subnormal(_mm256_castsi256_ps(_mm256_and_si256(a, high)));
  const __m256 b1 = flush_subnormal(_mm256_castsi256_ps(_mm256_and_si256(b, high)));
  const __m256 a0 = flush_subnormal(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)));
  const __m256 b0 = flush_subnormal(_mm256_castsi256_ps(_mm256_slli_epi32(b, 16)));
  const __m256 t = flush_subnormal(_mm256_fmadd_ps(a1, b1, flush_subnormal(acc)));
  return flush_subnormal(_mm256_fmadd_ps(a0, b0, t));
}
XATTN_DETAIL_SIMD_INLINE packet<float> dot2(const packet<float>& acc, const pairs& a,
                                            const pairs& b) {
  return {dot2_half(acc.lo, a.lo, b.lo), dot2_half(acc.hi, a.hi, b.hi)};
}
/// vcvtne2ps2bf16: nearest even, a subnormal float as a zero of its sign.
XATTN_DETAIL_SIMD_INLINE __m256i round_pairs_half(__m256 x, __m256 y) {
  return v::round_pairs(flush_subnormal(x), flush_subnormal(y));
}
XATTN_DETAIL_SIMD_INLINE pairs round_pairs(const packet<float>& x, const packet<float>& y) {
  return {round_pairs_half(x.lo, y.lo), round_pairs_half(x.hi, y.hi)};
}
XATTN_DETAIL_SIMD_INLINE index_t interleave(const Eigen::bfloat16* a, const Eigen::bfloat16* b,
                                            index_t m, Eigen::bfloat16* dst) {
  return v::interleave(a, b, m / 16 * 16, dst);
}

#  undef XATTN_DETAIL_SIMD_INLINE

}  // namespace simd

inline constexpr cpu_level level = cpu_level::avx512;
#  define XATTN_DETAIL_LOOP_INLINE inline __attribute__((always_inline))
#  include "xattn/detail/bf16_products.inl"
#  include "xattn/detail/online_softmax.inl"
#  include "xattn/detail/gemm.inl"
#  undef XATTN_DETAIL_LOOP_INLINE

}  // namespace xattn::detail::cpu_avx512_emulated
XATTN_DETAIL_TARGET_POP

namespace xattn_test {

/// Registers the two emulated levels with each_path (tests/kernels.hpp), once per program.
inline const bool emulated_levels_registered = [] {
  namespace e = xattn::detail::cpu_avx512_emulated;
  emulated_levels().push_back({"avx512-emulated", &e::kernels<float>, &e::kernels<double>, nullptr});
  emulated_levels().push_back(
      {"avx512bf16-emulated", &e::kernels<float>, &e::kernels<double>, &e::bf16_products});
  return true;
}();

}  // namespace xattn_test
#endif
