// SPDX-License-Identifier: MIT
// The SIMD vocabulary of the sse2 level (128-bit vectors, 16 registers, no FMA: a·b + c is a
// multiply and an add): the baseline every x86-64 CPU runs. detail/simd.hpp lists the
// vocabulary every level provides.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if XATTN_DISPATCH
XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_SSE2)
namespace xattn::detail::cpu_sse2::simd {

#  define XATTN_DETAIL_SIMD_INLINE inline __attribute__((always_inline))

inline constexpr const char* name = "sse2";

template <class T>
struct traits;
template <>
struct traits<float> {
  using packet = __m128;
  static constexpr index_t lanes = 4;
};
template <>
struct traits<double> {
  using packet = __m128d;
  static constexpr index_t lanes = 2;
};
template <class T>
using packet = typename traits<T>::packet;
template <class T>
inline constexpr index_t lanes = traits<T>::lanes;

inline constexpr int block_rows = 4;  // 4 x 2 accumulators of the 16 registers
inline constexpr int block_cols = 2;

XATTN_DETAIL_SIMD_INLINE __m128 load(const float* p) { return _mm_loadu_ps(p); }
/// A packet of floats from 4 fp16 (converted one by one: SSE2 has no fp16 conversion) or bf16
/// (zeros interleaved below each: a bf16 is the high half of a float) elements.
XATTN_DETAIL_SIMD_INLINE __m128 load(const Eigen::half* p) {
  return _mm_setr_ps(static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
                     static_cast<float>(p[3]));
}
XATTN_DETAIL_SIMD_INLINE __m128 load(const Eigen::bfloat16* p) {
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
}
XATTN_DETAIL_SIMD_INLINE __m128d load(const double* p) { return _mm_loadu_pd(p); }
XATTN_DETAIL_SIMD_INLINE void store(float* p, __m128 x) { _mm_storeu_ps(p, x); }
XATTN_DETAIL_SIMD_INLINE void store(double* p, __m128d x) { _mm_storeu_pd(p, x); }
XATTN_DETAIL_SIMD_INLINE __m128 broadcast(float x) { return _mm_set1_ps(x); }
XATTN_DETAIL_SIMD_INLINE __m128d broadcast(double x) { return _mm_set1_pd(x); }
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

XATTN_DETAIL_SIMD_INLINE __m128 add(__m128 a, __m128 b) { return _mm_add_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m128d add(__m128d a, __m128d b) { return _mm_add_pd(a, b); }
XATTN_DETAIL_SIMD_INLINE __m128 sub(__m128 a, __m128 b) { return _mm_sub_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m128d sub(__m128d a, __m128d b) { return _mm_sub_pd(a, b); }
/// a·b, kept apart from the add that may follow: GCC would otherwise fuse a product and an
/// add into one FMA wherever the translation unit's own target has FMA (-march=native, or a
/// consumer's -mfma), in some instantiations and not others, and this level's results would
/// depend on the build (detail/simd.hpp: no level's arithmetic may).
XATTN_DETAIL_SIMD_INLINE __m128 mul(__m128 a, __m128 b) { return in_register(_mm_mul_ps(a, b)); }
XATTN_DETAIL_SIMD_INLINE __m128d mul(__m128d a, __m128d b) {
  return in_register(_mm_mul_pd(a, b));
}
/// One element: a·b, kept apart from any add (as mul), and a·b + c as a multiply and an add.
template <class T>
XATTN_DETAIL_SIMD_INLINE T scalar_mul(T a, T b) {
  T p = a * b;
  __asm__("" : "+x"(p));
  return p;
}
template <class T>
XATTN_DETAIL_SIMD_INLINE T scalar_fma(T a, T b, T c) {
  return scalar_mul(a, b) + c;
}
/// a·b + c, a multiply and an add
XATTN_DETAIL_SIMD_INLINE __m128 fma(__m128 a, __m128 b, __m128 c) { return add(mul(a, b), c); }
XATTN_DETAIL_SIMD_INLINE __m128d fma(__m128d a, __m128d b, __m128d c) { return add(mul(a, b), c); }
/// c - a·b
XATTN_DETAIL_SIMD_INLINE __m128 fnma(__m128 a, __m128 b, __m128 c) { return sub(c, mul(a, b)); }
XATTN_DETAIL_SIMD_INLINE __m128d fnma(__m128d a, __m128d b, __m128d c) { return sub(c, mul(a, b)); }
XATTN_DETAIL_SIMD_INLINE __m128 max(__m128 a, __m128 b) { return _mm_max_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m128d max(__m128d a, __m128d b) { return _mm_max_pd(a, b); }
/// x limited to [lo, hi]; a NaN x stays NaN (max and min return their second operand then).
XATTN_DETAIL_SIMD_INLINE __m128 clamp(__m128 x, __m128 lo, __m128 hi) {
  return _mm_min_ps(hi, _mm_max_ps(lo, x));
}
XATTN_DETAIL_SIMD_INLINE __m128d clamp(__m128d x, __m128d lo, __m128d hi) {
  return _mm_min_pd(hi, _mm_max_pd(lo, x));
}
/// m where it is finite or +inf, 0 where it is -inf (the online softmax's shift).
XATTN_DETAIL_SIMD_INLINE __m128 finite_shift(__m128 m) {
  return _mm_andnot_ps(_mm_cmpeq_ps(m, _mm_set1_ps(-std::numeric_limits<float>::infinity())), m);
}
XATTN_DETAIL_SIMD_INLINE __m128d finite_shift(__m128d m) {
  return _mm_andnot_pd(_mm_cmpeq_pd(m, _mm_set1_pd(-std::numeric_limits<double>::infinity())), m);
}
/// x with lanes below the smallest normal number set to 0 (a NaN compares false and is kept).
XATTN_DETAIL_SIMD_INLINE __m128 flush_tiny(__m128 x) {
  return _mm_andnot_ps(_mm_cmplt_ps(x, _mm_set1_ps(std::numeric_limits<float>::min())), x);
}
XATTN_DETAIL_SIMD_INLINE __m128d flush_tiny(__m128d x) {
  return _mm_andnot_pd(_mm_cmplt_pd(x, _mm_set1_pd(std::numeric_limits<double>::min())), x);
}
XATTN_DETAIL_SIMD_INLINE float reduce_add(__m128 x) {
  const __m128 s = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
XATTN_DETAIL_SIMD_INLINE double reduce_add(__m128d x) {
  return _mm_cvtsd_f64(_mm_add_sd(x, _mm_unpackhi_pd(x, x)));
}
XATTN_DETAIL_SIMD_INLINE float reduce_max(__m128 x) {
  const __m128 s = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}
XATTN_DETAIL_SIMD_INLINE double reduce_max(__m128d x) {
  return _mm_cvtsd_f64(_mm_max_sd(x, _mm_unpackhi_pd(x, x)));
}
/// out[r] = reduce_add(a[r]) for r < 4, the four sums in one transposing pass.
XATTN_DETAIL_SIMD_INLINE void reduce_add4(const __m128* a, float* out) {
  const __m128 t0 = _mm_add_ps(_mm_unpacklo_ps(a[0], a[1]), _mm_unpackhi_ps(a[0], a[1]));
  const __m128 t1 = _mm_add_ps(_mm_unpacklo_ps(a[2], a[3]), _mm_unpackhi_ps(a[2], a[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm_movelh_ps(t0, t1), _mm_movehl_ps(t1, t0)));
}
XATTN_DETAIL_SIMD_INLINE void reduce_add4(const __m128d* a, double* out) {
  _mm_storeu_pd(out, _mm_add_pd(_mm_unpacklo_pd(a[0], a[1]), _mm_unpackhi_pd(a[0], a[1])));
  _mm_storeu_pd(out + 2, _mm_add_pd(_mm_unpacklo_pd(a[2], a[3]), _mm_unpackhi_pd(a[2], a[3])));
}
/// x rounded to the nearest integer, ties to even (|x| < 2^22 for float, 2^51 for double):
/// adding and subtracting 1.5 · 2^23 (2^52) leaves no fraction bits.
XATTN_DETAIL_SIMD_INLINE __m128 round_even(__m128 x) {
  const __m128 magic = _mm_set1_ps(12582912.0f);
  return _mm_sub_ps(_mm_add_ps(x, magic), magic);
}
XATTN_DETAIL_SIMD_INLINE __m128d round_even(__m128d x) {
  const __m128d magic = _mm_set1_pd(6755399441055744.0);
  return _mm_sub_pd(_mm_add_pd(x, magic), magic);
}
/// y · 2^m for integral m in [-252, 254] (float) or [-2044, 2046] (double), as y · 2^a · 2^b
/// with a + b = m, each power a normal number built from its exponent bits.
XATTN_DETAIL_SIMD_INLINE __m128 times_pow2(__m128 y, __m128 m) {
  const __m128i mi = _mm_cvtps_epi32(m);
  const __m128i a = _mm_srai_epi32(mi, 1), b = _mm_sub_epi32(mi, a);
  const __m128i bias = _mm_set1_epi32(127);
  const __m128 pa = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(a, bias), 23));
  const __m128 pb = _mm_castsi128_ps(_mm_slli_epi32(_mm_add_epi32(b, bias), 23));
  return _mm_mul_ps(_mm_mul_ps(y, pa), pb);
}
XATTN_DETAIL_SIMD_INLINE __m128d times_pow2(__m128d y, __m128d m) {
  // the bits of v + 1.5 · 2^52 end in v (two's complement) for integral |v| < 2^51
  const __m128d magic = _mm_set1_pd(6755399441055744.0);
  const __m128d a = round_even(_mm_mul_pd(m, _mm_set1_pd(0.5))), b = _mm_sub_pd(m, a);
  const __m128i bias = _mm_set1_epi64x(1023);
  const __m128d pa = _mm_castsi128_pd(
      _mm_slli_epi64(_mm_add_epi64(_mm_castpd_si128(_mm_add_pd(a, magic)), bias), 52));
  const __m128d pb = _mm_castsi128_pd(
      _mm_slli_epi64(_mm_add_epi64(_mm_castpd_si128(_mm_add_pd(b, magic)), bias), 52));
  return _mm_mul_pd(_mm_mul_pd(y, pa), pb);
}

/// Widens the first n - n mod 4 elements of x to float in y and returns that count (the caller
/// converts the rest): bf16 by interleaving zeros below each element (a bf16 is the high half
/// of a float); fp16 has no SSE2 conversion, so none here.
XATTN_DETAIL_SIMD_INLINE index_t widen(const Eigen::half*, index_t, float*) { return 0; }
XATTN_DETAIL_SIMD_INLINE index_t widen(const Eigen::bfloat16* x, index_t n, float* y) {
  index_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + i));
    _mm_storeu_ps(y + i, _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h)));
  }
  return i;
}

/// Rounds the first n - n mod 4 floats of x to nearest even in y and returns that count: bf16
/// as the avx2 level does (the 16-bit results sign-extended so that a signed pack keeps them);
/// fp16 has no SSE2 conversion, so none here.
XATTN_DETAIL_SIMD_INLINE index_t narrow(const float*, index_t, Eigen::half*) { return 0; }
XATTN_DETAIL_SIMD_INLINE index_t narrow(const float* x, index_t n, Eigen::bfloat16* y) {
  const __m128i one = _mm_set1_epi32(1), bias = _mm_set1_epi32(0x7fff);
  const __m128i sign = _mm_set1_epi32(0x8000), quiet = _mm_set1_epi32(0x7fc0);
  index_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m128 f = _mm_loadu_ps(x + i);
    const __m128i b = _mm_castps_si128(f);
    const __m128i high = _mm_srli_epi32(b, 16);
    const __m128i rounded =
        _mm_srli_epi32(_mm_add_epi32(b, _mm_add_epi32(bias, _mm_and_si128(high, one))), 16);
    const __m128i nan = _mm_or_si128(_mm_and_si128(high, sign), quiet);
    const __m128i is_nan = _mm_castps_si128(_mm_cmpunord_ps(f, f));
    const __m128i r = _mm_or_si128(_mm_and_si128(is_nan, nan), _mm_andnot_si128(is_nan, rounded));
    const __m128i r16 = _mm_srai_epi32(_mm_slli_epi32(r, 16), 16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(y + i), _mm_packs_epi32(r16, r16));
  }
  return i;
}

/// A packet of floats from 4 int8 codes of a quantized block (quantized.hpp), exactly: each
/// byte unpacked to the top of its 32-bit lane and shifted back down with its sign (SSE2 has
/// no pmovsxbd).
XATTN_DETAIL_SIMD_INLINE __m128 load_codes(const std::int8_t* p) {
  std::int32_t w;
  std::memcpy(&w, p, 4);
  __m128i x = _mm_cvtsi32_si128(w);
  x = _mm_unpacklo_epi8(x, x);
  x = _mm_unpacklo_epi16(x, x);
  return _mm_cvtepi32_ps(_mm_srai_epi32(x, 24));
}
/// A packet of floats from 4 nibble codes of a q4 block (quantized.hpp): the low (or, with
/// high, the high) nibbles of 4 bytes, each minus 8, exactly.
XATTN_DETAIL_SIMD_INLINE __m128 load_nibble_codes(const std::uint8_t* p, bool high) {
  std::int32_t w;
  std::memcpy(&w, p, 4);
  __m128i x = _mm_cvtsi32_si128(w);
  if (high) x = _mm_srli_epi16(x, 4);
  x = _mm_and_si128(x, _mm_set1_epi8(15));
  x = _mm_unpacklo_epi16(_mm_unpacklo_epi8(x, _mm_setzero_si128()), _mm_setzero_si128());
  return _mm_cvtepi32_ps(_mm_sub_epi32(x, _mm_set1_epi32(8)));
}
/// A block's fp16 scale as a float (Eigen's conversion: SSE2 has no fp16 instruction).
XATTN_DETAIL_SIMD_INLINE float scale_of(Eigen::half h) { return static_cast<float>(h); }

#  include "xattn/detail/simd_exp.inl"

#  undef XATTN_DETAIL_SIMD_INLINE

}  // namespace xattn::detail::cpu_sse2::simd
XATTN_DETAIL_TARGET_POP
#endif
