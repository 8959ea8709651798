// SPDX-License-Identifier: MIT
// The SIMD vocabulary of the tiled kernel's inner loops (detail/online_softmax.inl). Each
// instruction-set level provides it in its own namespace, `xattn::detail::cpu_<level>::simd`:
//
//   packet<T>, lanes<T>          the vector of T and its number of lanes
//   block_rows, block_cols       register blocking of the micro-kernels (rows x cols packets)
//   load, store, broadcast, zero<T>  (load also widens fp16 or bf16 elements to floats)
//   in_register(x)               x, kept in a register (not re-read from memory by each use)
//   add, sub, mul, max, fma(a, b, c) = a·b + c
//   scalar_mul, scalar_fma       the same for one element (the row path's last elements)
//   finite_shift(m)              m, with 0 where m = -inf (the online softmax's shift)
//   reduce_add, reduce_max       over the lanes of one packet
//   reduce_add4(a, out)          out[r] = reduce_add(a[r]) for four packets at once
//   exp_flushed<T>(x)            exp lane by lane, 0 below the smallest normal number
//   widen(x, n, y)               fp16 or bf16 x to float y for a prefix of n; returns its length
//   narrow(x, n, y)              float x rounded to fp16 or bf16 y, likewise
//   load_codes(c)                lanes<float> int8 codes of a quantized block as floats (exact)
//   load_nibble_codes(b, high)   lanes<float> codes of a q4 block from the low or high nibbles
//   scale_of(h)                  a block's fp16 scale as a float (exact)
//
// Every multiply-add of the loops is written as fma or scalar_fma, which are fused (one
// rounding) on every level with FMA and never fused on the others, and a product that feeds an
// add is written mul or scalar_mul: so the compiler has no a·b + c left to contract, and a
// level's results are the same bits whatever the optimisation level, -march or -ffp-contract
// of the translation unit (half.hpp's bit-for-bit promise rests on this).
//
// The x86-64 levels are written with intrinsics (detail/simd_sse2.hpp, simd_avx2.hpp,
// simd_avx512.hpp) and share one exp (detail/simd_exp.inl). This file has the level of a build
// without runtime dispatch (XATTN_DISPATCH = 0, detail/cpu.hpp): Eigen's packets for whatever
// the compiler targets, 16 floats with AVX-512, 8 with AVX, 4 with SSE or NEON, 1 without SIMD.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"
#include "xattn/half.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <limits>

#if !XATTN_DISPATCH
namespace xattn::detail::cpu_eigen::simd {

inline constexpr const char* name = "eigen";

template <class T>
using packet = typename Eigen::internal::packet_traits<T>::type;

template <class T>
inline constexpr index_t lanes = Eigen::internal::unpacket_traits<packet<T>>::size;

/// 6 x 4 accumulators with 32 vector registers (AVX-512, AArch64), 4 x 2 with 16.
inline constexpr int block_rows = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 6 : 4;
inline constexpr int block_cols = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32 ? 4 : 2;

template <class T, std::enable_if_t<!xattn::is_half_v<T>, int> = 0>
EIGEN_STRONG_INLINE packet<T> load(const T* p) {
  return Eigen::internal::ploadu<packet<T>>(p);
}
/// A packet of floats from lanes<float> fp16 or bf16 elements, converted one by one.
template <class S, std::enable_if_t<xattn::is_half_v<S>, int> = 0>
EIGEN_STRONG_INLINE packet<float> load(const S* p) {
  EIGEN_ALIGN_MAX float f[lanes<float>];
  for (index_t i = 0; i < lanes<float>; ++i) f[i] = static_cast<float>(p[i]);
  return Eigen::internal::pload<packet<float>>(f);
}
template <class T>
EIGEN_STRONG_INLINE void store(T* p, const packet<T>& x) {
  Eigen::internal::pstoreu(p, x);
}
template <class T>
EIGEN_STRONG_INLINE packet<T> broadcast(T x) {
  return Eigen::internal::pset1<packet<T>>(x);
}
template <class P>
EIGEN_STRONG_INLINE P in_register(const P& x) {
  return x;
}
template <class T>
EIGEN_STRONG_INLINE packet<T> zero() {
  return broadcast(T(0));
}
template <class P>
EIGEN_STRONG_INLINE P fma(const P& a, const P& b, const P& c) {
  return Eigen::internal::pmadd(a, b, c);
}
template <class P>
EIGEN_STRONG_INLINE P mul(const P& a, const P& b) {
  return Eigen::internal::pmul(a, b);
}
/// One element: a·b + c rounded once where the target has FMA, else a multiply and an add
/// kept apart (as the packets' pmadd does).
template <class T>
EIGEN_STRONG_INLINE T scalar_mul(T a, T b) {
  T p = a * b;
#  if defined(__GNUC__) && !defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));
#  endif
  return p;
}
template <class T>
EIGEN_STRONG_INLINE T scalar_fma(T a, T b, T c) {
#  if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#  else
  return scalar_mul(a, b) + c;
#  endif
}
template <class P>
EIGEN_STRONG_INLINE P add(const P& a, const P& b) {
  return Eigen::internal::padd(a, b);
}
template <class P>
EIGEN_STRONG_INLINE P sub(const P& a, const P& b) {
  return Eigen::internal::psub(a, b);
}
template <class P>
EIGEN_STRONG_INLINE P max(const P& a, const P& b) {
  return Eigen::internal::pmax(a, b);
}
template <class P>
EIGEN_STRONG_INLINE P finite_shift(const P& m) {
  using T = typename Eigen::internal::unpacket_traits<P>::type;
  using namespace Eigen::internal;
  return pselect(pcmp_eq(m, pset1<P>(-std::numeric_limits<T>::infinity())), pset1<P>(T(0)), m);
}
template <class P>
EIGEN_STRONG_INLINE auto reduce_add(const P& x) {
  return Eigen::internal::predux(x);
}
template <class P>
EIGEN_STRONG_INLINE auto reduce_max(const P& x) {
  return Eigen::internal::predux_max(x);
}
template <class P, class T>
EIGEN_STRONG_INLINE void reduce_add4(const P* a, T* out) {
  for (int r = 0; r < 4; ++r) out[r] = Eigen::internal::predux(a[r]);
}
/// Eigen's vectorised exp clamps its argument from below, so exp(-inf) would come out as a tiny
/// number instead of 0, and a masked key would keep a sliver of weight: results below the
/// smallest normal number are flushed to 0 (a NaN compares false and is kept). At the top of
/// float's range Eigen's exp (3.4) overflows early on some targets: with AVX-512 packets it
/// returns inf from x = 88.61, where exp(x) is still below FLT_MAX (up to 88.72), because its
/// power-of-two scaling does not reach 2^128. So this level's contract is the x86 levels' for
/// x <= 88.37 (= 127.5 ln 2) in float; the kernels take exp only of s - max <= 0.
template <class T>
EIGEN_STRONG_INLINE packet<T> exp_flushed(const packet<T>& x) {
  using namespace Eigen::internal;
  const packet<T> e = pexp(x);
  return pandnot(e, pcmp_lt(e, pset1<packet<T>>(std::numeric_limits<T>::min())));
}

/// A packet of floats from lanes<float> int8 codes of a quantized block (quantized.hpp),
/// converted one by one.
EIGEN_STRONG_INLINE packet<float> load_codes(const std::int8_t* p) {
  EIGEN_ALIGN_MAX float f[lanes<float>];
  for (index_t i = 0; i < lanes<float>; ++i) f[i] = static_cast<float>(p[i]);
  return Eigen::internal::pload<packet<float>>(f);
}
/// A packet of floats from lanes<float> nibble codes of a q4 block: the low (or, with high,
/// the high) nibbles of lanes<float> bytes, each minus 8.
EIGEN_STRONG_INLINE packet<float> load_nibble_codes(const std::uint8_t* p, bool high) {
  EIGEN_ALIGN_MAX float f[lanes<float>];
  for (index_t i = 0; i < lanes<float>; ++i)
    f[i] = static_cast<float>((high ? p[i] >> 4 : p[i] & 15) - 8);
  return Eigen::internal::pload<packet<float>>(f);
}
/// A block's fp16 scale as a float (Eigen's conversion).
EIGEN_STRONG_INLINE float scale_of(Eigen::half h) { return static_cast<float>(h); }

/// Widens a prefix of x to float in y and returns its length: none here, the caller converts
/// every element with Eigen's conversion (F16C's when the build targets it).
template <class S>
EIGEN_STRONG_INLINE index_t widen(const S*, index_t, float*) {
  return 0;
}

/// Rounds a prefix of x into y and returns its length: none here, as widen.
template <class S>
EIGEN_STRONG_INLINE index_t narrow(const float*, index_t, S*) {
  return 0;
}

}  // namespace xattn::detail::cpu_eigen::simd
#endif
