// SPDX-License-Identifier: MIT
// The SIMD vocabulary of the avx2 level (256-bit vectors, 16 registers, FMA): x86-64 CPUs since
// Haswell and Zen. detail/simd.hpp lists the vocabulary every level provides.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if XATTN_DISPATCH
XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX2)
namespace xattn::detail::cpu_avx2::simd {

#  define XATTN_DETAIL_SIMD_INLINE inline __attribute__((always_inline))

inline constexpr const char* name = "avx2";

template <class T>
struct traits;
template <>
struct traits<float> {
  using packet = __m256;
  static constexpr index_t lanes = 8;
};
template <>
struct traits<double> {
  using packet = __m256d;
  static constexpr index_t lanes = 4;
};
template <class T>
using packet = typename traits<T>::packet;
template <class T>
inline constexpr index_t lanes = traits<T>::lanes;

inline constexpr int block_rows = 6;  // 6 x 2 accumulators of the 16 registers
inline constexpr int block_cols = 2;

XATTN_DETAIL_SIMD_INLINE __m256 load(const float* p) { return _mm256_loadu_ps(p); }
/// A packet of floats from 8 fp16 (vcvtph2ps) or bf16 elements. A bf16 is the high half of a
/// float: the 16 bytes are loaded into both 128-bit lanes (a load, no arithmetic) and one byte
/// shuffle puts elements 0-3 (low lane) and 4-7 (high lane) above zeros, where a zero-extension
/// and a shift would take two operations.
XATTN_DETAIL_SIMD_INLINE __m256 load(const Eigen::half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
XATTN_DETAIL_SIMD_INLINE __m256 load(const Eigen::bfloat16* p) {
  const __m256i both =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i high =
      _mm256_setr_epi8(-1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7,  //
                       -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1, -1, 14, 15);
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(both, high));
}
XATTN_DETAIL_SIMD_INLINE __m256d load(const double* p) { return _mm256_loadu_pd(p); }
XATTN_DETAIL_SIMD_INLINE void store(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
XATTN_DETAIL_SIMD_INLINE void store(double* p, __m256d x) { _mm256_storeu_pd(p, x); }
XATTN_DETAIL_SIMD_INLINE __m256 broadcast(float x) { return _mm256_set1_ps(x); }
XATTN_DETAIL_SIMD_INLINE __m256d broadcast(double x) { return _mm256_set1_pd(x); }
/// x, held in a register: a packet that several FMAs read is loaded once, not folded into each
/// of them as a memory operand (which some -mtune settings do, making the micro-kernels
/// load-bound).
template <class P>
XATTN_DETAIL_SIMD_INLINE P in_register(P x) {
  __asm__("" : "+v"(x));
  return x;
}
template <class T>
XATTN_DETAIL_SIMD_INLINE packet<T> zero() {
  return broadcast(T(0));
}

XATTN_DETAIL_SIMD_INLINE __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m256d add(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
XATTN_DETAIL_SIMD_INLINE __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m256d sub(__m256d a, __m256d b) { return _mm256_sub_pd(a, b); }
XATTN_DETAIL_SIMD_INLINE __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m256d mul(__m256d a, __m256d b) { return _mm256_mul_pd(a, b); }
/// a·b + c, rounded once
XATTN_DETAIL_SIMD_INLINE __m256 fma(__m256 a, __m256 b, __m256 c) {
  return _mm256_fmadd_ps(a, b, c);
}
XATTN_DETAIL_SIMD_INLINE __m256d fma(__m256d a, __m256d b, __m256d c) {
  return _mm256_fmadd_pd(a, b, c);
}
/// One element: a·b, and a·b + c rounded once (vfmadd...ss).
template <class T>
XATTN_DETAIL_SIMD_INLINE T scalar_mul(T a, T b) {
  return a * b;
}
XATTN_DETAIL_SIMD_INLINE float scalar_fma(float a, float b, float c) {
  return __builtin_fmaf(a, b, c);
}
XATTN_DETAIL_SIMD_INLINE double scalar_fma(double a, double b, double c) {
  return __builtin_fma(a, b, c);
}
/// c - a·b, rounded once
XATTN_DETAIL_SIMD_INLINE __m256 fnma(__m256 a, __m256 b, __m256 c) {
  return _mm256_fnmadd_ps(a, b, c);
}
XATTN_DETAIL_SIMD_INLINE __m256d fnma(__m256d a, __m256d b, __m256d c) {
  return _mm256_fnmadd_pd(a, b, c);
}
XATTN_DETAIL_SIMD_INLINE __m256 max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m256d max(__m256d a, __m256d b) { return _mm256_max_pd(a, b); }
/// x limited to [lo, hi]; a NaN x stays NaN (max and min return their second operand then).
XATTN_DETAIL_SIMD_INLINE __m256 clamp(__m256 x, __m256 lo, __m256 hi) {
  return _mm256_min_ps(hi, _mm256_max_ps(lo, x));
}
XATTN_DETAIL_SIMD_INLINE __m256d clamp(__m256d x, __m256d lo, __m256d hi) {
  return _mm256_min_pd(hi, _mm256_max_pd(lo, x));
}
/// m where it is finite or +inf, 0 where it is -inf (the online softmax's shift).
XATTN_DETAIL_SIMD_INLINE __m256 finite_shift(__m256 m) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  return _mm256_andnot_ps(_mm256_cmp_ps(m, neg_inf, _CMP_EQ_OQ), m);
}
XATTN_DETAIL_SIMD_INLINE __m256d finite_shift(__m256d m) {
  const __m256d neg_inf = _mm256_set1_pd(-std::numeric_limits<double>::infinity());
  return _mm256_andnot_pd(_mm256_cmp_pd(m, neg_inf, _CMP_EQ_OQ), m);
}
/// x with lanes below the smallest normal number set to 0 (a NaN compares false and is kept).
XATTN_DETAIL_SIMD_INLINE __m256 flush_tiny(__m256 x) {
  const __m256 tiny = _mm256_set1_ps(std::numeric_limits<float>::min());
  return _mm256_andnot_ps(_mm256_cmp_ps(x, tiny, _CMP_LT_OQ), x);
}
XATTN_DETAIL_SIMD_INLINE __m256d flush_tiny(__m256d x) {
  const __m256d tiny = _mm256_set1_pd(std::numeric_limits<double>::min());
  return _mm256_andnot_pd(_mm256_cmp_pd(x, tiny, _CMP_LT_OQ), x);
}
XATTN_DETAIL_SIMD_INLINE float reduce_add(__m256 x) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
XATTN_DETAIL_SIMD_INLINE double reduce_add(__m256d x) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
XATTN_DETAIL_SIMD_INLINE float reduce_max(__m256 x) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}
XATTN_DETAIL_SIMD_INLINE double reduce_max(__m256d x) {
  const __m128d s = _mm_max_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
  return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
}
/// out[r] = reduce_add(a[r]) for r < 4, the four sums in one transposing pass.
XATTN_DETAIL_SIMD_INLINE void reduce_add4(const __m256* a, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
XATTN_DETAIL_SIMD_INLINE void reduce_add4(const __m256d* a, double* out) {
  const __m256d h0 = _mm256_hadd_pd(a[0], a[1]), h1 = _mm256_hadd_pd(a[2], a[3]);
  _mm256_storeu_pd(out, _mm256_add_pd(_mm256_permute2f128_pd(h0, h1, 0x20),
                                      _mm256_permute2f128_pd(h0, h1, 0x31)));
}
/// x rounded to the nearest integer, ties to even.
XATTN_DETAIL_SIMD_INLINE __m256 round_even(__m256 x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
XATTN_DETAIL_SIMD_INLINE __m256d round_even(__m256d x) {
  return _mm256_round_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/// y · 2^m for integral m in [-252, 254] (float) or [-2044, 2046] (double), as y · 2^a · 2^b
/// with a + b = m, each power a normal number built from its exponent bits.
XATTN_DETAIL_SIMD_INLINE __m256 times_pow2(__m256 y, __m256 m) {
  const __m256i mi = _mm256_cvtps_epi32(m);
  const __m256i a = _mm256_srai_epi32(mi, 1), b = _mm256_sub_epi32(mi, a);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 pa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(a, bias), 23));
  const __m256 pb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(b, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, pa), pb);
}
XATTN_DETAIL_SIMD_INLINE __m256d times_pow2(__m256d y, __m256d m) {
  // the bits of v + 1.5 · 2^52 end in v (two's complement) for integral |v| < 2^51
  const __m256d magic = _mm256_set1_pd(6755399441055744.0);
  const __m256d a = round_even(_mm256_mul_pd(m, _mm256_set1_pd(0.5))), b = _mm256_sub_pd(m, a);
  const __m256i bias = _mm256_set1_epi64x(1023);
  const __m256d pa = _mm256_castsi256_pd(
      _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(_mm256_add_pd(a, magic)), bias), 52));
  const __m256d pb = _mm256_castsi256_pd(
      _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(_mm256_add_pd(b, magic)), bias), 52));
  return _mm256_mul_pd(_mm256_mul_pd(y, pa), pb);
}

/// Widens the first n - n mod 8 elements of x to float in y and returns that count (the caller
/// converts the rest): F16C's vcvtph2ps for fp16, load's byte shuffle for bf16.
XATTN_DETAIL_SIMD_INLINE index_t widen(const Eigen::half* x, index_t n, float* y) {
  index_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  return i;
}
XATTN_DETAIL_SIMD_INLINE index_t widen(const Eigen::bfloat16* x, index_t n, float* y) {
  index_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, load(x + i));
  return i;
}

/// Rounds the first n - n mod 8 floats of x to nearest even in y and returns that count (the
/// caller rounds the rest): vcvtps2ph for fp16; for bf16 the rounding bias 0x7fff plus the
/// kept part's lowest bit, then the high halves, and NaN as the quiet NaN of its sign.
XATTN_DETAIL_SIMD_INLINE index_t narrow(const float* x, index_t n, Eigen::half* y) {
  index_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  return i;
}
/// f rounded to bf16, each lane's 16 bits in the low half of its 32 (the high half zero).
XATTN_DETAIL_SIMD_INLINE __m256i bf16_bits(__m256 f) {
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  const __m256i sign = _mm256_set1_epi32(0x8000), quiet = _mm256_set1_epi32(0x7fc0);
  const __m256i b = _mm256_castps_si256(f);
  const __m256i high = _mm256_srli_epi32(b, 16);
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(b, _mm256_add_epi32(bias, _mm256_and_si256(high, one))), 16);
  const __m256i nan = _mm256_or_si256(_mm256_and_si256(high, sign), quiet);
  return _mm256_castps_si256(_mm256_blendv_ps(
      _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(nan), _mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
}
XATTN_DETAIL_SIMD_INLINE index_t narrow(const float* x, index_t n, Eigen::bfloat16* y) {
  index_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i r = bf16_bits(_mm256_loadu_ps(x + i));
    // 8 x 32 -> 8 x 16 bits: pack within each 128-bit lane, then gather the two lanes' halves
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_castsi256_si128(packed));
  }
  return i;
}

// ---- bf16 pairs: the vocabulary of the bf16-product loops (detail/bf16_products.inl) -------
// Here emulated with two FMAs per product pair, for testing those loops on any AVX2 CPU; the
// avx512bf16 level (simd_avx512bf16.hpp) has the instruction itself.

/// 8 lanes of two bf16 each: element 0 of a pair in the low 16 bits, element 1 in the high.
using pairs = __m256i;
XATTN_DETAIL_SIMD_INLINE pairs load_pairs(const Eigen::bfloat16* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
XATTN_DETAIL_SIMD_INLINE void store_pairs(Eigen::bfloat16* p, pairs x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
}
/// The pair (p[0], p[1]) in every lane.
XATTN_DETAIL_SIMD_INLINE pairs broadcast_pair(const Eigen::bfloat16* p) {
  std::uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return _mm256_set1_epi32(int(w));
}
/// acc + a₁·b₁ + a₀·b₀ lane by lane, as vdpbf16ps: each product of two bf16 is exact in float,
/// each sum rounded, element 1 first.
XATTN_DETAIL_SIMD_INLINE __m256 dot2(__m256 acc, pairs a, pairs b) {
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(a, high)),
                        _mm256_castsi256_ps(_mm256_and_si256(b, high)), acc);
  return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                         _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), acc);
}
/// Lane i = (x_i, y_i), each rounded to bf16 (nearest even).
XATTN_DETAIL_SIMD_INLINE pairs round_pairs(__m256 x, __m256 y) {
  return _mm256_or_si256(bf16_bits(x), _mm256_slli_epi32(bf16_bits(y), 16));
}
/// dst[2e] = a[e], dst[2e + 1] = b[e] for the first m - m mod 8 elements; returns that count.
XATTN_DETAIL_SIMD_INLINE index_t interleave(const Eigen::bfloat16* a, const Eigen::bfloat16* b,
                                            index_t m, Eigen::bfloat16* dst) {
  index_t e = 0;
  for (; e + 8 <= m; e += 8) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + e));
    const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + e));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * e), _mm_unpacklo_epi16(x, y));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * e + 8), _mm_unpackhi_epi16(x, y));
  }
  return e;
}

/// A packet of floats from 8 int8 codes of a quantized block (quantized.hpp), exactly:
/// vpmovsxbd, then vcvtdq2ps.
XATTN_DETAIL_SIMD_INLINE __m256 load_codes(const std::int8_t* p) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
/// A packet of floats from 8 nibble codes of a q4 block (quantized.hpp): the low (or, with
/// high, the high) nibbles of 8 bytes, each minus 8, exactly.
XATTN_DETAIL_SIMD_INLINE __m256 load_nibble_codes(const std::uint8_t* p, bool high) {
  __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if (high) x = _mm_srli_epi16(x, 4);
  x = _mm_and_si128(x, _mm_set1_epi8(15));
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(x), _mm256_set1_epi32(8)));
}
/// A block's fp16 scale as a float: F16C's scalar vcvtph2ps.
XATTN_DETAIL_SIMD_INLINE float scale_of(Eigen::half h) {
  return _cvtsh_ss(Eigen::numext::bit_cast<std::uint16_t>(h));
}

#  include "xattn/detail/simd_exp.inl"

#  undef XATTN_DETAIL_SIMD_INLINE

}  // namespace xattn::detail::cpu_avx2::simd
XATTN_DETAIL_TARGET_POP
#endif
