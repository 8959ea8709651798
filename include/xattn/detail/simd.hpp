// SPDX-License-Identifier: MIT
// The SIMD vocabulary of the tiled kernel: one "packet" is the widest vector of T that Eigen
// was built to use (16 floats with AVX-512, 8 with AVX, 4 with SSE or NEON, 1 without SIMD).
// Everything goes through Eigen's packet functions, so the same kernel code serves every
// instruction set Eigen supports.
#pragma once

#include "xattn/config.hpp"

#include <Eigen/Core>

#include <limits>

namespace xattn::detail::simd {

template <class T>
using packet = typename Eigen::internal::packet_traits<T>::type;

/// Lanes in one packet of T.
template <class T>
inline constexpr index_t lanes = Eigen::internal::unpacket_traits<packet<T>>::size;

/// Vector registers the target has (32 with AVX-512 or NEON on AArch64, 16 with AVX).
inline constexpr int registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS;

/// Register blocking of the micro-kernels: an accumulator block is `rows` broadcast operands
/// by `cols` packets. rows * cols accumulators + cols loads + 1 broadcast must fit in the
/// register file; 6 x 4 = 24 accumulators with 32 registers, 4 x 2 = 8 with 16.
inline constexpr int block_rows = registers >= 32 ? 6 : 4;
inline constexpr int block_cols = registers >= 32 ? 4 : 2;

template <class T>
EIGEN_STRONG_INLINE packet<T> load(const T* p) {
  return Eigen::internal::ploadu<packet<T>>(p);
}
template <class T>
EIGEN_STRONG_INLINE void store(T* p, const packet<T>& x) {
  Eigen::internal::pstoreu(p, x);
}
template <class T>
EIGEN_STRONG_INLINE packet<T> broadcast(T x) {
  return Eigen::internal::pset1<packet<T>>(x);
}
/// a * b + c
template <class P>
EIGEN_STRONG_INLINE P fma(const P& a, const P& b, const P& c) {
  return Eigen::internal::pmadd(a, b, c);
}
template <class P>
EIGEN_STRONG_INLINE P mul(const P& a, const P& b) {
  return Eigen::internal::pmul(a, b);
}
template <class P>
EIGEN_STRONG_INLINE P add(const P& a, const P& b) {
  return Eigen::internal::padd(a, b);
}
template <class P>
EIGEN_STRONG_INLINE P sub(const P& a, const P& b) {
  return Eigen::internal::psub(a, b);
}
/// exp(x) lane by lane, with results below the smallest normal number flushed to exactly 0.
/// Eigen's vectorised exp clamps its argument from below, so exp(-inf) would otherwise come out
/// as a tiny number instead of 0, and a masked key would keep a sliver of weight.
template <class T>
EIGEN_STRONG_INLINE packet<T> exp_flushed(const packet<T>& x) {
  using namespace Eigen::internal;
  const packet<T> e = pexp(x);
  const packet<T> tiny = pset1<packet<T>>(std::numeric_limits<T>::min());
  return pandnot(e, pcmp_lt(e, tiny));  // a NaN compares false and is kept
}

#if defined(EIGEN_VECTORIZE_AVX512) && !defined(XATTN_GENERIC_EXP)
// With AVX-512 the softmax's exp is a third of the kernel's instructions, so it gets a shorter
// form: exp(x) = 2^m · exp(r) with m = round(x / ln 2) and |r| <= ln(2) / 2, exp(r) from the
// same degree-5 polynomial as Eigen's (Cephes' coefficients), and 2^m applied by vscalefps,
// which also handles overflow and underflow: x is clamped to [-104, 89] only to keep m finite
// (exp(-104) < 2^-150 rounds to 0, exp(89) overflows to inf). Accurate to about 2 ulp, like
// Eigen's.
template <>
EIGEN_STRONG_INLINE packet<float> exp_flushed<float>(const packet<float>& x) {
  // max and min return their second operand when either is NaN, so a NaN x stays NaN
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
  const __m512 m = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(m, _mm512_set1_ps(0.693359375f), xc);  // ln 2 in two parts
  r = _mm512_fnmadd_ps(m, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 e = _mm512_scalef_ps(y, m);
  const __mmask16 tiny =
      _mm512_cmp_ps_mask(e, _mm512_set1_ps(std::numeric_limits<float>::min()), _CMP_LT_OQ);
  return _mm512_maskz_mov_ps(__mmask16(~tiny), e);
}
#endif

}  // namespace xattn::detail::simd
