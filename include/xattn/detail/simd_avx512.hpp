// SPDX-License-Identifier: MIT
// The SIMD vocabulary of the avx512 level (512-bit vectors, 32 registers, FMA, mask registers,
// vscalef): Intel since Skylake-SP, AMD since Zen 4. detail/simd.hpp lists the vocabulary every
// level provides.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <limits>
#include <type_traits>

#if XATTN_DISPATCH
XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX512)
namespace xattn::detail::cpu_avx512::simd {

#  define XATTN_DETAIL_SIMD_INLINE inline __attribute__((always_inline))

inline constexpr const char* name = "avx512";

template <class T>
struct traits;
template <>
struct traits<float> {
  using packet = __m512;
  static constexpr index_t lanes = 16;
};
template <>
struct traits<double> {
  using packet = __m512d;
  static constexpr index_t lanes = 8;
};
template <class T>
using packet = typename traits<T>::packet;
template <class T>
inline constexpr index_t lanes = traits<T>::lanes;

inline constexpr int block_rows = 6;  // 6 x 4 accumulators of the 32 registers
inline constexpr int block_cols = 4;

XATTN_DETAIL_SIMD_INLINE __m512 load(const float* p) { return _mm512_loadu_ps(p); }
/// A packet of floats from 16 fp16 (vcvtph2ps) or bf16 (a 16-bit shift each) elements.
XATTN_DETAIL_SIMD_INLINE __m512 load(const Eigen::half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
XATTN_DETAIL_SIMD_INLINE __m512 load(const Eigen::bfloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
XATTN_DETAIL_SIMD_INLINE __m512d load(const double* p) { return _mm512_loadu_pd(p); }
XATTN_DETAIL_SIMD_INLINE void store(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
XATTN_DETAIL_SIMD_INLINE void store(double* p, __m512d x) { _mm512_storeu_pd(p, x); }
XATTN_DETAIL_SIMD_INLINE __m512 broadcast(float x) { return _mm512_set1_ps(x); }
XATTN_DETAIL_SIMD_INLINE __m512d broadcast(double x) { return _mm512_set1_pd(x); }
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

XATTN_DETAIL_SIMD_INLINE __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m512d add(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }
XATTN_DETAIL_SIMD_INLINE __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m512d sub(__m512d a, __m512d b) { return _mm512_sub_pd(a, b); }
XATTN_DETAIL_SIMD_INLINE __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m512d mul(__m512d a, __m512d b) { return _mm512_mul_pd(a, b); }
/// a·b + c, rounded once
XATTN_DETAIL_SIMD_INLINE __m512 fma(__m512 a, __m512 b, __m512 c) {
  return _mm512_fmadd_ps(a, b, c);
}
XATTN_DETAIL_SIMD_INLINE __m512d fma(__m512d a, __m512d b, __m512d c) {
  return _mm512_fmadd_pd(a, b, c);
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
XATTN_DETAIL_SIMD_INLINE __m512 fnma(__m512 a, __m512 b, __m512 c) {
  return _mm512_fnmadd_ps(a, b, c);
}
XATTN_DETAIL_SIMD_INLINE __m512d fnma(__m512d a, __m512d b, __m512d c) {
  return _mm512_fnmadd_pd(a, b, c);
}
XATTN_DETAIL_SIMD_INLINE __m512 max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
XATTN_DETAIL_SIMD_INLINE __m512d max(__m512d a, __m512d b) { return _mm512_max_pd(a, b); }
/// x limited to [lo, hi]; a NaN x stays NaN (max and min return their second operand then).
XATTN_DETAIL_SIMD_INLINE __m512 clamp(__m512 x, __m512 lo, __m512 hi) {
  return _mm512_min_ps(hi, _mm512_max_ps(lo, x));
}
XATTN_DETAIL_SIMD_INLINE __m512d clamp(__m512d x, __m512d lo, __m512d hi) {
  return _mm512_min_pd(hi, _mm512_max_pd(lo, x));
}
/// m where it is finite or +inf, 0 where it is -inf (the online softmax's shift).
XATTN_DETAIL_SIMD_INLINE __m512 finite_shift(__m512 m) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, neg_inf, _CMP_NEQ_UQ), m);
}
XATTN_DETAIL_SIMD_INLINE __m512d finite_shift(__m512d m) {
  const __m512d neg_inf = _mm512_set1_pd(-std::numeric_limits<double>::infinity());
  return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(m, neg_inf, _CMP_NEQ_UQ), m);
}
/// x with lanes below the smallest normal number set to 0 (a NaN compares false and is kept).
XATTN_DETAIL_SIMD_INLINE __m512 flush_tiny(__m512 x) {
  const __m512 tiny = _mm512_set1_ps(std::numeric_limits<float>::min());
  return _mm512_maskz_mov_ps(__mmask16(~_mm512_cmp_ps_mask(x, tiny, _CMP_LT_OQ)), x);
}
XATTN_DETAIL_SIMD_INLINE __m512d flush_tiny(__m512d x) {
  const __m512d tiny = _mm512_set1_pd(std::numeric_limits<double>::min());
  return _mm512_maskz_mov_pd(__mmask8(~_mm512_cmp_pd_mask(x, tiny, _CMP_LT_OQ)), x);
}
/// The reductions in a fixed order (the compiler's _mm512_reduce_* may choose its own): the high
/// 256 bits added to the low, then pairs of 128-bit halves, then of lanes, as the avx2 level.
XATTN_DETAIL_SIMD_INLINE float reduce_add(__m512 x) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
XATTN_DETAIL_SIMD_INLINE double reduce_add(__m512d x) {
  const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd(x, 1));
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
XATTN_DETAIL_SIMD_INLINE float reduce_max(__m512 x) {
  const __m256 h = _mm256_max_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}
XATTN_DETAIL_SIMD_INLINE double reduce_max(__m512d x) {
  const __m256d h = _mm256_max_pd(_mm512_castpd512_pd256(x), _mm512_extractf64x4_pd(x, 1));
  const __m128d s = _mm_max_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  return _mm_cvtsd_f64(_mm_max_sd(s, _mm_unpackhi_pd(s, s)));
}
/// out[r] = reduce_add(a[r]) for r < 4: each folded to 256 bits, then the four sums in one
/// transposing pass.
XATTN_DETAIL_SIMD_INLINE void reduce_add4(const __m512* a, float* out) {
  __m256 f[4];
  for (int r = 0; r < 4; ++r)
    f[r] = _mm256_add_ps(_mm512_castps512_ps256(a[r]), _mm512_extractf32x8_ps(a[r], 1));
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(f[0], f[1]), _mm256_hadd_ps(f[2], f[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}
XATTN_DETAIL_SIMD_INLINE void reduce_add4(const __m512d* a, double* out) {
  __m256d f[4];
  for (int r = 0; r < 4; ++r)
    f[r] = _mm256_add_pd(_mm512_castpd512_pd256(a[r]), _mm512_extractf64x4_pd(a[r], 1));
  const __m256d h0 = _mm256_hadd_pd(f[0], f[1]), h1 = _mm256_hadd_pd(f[2], f[3]);
  _mm256_storeu_pd(out, _mm256_add_pd(_mm256_permute2f128_pd(h0, h1, 0x20),
                                      _mm256_permute2f128_pd(h0, h1, 0x31)));
}
/// x rounded to the nearest integer, ties to even.
XATTN_DETAIL_SIMD_INLINE __m512 round_even(__m512 x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
XATTN_DETAIL_SIMD_INLINE __m512d round_even(__m512d x) {
  return _mm512_roundscale_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
/// y · 2^m in one instruction (vscalef), which also overflows to inf and underflows to 0.
XATTN_DETAIL_SIMD_INLINE __m512 times_pow2(__m512 y, __m512 m) { return _mm512_scalef_ps(y, m); }
XATTN_DETAIL_SIMD_INLINE __m512d times_pow2(__m512d y, __m512d m) { return _mm512_scalef_pd(y, m); }

/// Widens the first n - n mod 16 elements of x to float in y and returns that count (the
/// caller converts the rest): vcvtph2ps for fp16, a 16-bit shift for bf16.
XATTN_DETAIL_SIMD_INLINE index_t widen(const Eigen::half* x, index_t n, float* y) {
  index_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i,
                     _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
  return i;
}
XATTN_DETAIL_SIMD_INLINE index_t widen(const Eigen::bfloat16* x, index_t n, float* y) {
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  return i;
}

/// Rounds the first n - n mod 16 floats of x to nearest even in y and returns that count:
/// vcvtps2ph for fp16; for bf16 as the avx2 level does, NaN as the quiet NaN of its sign.
XATTN_DETAIL_SIMD_INLINE index_t narrow(const float* x, index_t n, Eigen::half* y) {
  index_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  return i;
}
XATTN_DETAIL_SIMD_INLINE index_t narrow(const float* x, index_t n, Eigen::bfloat16* y) {
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff);
  const __m512i sign = _mm512_set1_epi32(0x8000), quiet = _mm512_set1_epi32(0x7fc0);
  index_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 f = _mm512_loadu_ps(x + i);
    const __m512i b = _mm512_castps_si512(f);
    const __m512i high = _mm512_srli_epi32(b, 16);
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(b, _mm512_add_epi32(bias, _mm512_and_si512(high, one))), 16);
    const __m512i nan = _mm512_or_si512(_mm512_and_si512(high, sign), quiet);
    const __m512i r = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), nan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtepi32_epi16(r));
  }
  return i;
}

/// A packet of floats from 16 int8 codes of a quantized block (quantized.hpp), exactly:
/// vpmovsxbd, then vcvtdq2ps.
XATTN_DETAIL_SIMD_INLINE __m512 load_codes(const std::int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
/// A packet of floats from 16 nibble codes of a q4 block (quantized.hpp): the low (or, with
/// high, the high) nibbles of 16 bytes, each minus 8, exactly.
/// vpermps looks the code up in a table of the 16 floats -8 .. 7: it reads only the low four bits
/// of each index, so neither a mask nor a subtraction is needed, and the high nibbles need one
/// shift (what it moves into the upper four bits of each byte is not read).
XATTN_DETAIL_SIMD_INLINE __m512 load_nibble_codes(const std::uint8_t* p, bool high) {
  __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (high) x = _mm_srli_epi16(x, 4);
  const __m512 codes = _mm512_setr_ps(-8.0f, -7.0f, -6.0f, -5.0f, -4.0f, -3.0f, -2.0f, -1.0f,
                                      0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f);
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(x), codes);
}
/// A block's fp16 scale as a float: F16C's scalar vcvtph2ps.
XATTN_DETAIL_SIMD_INLINE float scale_of(Eigen::half h) {
  return _cvtsh_ss(Eigen::numext::bit_cast<std::uint16_t>(h));
}

#  include "xattn/detail/simd_exp.inl"

#  undef XATTN_DETAIL_SIMD_INLINE

}  // namespace xattn::detail::cpu_avx512::simd
XATTN_DETAIL_TARGET_POP
#endif
