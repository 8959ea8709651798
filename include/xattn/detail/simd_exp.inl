// SPDX-License-Identifier: MIT
// exp(x) written once over a SIMD vocabulary; included inside each x86 level's `simd` namespace
// (detail/simd_sse2.hpp, simd_avx2.hpp, simd_avx512.hpp), after its primitives. No include guard:
// each level compiles its own copy, for its own instruction set.
//
// exp(x) = 2^m · exp(r), m = round(x / ln 2), r = x - m·ln 2 (|r| <= ln(2) / 2, ln 2 in two
// parts so that m·ln 2 is exact), exp(r) from a polynomial: float uses Cephes' degree-5 fit
// (about 2 ulp, as Eigen's), double the Taylor series to degree 13 (truncation below 5e-18).
// x is clamped first only to keep m small: exp(-104) and exp(-746) round to 0, exp(89) and
// exp(710) overflow, so the clamp changes no result. times_pow2 scales by 2^m without
// overflowing in between. Results below the smallest normal number are flushed to exactly 0
// (a masked key must keep no sliver of weight); NaN stays NaN.

template <class T>
XATTN_DETAIL_SIMD_INLINE packet<T> exp_flushed(const packet<T>& x) {
  using P = packet<T>;
  if constexpr (std::is_same_v<T, float>) {
    const P xc = clamp(x, broadcast(-104.0f), broadcast(89.0f));
    const P m = round_even(mul(xc, broadcast(1.44269504088896341f)));
    P r = fnma(m, broadcast(0.693359375f), xc);
    r = fnma(m, broadcast(-2.12194440e-4f), r);
    P y = broadcast(1.9875691500E-4f);
    y = fma(y, r, broadcast(1.3981999507E-3f));
    y = fma(y, r, broadcast(8.3334519073E-3f));
    y = fma(y, r, broadcast(4.1665795894E-2f));
    y = fma(y, r, broadcast(1.6666665459E-1f));
    y = fma(y, r, broadcast(5.0000001201E-1f));
    y = fma(y, mul(r, r), add(r, broadcast(1.0f)));
    return flush_tiny(times_pow2(y, m));
  } else {
    const P xc = clamp(x, broadcast(-746.0), broadcast(710.0));
    const P m = round_even(mul(xc, broadcast(1.4426950408889634074)));
    P r = fnma(m, broadcast(0.693145751953125), xc);
    r = fnma(m, broadcast(1.42860682030941723212e-6), r);
    // Σ r^n / n! for n <= 13, by Horner
    constexpr double inv_fact[] = {1.0,
                                   1.0,
                                   1.0 / 2,
                                   1.0 / 6,
                                   1.0 / 24,
                                   1.0 / 120,
                                   1.0 / 720,
                                   1.0 / 5040,
                                   1.0 / 40320,
                                   1.0 / 362880,
                                   1.0 / 3628800,
                                   1.0 / 39916800,
                                   1.0 / 479001600,
                                   1.0 / 6227020800.0};
    P y = broadcast(inv_fact[13]);
    for (int n = 12; n >= 0; --n) y = fma(y, r, broadcast(inv_fact[n]));
    return flush_tiny(times_pow2(y, m));
  }
}
