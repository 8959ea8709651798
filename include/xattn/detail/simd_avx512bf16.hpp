// SPDX-License-Identifier: MIT
// The SIMD vocabulary of the avx512bf16 level: the avx512 level's (simd_avx512.hpp) and the bf16
// pairs of detail/bf16_products.inl, with AVX-512 BF16's own instructions (Zen 4, Cooper Lake,
// Sapphire Rapids). simd_avx2.hpp has the same pair vocabulary emulated, for testing the loops
// on CPUs without them.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"
#include "xattn/detail/simd_avx512.hpp"

#include <Eigen/Core>

#include <cstdint>
#include <cstring>

#if XATTN_DISPATCH
XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX512BF16)
namespace xattn::detail::cpu_avx512bf16::simd {

using namespace cpu_avx512::simd;  // everything but the pairs

#  define XATTN_DETAIL_SIMD_INLINE inline __attribute__((always_inline))

/// 16 lanes of two bf16 each: element 0 of a pair in the low 16 bits, element 1 in the high.
using pairs = __m512i;
XATTN_DETAIL_SIMD_INLINE pairs load_pairs(const Eigen::bfloat16* p) {
  return _mm512_loadu_si512(p);
}
XATTN_DETAIL_SIMD_INLINE void store_pairs(Eigen::bfloat16* p, pairs x) {
  _mm512_storeu_si512(p, x);
}
/// The pair (p[0], p[1]) in every lane.
XATTN_DETAIL_SIMD_INLINE pairs broadcast_pair(const Eigen::bfloat16* p) {
  std::uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return _mm512_set1_epi32(int(w));
}
/// acc + a₁·b₁ + a₀·b₀ lane by lane (vdpbf16ps).
XATTN_DETAIL_SIMD_INLINE __m512 dot2(__m512 acc, pairs a, pairs b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
/// The 16-bit element order that puts elements i and 16 + i of a vector side by side.
XATTN_DETAIL_SIMD_INLINE __m512i pair_order() {
  alignas(64) static constexpr std::uint16_t order[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_load_si512(order);
}
/// Lane i = (x_i, y_i), each rounded to bf16 (nearest even; vcvtne2ps2bf16 puts x in elements
/// 0-15 and y in 16-31, one vpermw interleaves them).
XATTN_DETAIL_SIMD_INLINE pairs round_pairs(__m512 x, __m512 y) {
  return _mm512_permutexvar_epi16(pair_order(), (__m512i)_mm512_cvtne2ps_pbh(y, x));
}
/// dst[2e] = a[e], dst[2e + 1] = b[e] for the first m - m mod 16 elements; returns that count.
XATTN_DETAIL_SIMD_INLINE index_t interleave(const Eigen::bfloat16* a, const Eigen::bfloat16* b,
                                            index_t m, Eigen::bfloat16* dst) {
  const __m512i order = pair_order();
  index_t e = 0;
  for (; e + 16 <= m; e += 16) {
    const __m512i ab = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + e))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + e)), 1);
    _mm512_storeu_si512(dst + 2 * e, _mm512_permutexvar_epi16(order, ab));
  }
  return e;
}

#  undef XATTN_DETAIL_SIMD_INLINE

}  // namespace xattn::detail::cpu_avx512bf16::simd
XATTN_DETAIL_TARGET_POP
#endif
