// SPDX-License-Identifier: MIT
// The lanes path's two products for bf16 queries, keys and values in bf16 arithmetic, as GPU
// FlashAttention computes them: Q·Kᵀ and P·V as sums of products of bf16 pairs accumulated in
// float (vdpbf16ps: two products and two additions per float lane), with the probabilities P
// rounded to bf16 for the second product. The online softmax between them, the masks and the
// statistics stay the float loops' (online_softmax.inl), and so does the layout: lanes over
// queries, with the summed dimension taken two at a time:
//   QP [⌈Dk/2⌉][W][2]  query i's features 2d and 2d + 1 side by side (packed once per unit)
//   K  rows of at least 2⌈Dk/2⌉ bf16, read in place: (K[r][2d], K[r][2d + 1]) is one 32-bit
//      broadcast
//   VP [⌈n/2⌉][Dv][2]  the values of keys 2j and 2j + 1 side by side (packed once per tile)
//   PP [⌈n/2⌉][W][2]  the probabilities of keys 2j and 2j + 1, rounded (once per tile)
// An odd Dk or n is padded with a zero pair element. detail/kernels.hpp includes this file in
// the avx512bf16 level's namespace, and in the avx2 level's, where simd_avx2.hpp emulates the
// pair vocabulary (for testing these loops on CPUs without AVX-512 BF16); no include guard.

/// Sᵀ[r][c] = scale · Σ_d dot2(K[r][2d, 2d + 1], QP[d][c]) for R keys and C packets of queries.
template <int R, int C>
XATTN_DETAIL_LOOP_INLINE void pair_score_block(const Eigen::bfloat16* k, index_t ldk,
                                               const Eigen::bfloat16* qp, index_t ldq,
                                               index_t dpairs, float scale, float* s, index_t lds) {
  using P = simd::packet<float>;
  constexpr index_t L = simd::lanes<float>;
  P acc[R][C];
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r)
    XATTN_DETAIL_UNROLL
    for (int c = 0; c < C; ++c) acc[r][c] = simd::zero<float>();
  for (index_t d = 0; d < dpairs; ++d) {
    simd::pairs q[C];
    XATTN_DETAIL_UNROLL
    for (int c = 0; c < C; ++c) q[c] = simd::load_pairs(qp + d * ldq + c * 2 * L);
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) {
      const simd::pairs kb = simd::broadcast_pair(k + r * ldk + 2 * d);
      XATTN_DETAIL_UNROLL
      for (int c = 0; c < C; ++c) acc[r][c] = simd::dot2(acc[r][c], kb, q[c]);
    }
  }
  const P sc = simd::broadcast(scale);
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r)
    XATTN_DETAIL_UNROLL
    for (int c = 0; c < C; ++c) simd::store(s + r * lds + c * L, simd::mul(acc[r][c], sc));
}

/// Oᵀ[r][c] = corr[c] · Oᵀ[r][c] + Σ_j dot2(VP[j][r], PP[j][c]) for R value features and C
/// packets of queries.
template <int R, int C>
XATTN_DETAIL_LOOP_INLINE void pair_value_block(const Eigen::bfloat16* vp, index_t ldv,
                                               const Eigen::bfloat16* pp, index_t ldp,
                                               index_t kpairs, const float* corr, float* ot,
                                               index_t ldo) {
  using P = simd::packet<float>;
  constexpr index_t L = simd::lanes<float>;
  P acc[R][C];
  XATTN_DETAIL_UNROLL
  for (int c = 0; c < C; ++c) {
    const P cf = simd::load(corr + c * L);
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) acc[r][c] = simd::mul(simd::load(ot + r * ldo + c * L), cf);
  }
  for (index_t j = 0; j < kpairs; ++j) {
    simd::pairs p[C];
    XATTN_DETAIL_UNROLL
    for (int c = 0; c < C; ++c) p[c] = simd::load_pairs(pp + j * ldp + c * 2 * L);
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) {
      const simd::pairs vb = simd::broadcast_pair(vp + j * ldv + 2 * r);
      XATTN_DETAIL_UNROLL
      for (int c = 0; c < C; ++c) acc[r][c] = simd::dot2(acc[r][c], vb, p[c]);
    }
  }
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r)
    XATTN_DETAIL_UNROLL
    for (int c = 0; c < C; ++c) simd::store(ot + r * ldo + c * L, acc[r][c]);
}

/// block(std::integral_constant<int, R>{}, i) over rows i < n: steps of block_rows, then one of
/// block_rows / 2, then single rows (as score_columns).
template <class Block>
XATTN_DETAIL_LOOP_INLINE void over_pair_rows(index_t n, const Block& block) {
  constexpr int R = simd::block_rows, half = simd::block_rows / 2;
  index_t i = 0;
  for (; i + R <= n; i += R) block(std::integral_constant<int, R>{}, i);
  if (i + half <= n) {
    block(std::integral_constant<int, half>{}, i);
    i += half;
  }
  for (; i < n; ++i) block(std::integral_constant<int, 1>{}, i);
}

/// Sᵀ [n, W] = scale · K [n, Dk] · QPᵀ, W = `packets` packets of queries.
inline void pair_tile_scores(index_t n, index_t packets, const Eigen::bfloat16* k, index_t ldk,
                             const Eigen::bfloat16* qp, index_t ldq, index_t dpairs, float scale,
                             float* s, index_t lds) {
  constexpr index_t L = simd::lanes<float>;
  constexpr int C = simd::block_cols;
  index_t c = 0;
  for (; c + C <= packets; c += C)
    over_pair_rows(n, [&](auto rows, index_t j) {
      pair_score_block<decltype(rows)::value, C>(k + j * ldk, ldk, qp + c * 2 * L, ldq, dpairs,
                                                 scale, s + j * lds + c * L, lds);
    });
  for (; c < packets; ++c)
    over_pair_rows(n, [&](auto rows, index_t j) {
      pair_score_block<decltype(rows)::value, 1>(k + j * ldk, ldk, qp + c * 2 * L, ldq, dpairs,
                                                 scale, s + j * lds + c * L, lds);
    });
}

/// Oᵀ [Dv, W] = Oᵀ diag(corr) + VPᵀ · PP over `kpairs` pairs of keys.
inline void pair_tile_values(index_t kpairs, index_t packets, const Eigen::bfloat16* vp,
                             index_t ldv, const Eigen::bfloat16* pp, index_t ldp, index_t value_dim,
                             const float* corr, float* ot, index_t ldo) {
  constexpr index_t L = simd::lanes<float>;
  constexpr int C = simd::block_cols;
  index_t c = 0;
  for (; c + C <= packets; c += C)
    over_pair_rows(value_dim, [&](auto rows, index_t e) {
      pair_value_block<decltype(rows)::value, C>(vp + 2 * e, ldv, pp + c * 2 * L, ldp, kpairs,
                                                 corr + c * L, ot + e * ldo + c * L, ldo);
    });
  for (; c < packets; ++c)
    over_pair_rows(value_dim, [&](auto rows, index_t e) {
      pair_value_block<decltype(rows)::value, 1>(vp + 2 * e, ldv, pp + c * 2 * L, ldp, kpairs,
                                                 corr + c * L, ot + e * ldo + c * L, ldo);
    });
}

/// PP [⌈n/2⌉][W][2] (row stride ldp) = the probabilities Sᵀ [n, W] of keys 2j and 2j + 1 side
/// by side, rounded to bf16; an odd n's last pair has a zero second element.
inline void round_probabilities(const float* s, index_t lds, index_t n, index_t packets,
                                Eigen::bfloat16* pp, index_t ldp) {
  constexpr index_t L = simd::lanes<float>;
  index_t j = 0;
  for (; j + 2 <= n; j += 2)
    for (index_t c = 0; c < packets; ++c)
      simd::store_pairs(pp + j / 2 * ldp + c * 2 * L,
                        simd::round_pairs(simd::load(s + j * lds + c * L),
                                          simd::load(s + (j + 1) * lds + c * L)));
  if (j < n)
    for (index_t c = 0; c < packets; ++c)
      simd::store_pairs(pp + j / 2 * ldp + c * 2 * L,
                        simd::round_pairs(simd::load(s + j * lds + c * L), simd::zero<float>()));
}

/// VP [⌈n/2⌉][Dv][2] = rows 2j and 2j + 1 of V [n, Dv] (row stride ldv, elements contiguous)
/// side by side; an odd n's last pair has a zero second element.
inline void pack_pairs(const Eigen::bfloat16* v, index_t ldv, index_t n, index_t value_dim,
                       Eigen::bfloat16* vp) {
  for (index_t j = 0; j < n; j += 2) {
    const Eigen::bfloat16* a = v + j * ldv;
    Eigen::bfloat16* dst = vp + j * value_dim;  // pair row j / 2 starts at j / 2 · 2 Dv
    if (j + 1 < n) {
      const Eigen::bfloat16* b = a + ldv;
      for (index_t e = simd::interleave(a, b, value_dim, dst); e < value_dim; ++e) {
        dst[2 * e] = a[e];
        dst[2 * e + 1] = b[e];
      }
    } else {
      for (index_t e = 0; e < value_dim; ++e) {
        dst[2 * e] = a[e];
        dst[2 * e + 1] = Eigen::bfloat16(0.0f);
      }
    }
  }
}

/// The loops above as detail::bf16_product_kernels (detail/kernels.hpp).
inline constexpr bf16_product_kernels bf16_products{
    simd::lanes<float>, &pair_tile_scores, &round_probabilities, &pack_pairs, &pair_tile_values};
