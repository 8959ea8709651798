// SPDX-License-Identifier: MIT
// The inner loops of tiled_attention (attention_tiled.hpp explains the whole kernel), written once
// over the SIMD vocabulary of detail/simd.hpp. detail/kernels.hpp includes this file once per
// instruction-set level, inside that level's namespace and target region, where `simd` names
// the level's vocabulary; so there is no include guard, and nothing here may include a header.
//
// Layout: "lanes over queries". A query tile is stored transposed, Qᵀ [Dk, W], so that one SIMD
// packet holds the same feature of several queries. Scores come out transposed too, Sᵀ [n, W]
// for a tile of n keys, and so do the running output Oᵀ [Dv, W], the row max m [W] and the row
// sum l [W]. Then:
//   - both products are outer-product updates: a packet of queries times one broadcast element
//     of K or V, read in place from the caller's rows (no packing of K or V);
//   - every softmax reduction over keys (max, sum) runs down a column of Sᵀ, lane by lane,
//     so it needs no horizontal reduction and no shuffle.

// ---- the two products, as register-blocked micro-kernels --------------------------------------

/// Sᵀ[r][c] = Σ_d K[r][d] · Qᵀ[d][c] for R keys and C packets of queries, accumulated in
/// R x C registers over the whole Dk.
template <class T, int R, int C>
XATTN_DETAIL_LOOP_INLINE void score_block(const T* k, index_t ldk, const T* qt, index_t ldq,
                                          index_t head_dim, T* s, index_t lds) {
  using P = simd::packet<T>;
  constexpr index_t L = simd::lanes<T>;
  P acc[R][C];
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r) XATTN_DETAIL_UNROLL
  for (int c = 0; c < C; ++c) acc[r][c] = simd::zero<T>();
  for (index_t d = 0; d < head_dim; ++d) {
    P q[C];
    XATTN_DETAIL_UNROLL
    for (int c = 0; c < C; ++c) q[c] = simd::in_register(simd::load(qt + d * ldq + c * L));
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) {
      const P kb = simd::broadcast(k[r * ldk + d]);
      XATTN_DETAIL_UNROLL
      for (int c = 0; c < C; ++c) acc[r][c] = simd::fma(kb, q[c], acc[r][c]);
    }
  }
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r) XATTN_DETAIL_UNROLL
  for (int c = 0; c < C; ++c) simd::store(s + r * lds + c * L, acc[r][c]);
}

/// Oᵀ[r][c] = corr[c] · Oᵀ[r][c] + Σ_j V[j][r] · Pᵀ[j][c] for R value features and C packets of
/// queries: the online-softmax rescale and the P V product in one pass over Oᵀ.
template <class T, int R, int C>
XATTN_DETAIL_LOOP_INLINE void value_block(const T* v, index_t ldv, const T* pt, index_t ldp,
                                          index_t n, const T* corr, T* ot, index_t ldo) {
  using P = simd::packet<T>;
  constexpr index_t L = simd::lanes<T>;
  P acc[R][C];
  XATTN_DETAIL_UNROLL
  for (int c = 0; c < C; ++c) {
    const P cf = simd::load(corr + c * L);
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) acc[r][c] = simd::mul(simd::load(ot + r * ldo + c * L), cf);
  }
  for (index_t j = 0; j < n; ++j) {
    P p[C];
    XATTN_DETAIL_UNROLL
    for (int c = 0; c < C; ++c) p[c] = simd::in_register(simd::load(pt + j * ldp + c * L));
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) {
      const P vb = simd::broadcast(v[j * ldv + r]);
      XATTN_DETAIL_UNROLL
      for (int c = 0; c < C; ++c) acc[r][c] = simd::fma(vb, p[c], acc[r][c]);
    }
  }
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r) XATTN_DETAIL_UNROLL
  for (int c = 0; c < C; ++c) simd::store(ot + r * ldo + c * L, acc[r][c]);
}

// The blocks over all n keys (scores) or Dv features (outputs), C packets of queries wide: in
// steps of R = simd::block_rows rows, then at most one block of R / 2 rows, then single rows.
// Three block heights per width instead of R keep the compile time of each level down; the
// single rows cost a little speed on at most R / 2 - 1 rows per tile.
template <class T, int C>
void score_columns(index_t n, const T* k, index_t ldk, const T* qt, index_t ldq, index_t head_dim,
                   T* s, index_t lds) {
  constexpr int R = simd::block_rows, half = simd::block_rows / 2;
  index_t j = 0;
  for (; j + R <= n; j += R)
    score_block<T, R, C>(k + j * ldk, ldk, qt, ldq, head_dim, s + j * lds, lds);
  if (j + half <= n) {
    score_block<T, half, C>(k + j * ldk, ldk, qt, ldq, head_dim, s + j * lds, lds);
    j += half;
  }
  for (; j < n; ++j) score_block<T, 1, C>(k + j * ldk, ldk, qt, ldq, head_dim, s + j * lds, lds);
}

template <class T, int C>
void value_columns(index_t value_dim, const T* v, index_t ldv, const T* pt, index_t ldp, index_t n,
                   const T* corr, T* ot, index_t ldo) {
  constexpr int R = simd::block_rows, half = simd::block_rows / 2;
  index_t e = 0;
  for (; e + R <= value_dim; e += R)
    value_block<T, R, C>(v + e, ldv, pt, ldp, n, corr, ot + e * ldo, ldo);
  if (e + half <= value_dim) {
    value_block<T, half, C>(v + e, ldv, pt, ldp, n, corr, ot + e * ldo, ldo);
    e += half;
  }
  for (; e < value_dim; ++e) value_block<T, 1, C>(v + e, ldv, pt, ldp, n, corr, ot + e * ldo, ldo);
}

/// Sᵀ [n, W] = K [n, Dk] · Qᵀ [Dk, W], W = `packets` packets of queries.
template <class T>
void tile_scores(index_t n, index_t packets, const T* k, index_t ldk, const T* qt, index_t ldq,
                 index_t head_dim, T* s, index_t lds) {
  constexpr index_t L = simd::lanes<T>;
  constexpr int C = simd::block_cols;
  index_t c = 0;
  for (; c + C <= packets; c += C)
    score_columns<T, C>(n, k, ldk, qt + c * L, ldq, head_dim, s + c * L, lds);
  // The last (packets mod block_cols) packets one at a time: one micro-kernel width fewer to
  // compile per level, at the cost of reading K once per packet in a short last query tile.
  for (; c < packets; ++c)
    score_columns<T, 1>(n, k, ldk, qt + c * L, ldq, head_dim, s + c * L, lds);
}

/// Oᵀ [Dv, W] = Oᵀ diag(corr) + Vᵀ [Dv, n] · Pᵀ [n, W].
template <class T>
void tile_values(index_t n, index_t packets, const T* v, index_t ldv, const T* pt, index_t ldp,
                 index_t value_dim, const T* corr, T* ot, index_t ldo) {
  constexpr index_t L = simd::lanes<T>;
  constexpr int C = simd::block_cols;
  index_t c = 0;
  for (; c + C <= packets; c += C)
    value_columns<T, C>(value_dim, v, ldv, pt + c * L, ldp, n, corr + c * L, ot + c * L, ldo);
  for (; c < packets; ++c)
    value_columns<T, 1>(value_dim, v, ldv, pt + c * L, ldp, n, corr + c * L, ot + c * L, ldo);
}

// ---- the row path's two products: one query against a tile of keys -----------------------------

/// s[j] = Σ_d q[d] · K[j][d] for j < n: vectorised along Dk, eight keys at a time so that
/// eight independent chains of FMAs keep both FMA pipes busy, and their horizontal sums taken
/// four at a time (reduce_add4). K, the keys' type, is T or (T = float) a half type that each
/// load widens in registers: a decoder step reads half the bytes and converts nothing twice.
template <class T, class K = T>
void row_scores(const T* q, const K* k, index_t ldk, index_t head_dim, index_t n, T* s) {
  using P = simd::packet<T>;
  constexpr index_t L = simd::lanes<T>;
  constexpr int keys = 8;
  const index_t full = head_dim / L * L;
  index_t j = 0;
  for (; j + keys <= n; j += keys) {
    const K* kj = k + j * ldk;
    P a[keys];
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < keys; ++r) a[r] = simd::zero<T>();
    for (index_t d = 0; d < full; d += L) {
      const P qv = simd::in_register(simd::load(q + d));
      XATTN_DETAIL_UNROLL
      for (int r = 0; r < keys; ++r) a[r] = simd::fma(simd::load(kj + r * ldk + d), qv, a[r]);
    }
    simd::reduce_add4(a, s + j);
    simd::reduce_add4(a + 4, s + j + 4);
    for (index_t d = full; d < head_dim; ++d) XATTN_DETAIL_UNROLL
    for (int r = 0; r < keys; ++r)
      s[j + r] = simd::scalar_fma(q[d], static_cast<T>(kj[r * ldk + d]), s[j + r]);
  }
  for (; j < n; ++j) {
    const K* kj = k + j * ldk;
    P a = simd::zero<T>();
    for (index_t d = 0; d < full; d += L) a = simd::fma(simd::load(kj + d), simd::load(q + d), a);
    T r = simd::reduce_add(a);
    for (index_t d = full; d < head_dim; ++d) r = simd::scalar_fma(q[d], static_cast<T>(kj[d]), r);
    s[j] = r;
  }
}

/// acc[e] = corr · acc[e] + Σ_j p[j] · V[j][e] for e < Dv: vectorised along Dv, eight packets of
/// acc at a time (eight independent FMA chains, each value row read once, in order); a last
/// block of four packets puts even and odd keys in two sets of accumulators (again eight
/// chains), added at the end. V, the values' type, is T or (T = float) a half type, as in
/// row_scores.
template <class T, class V = T>
void row_values(const T* p, const V* v, index_t ldv, index_t value_dim, index_t n, T corr, T* acc) {
  using P = simd::packet<T>;
  constexpr index_t L = simd::lanes<T>;
  const P cf = simd::broadcast(corr);
  index_t e = 0;
  for (; e + 8 * L <= value_dim; e += 8 * L) {
    P a[8];
    for (int r = 0; r < 8; ++r) a[r] = simd::mul(simd::load(acc + e + r * L), cf);
    for (index_t j = 0; j < n; ++j) {
      const V* vj = v + j * ldv + e;
      const P pj = simd::broadcast(p[j]);
      for (int r = 0; r < 8; ++r) a[r] = simd::fma(pj, simd::load(vj + r * L), a[r]);
    }
    for (int r = 0; r < 8; ++r) simd::store(acc + e + r * L, a[r]);
  }
  for (; e + 4 * L <= value_dim; e += 4 * L) {
    P a[4], b[4];
    for (int r = 0; r < 4; ++r) {
      a[r] = simd::mul(simd::load(acc + e + r * L), cf);
      b[r] = simd::zero<T>();
    }
    index_t j = 0;
    for (; j + 2 <= n; j += 2) {
      const V* vj = v + j * ldv + e;
      const P p0 = simd::broadcast(p[j]), p1 = simd::broadcast(p[j + 1]);
      for (int r = 0; r < 4; ++r) a[r] = simd::fma(p0, simd::load(vj + r * L), a[r]);
      for (int r = 0; r < 4; ++r) b[r] = simd::fma(p1, simd::load(vj + ldv + r * L), b[r]);
    }
    if (j < n) {
      const P p0 = simd::broadcast(p[j]);
      for (int r = 0; r < 4; ++r) a[r] = simd::fma(p0, simd::load(v + j * ldv + e + r * L), a[r]);
    }
    for (int r = 0; r < 4; ++r) simd::store(acc + e + r * L, simd::add(a[r], b[r]));
  }
  for (; e + L <= value_dim; e += L) {
    P a = simd::mul(simd::load(acc + e), cf);
    for (index_t j = 0; j < n; ++j)
      a = simd::fma(simd::broadcast(p[j]), simd::load(v + j * ldv + e), a);
    simd::store(acc + e, a);
  }
  for (; e < value_dim; ++e) {
    T a = simd::scalar_mul(corr, acc[e]);
    for (index_t j = 0; j < n; ++j) a = simd::scalar_fma(p[j], static_cast<T>(v[j * ldv + e]), a);
    acc[e] = a;
  }
}

/// The online softmax (below) for one row of n scores: replaces s[j] by exp(s[j] - shift) and
/// returns the row's max (m_new = max(m_old, max_j s[j])) and Σ_j exp(s[j] - shift), where shift
/// is m_new, or 0 while m_new = -inf. s must have room for n rounded up to whole packets; the
/// slack is overwritten with -inf (weight 0).
template <class T>
void online_softmax_row(T* s, index_t n, T m_old, T& m_new, T& sum) {
  using P = simd::packet<T>;
  constexpr index_t L = simd::lanes<T>;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const index_t padded = (n + L - 1) / L * L;
  std::fill(s + n, s + padded, neg_inf);
  P max0 = simd::broadcast(neg_inf), max1 = max0;
  index_t j = 0;
  for (; j + 2 * L <= padded; j += 2 * L) {
    max0 = simd::max(max0, simd::load(s + j));
    max1 = simd::max(max1, simd::load(s + j + L));
  }
  if (j < padded) max0 = simd::max(max0, simd::load(s + j));
  const T tile_max =
      simd::reduce_max(simd::max(max0, max1));  // a NaN score reaches sum through exp
  m_new = m_old > tile_max ? m_old : tile_max;
  const P shift = simd::broadcast(m_new == neg_inf ? T(0) : m_new);
  P sum0 = simd::zero<T>(), sum1 = sum0;
  for (j = 0; j + 2 * L <= padded; j += 2 * L) {
    const P p0 = simd::exp_flushed<T>(simd::sub(simd::load(s + j), shift));
    const P p1 = simd::exp_flushed<T>(simd::sub(simd::load(s + j + L), shift));
    simd::store(s + j, p0);
    simd::store(s + j + L, p1);
    sum0 = simd::add(sum0, p0);
    sum1 = simd::add(sum1, p1);
  }
  if (j < padded) {
    const P p0 = simd::exp_flushed<T>(simd::sub(simd::load(s + j), shift));
    simd::store(s + j, p0);
    sum0 = simd::add(sum0, p0);
  }
  sum = simd::reduce_add(simd::add(sum0, sum1));
}

// ---- the online softmax over one tile ----------------------------------------------------------

/// Online softmax. Per query keep m (running max), l (running sum of exp) and acc[Dv]
/// (unnormalised output). For the next key tile with scores s_j:
///   m_new = max(m, max_j s_j),  c = exp(m - m_new)
///   l   = c·l   + Σ_j exp(s_j - m_new)
///   acc = c·acc + Σ_j exp(s_j - m_new) · v_j
/// After the last tile out = acc / l: equal to naive_attention up to rounding, without ever
/// storing the [Lq, Lk] score matrix.
///
/// This function does the first two lines for every lane of Sᵀ [n, W]: it replaces the scores
/// by p_j = exp(s_j - m_new), updates m and l, and leaves c in corr for tile_values. While a
/// query has seen only masked keys (m = -inf) the shift is 0 instead of -inf, so exp(-inf - 0)
/// gives weights of exactly 0 instead of NaN.
template <class T>
void online_softmax_tile(T* s, index_t lds, index_t n, index_t packets, T* m, T* l, T* corr) {
  using P = simd::packet<T>;
  constexpr index_t L = simd::lanes<T>;
  const P neg_inf = simd::broadcast(-std::numeric_limits<T>::infinity());
  const P zero = simd::zero<T>();
  for (index_t c = 0; c < packets; ++c) {
    T* col = s + c * L;
    // pass 1: the tile's max, lane by lane, in four independent chains. A NaN score may be
    // skipped here: its exp in pass 2 is NaN all the same, and makes l and the output NaN.
    P max0 = neg_inf, max1 = neg_inf, max2 = neg_inf, max3 = neg_inf;
    index_t j = 0;
    for (; j + 4 <= n; j += 4) {
      max0 = simd::max(max0, simd::load(col + j * lds));
      max1 = simd::max(max1, simd::load(col + (j + 1) * lds));
      max2 = simd::max(max2, simd::load(col + (j + 2) * lds));
      max3 = simd::max(max3, simd::load(col + (j + 3) * lds));
    }
    for (; j < n; ++j) max0 = simd::max(max0, simd::load(col + j * lds));
    const P m_old = simd::load(m + c * L);
    const P m_new = simd::max(simd::max(m_old, max0), simd::max(simd::max(max1, max2), max3));
    const P shift = simd::finite_shift(m_new);
    const P cf = simd::exp_flushed<T>(simd::sub(m_old, shift));
    // pass 2: exponentials and their sum; two partial sums hide the add latency
    P sum0 = zero, sum1 = zero;
    for (j = 0; j + 2 <= n; j += 2) {
      const P p0 = simd::exp_flushed<T>(simd::sub(simd::load(col + j * lds), shift));
      const P p1 = simd::exp_flushed<T>(simd::sub(simd::load(col + (j + 1) * lds), shift));
      simd::store(col + j * lds, p0);
      simd::store(col + (j + 1) * lds, p1);
      sum0 = simd::add(sum0, p0);
      sum1 = simd::add(sum1, p1);
    }
    if (j < n) {
      const P p0 = simd::exp_flushed<T>(simd::sub(simd::load(col + j * lds), shift));
      simd::store(col + j * lds, p0);
      sum0 = simd::add(sum0, p0);
    }
    simd::store(l + c * L, simd::fma(cf, simd::load(l + c * L), simd::add(sum0, sum1)));
    simd::store(m + c * L, m_new);
    simd::store(corr + c * L, cf);
  }
}

// ---- the row path on quantized keys and values (quantized.hpp), read in place ----------------

/// Codes t .. t + lanes - 1 of block b (t a multiple of the lanes) as a packet of floats, read
/// from the block: a q8 block's bytes, or a q4 block's low nibbles (t < 16) or high ones.
template <class B>
XATTN_DETAIL_LOOP_INLINE simd::packet<float> codes_packet(const B& b, index_t t) {
  if constexpr (std::is_same_v<B, q8_block>)
    return simd::load_codes(b.q + t);
  else
    return t < 16 ? simd::load_nibble_codes(b.nibbles + t, false)
                  : simd::load_nibble_codes(b.nibbles + (t - 16), true);
}

/// Σ_d q[d] · code d of block b for d < rest (a row's last, partial block), element by
/// element, before the block's scale.
template <class B>
XATTN_DETAIL_LOOP_INLINE float partial_dot(const B& b, const float* q, index_t rest) {
  float a = 0;
  for (index_t d = 0; d < rest; ++d)
    a = simd::scalar_fma(q[d], static_cast<float>(block_code(b, d)), a);
  return a;
}

/// The scores of KEYS keys (rows of blocks kj, ldk blocks apart) for G query rows (q, ldq
/// apart): s[g * lds + r] = Σ_d q_g[d] · K[r][d]. Per block, each key's codes are converted
/// once for all G rows; each row's dot product with them, times the block's scale, is summed
/// into a packet per key and row, and the packets reduced once per key (four at a time). A row's
/// arithmetic does not depend on G: every score has the same bits for any G.
template <class B, int KEYS, int G>
XATTN_DETAIL_LOOP_INLINE void quant_key_scores(const float* q, index_t ldq, const B* kj,
                                               index_t ldk, index_t full, index_t rest, float* s,
                                               index_t lds) {
  using P = simd::packet<float>;
  constexpr index_t L = simd::lanes<float>, QB = quant_block_values;
  constexpr int per_block = int(QB / L);
  static_assert(KEYS == 1 || KEYS == 4, "keys are reduced one or four at a time");
  P t[G][KEYS];
  XATTN_DETAIL_UNROLL
  for (int g = 0; g < G; ++g) XATTN_DETAIL_UNROLL
  for (int r = 0; r < KEYS; ++r) t[g][r] = simd::zero<float>();
  for (index_t b = 0; b < full; ++b) {
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < KEYS; ++r) {
      const B& blk = kj[r * ldk + b];
      const P scale = simd::broadcast(simd::scale_of(blk.scale));
      P c[per_block];
      XATTN_DETAIL_UNROLL
      for (int u = 0; u < per_block; ++u) c[u] = codes_packet(blk, u * L);
      XATTN_DETAIL_UNROLL
      for (int g = 0; g < G; ++g) {
        const float* qb = q + g * ldq + b * QB;
        P a = simd::mul(c[0], simd::load(qb));
        XATTN_DETAIL_UNROLL
        for (int u = 1; u < per_block; ++u) a = simd::fma(c[u], simd::load(qb + u * L), a);
        t[g][r] = simd::fma(scale, a, t[g][r]);
      }
    }
  }
  XATTN_DETAIL_UNROLL
  for (int g = 0; g < G; ++g) {
    if constexpr (KEYS == 4)
      simd::reduce_add4(t[g], s + g * lds);
    else
      s[g * lds] = simd::reduce_add(t[g][0]);
  }
  if (rest > 0) XATTN_DETAIL_UNROLL
  for (int r = 0; r < KEYS; ++r) {
    const B& blk = kj[r * ldk + full];
    const float scale = simd::scale_of(blk.scale);
    XATTN_DETAIL_UNROLL
    for (int g = 0; g < G; ++g)
      s[g * lds + r] =
          simd::scalar_fma(scale, partial_dot(blk, q + g * ldq + full * QB, rest), s[g * lds + r]);
  }
}

/// s[g * lds + j] = Σ_d q_g[d] · K[j][d] for j < n and the G query rows q_g = q + g · ldq
/// (the query heads of a grouped-query item, which share their keys), K[j] a row of blocks
/// (ldk blocks apart) holding K[j][d] = scale · code exactly: per block the codes' dot product
/// with q_g, then times the block's scale, summed over the row's blocks in packets and reduced
/// once per key; four keys at a time. A last partial block (head_dim not a multiple of 32) is
/// summed element by element.
template <class B, int G>
void scores_of_rows(const float* q, index_t ldq, const B* k, index_t ldk, index_t head_dim,
                    index_t n, float* s, index_t lds) {
  constexpr index_t QB = quant_block_values;
  const index_t full = head_dim / QB, rest = head_dim - full * QB;
  index_t j = 0;
  for (; j + 4 <= n; j += 4)
    quant_key_scores<B, 4, G>(q, ldq, k + j * ldk, ldk, full, rest, s + j, lds);
  for (; j < n; ++j) quant_key_scores<B, 1, G>(q, ldq, k + j * ldk, ldk, full, rest, s + j, lds);
}

/// The scores of `rows` query rows (any number) against the same keys: as many rows at once as
/// this level has registers for (four with 32 registers, two with 16), then pairs, then one.
template <class B>
void rows_scores_quant(const float* q, index_t ldq, index_t rows, const B* k, index_t ldk,
                       index_t head_dim, index_t n, float* s, index_t lds) {
  constexpr int most = simd::lanes<float> >= 16 ? 4 : 2;
  index_t g = 0;
  for (; g + most <= rows; g += most)
    scores_of_rows<B, most>(q + g * ldq, ldq, k, ldk, head_dim, n, s + g * lds, lds);
  if constexpr (most > 2)
    for (; g + 2 <= rows; g += 2)
      scores_of_rows<B, 2>(q + g * ldq, ldq, k, ldk, head_dim, n, s + g * lds, lds);
  for (; g < rows; ++g)
    scores_of_rows<B, 1>(q + g * ldq, ldq, k, ldk, head_dim, n, s + g * lds, lds);
}

/// acc_g[e] for the G blocks of features starting at block b0 and the R query rows g < R
/// (probabilities p + g · ldp, outputs acc + g · lda): acc_g = corr[g] · acc_g + Σ_j w_gj ·
/// codes, w_gj = p_g[j] · scale_j (one rounding more than the float path's p · (scale · code),
/// whose product is exact). Each key's codes are converted once for all R rows. Keys alternate
/// between two sets of accumulators when one set is narrow, so that at least eight chains of
/// FMAs run side by side in each row; a row's arithmetic does not depend on R.
template <class B, int G, int R>
XATTN_DETAIL_LOOP_INLINE void value_blocks(const float* p, index_t ldp, const B* v, index_t ldv,
                                           index_t b0, index_t n, const float* corr, float* acc,
                                           index_t lda) {
  using P = simd::packet<float>;
  constexpr index_t L = simd::lanes<float>, QB = quant_block_values;
  constexpr int per_block = int(QB / L), width = G * per_block;
  constexpr int sets = width >= 8 ? 1 : 2;
  P a[R][sets][width];
  XATTN_DETAIL_UNROLL
  for (int g = 0; g < R; ++g) {
    const P cf = simd::broadcast(corr[g]);
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < width; ++r) {
      a[g][0][r] = simd::mul(simd::load(acc + g * lda + b0 * QB + r * L), cf);
      if constexpr (sets == 2) a[g][1][r] = simd::zero<float>();
    }
  }
  for (index_t j = 0; j < n; ++j) {
    const int set = sets == 2 ? int(j & 1) : 0;
    XATTN_DETAIL_UNROLL
    for (int b = 0; b < G; ++b) {
      const B& blk = v[j * ldv + b0 + b];
      const float scale = simd::scale_of(blk.scale);
      P c[per_block];
      XATTN_DETAIL_UNROLL
      for (int t = 0; t < per_block; ++t) c[t] = codes_packet(blk, t * L);
      XATTN_DETAIL_UNROLL
      for (int g = 0; g < R; ++g) {
        const P w = simd::broadcast(simd::scalar_mul(p[g * ldp + j], scale));
        XATTN_DETAIL_UNROLL
        for (int t = 0; t < per_block; ++t)
          a[g][set][b * per_block + t] = simd::fma(w, c[t], a[g][set][b * per_block + t]);
      }
    }
  }
  XATTN_DETAIL_UNROLL
  for (int g = 0; g < R; ++g) XATTN_DETAIL_UNROLL
  for (int r = 0; r < width; ++r)
    simd::store(acc + g * lda + b0 * QB + r * L,
                sets == 2 ? simd::add(a[g][0][r], a[g][1][r]) : a[g][0][r]);
}

/// acc_g[e] = corr[g] · acc_g[e] + Σ_j p_g[j] · V[j][e] for e < Dv and the R query rows g < R
/// (p + g · ldp, acc + g · lda), V[j] a row of blocks (ldv blocks apart): the feature blocks
/// four packets or more at a time (value_blocks), a last partial block element by element.
template <class B, int R>
void values_of_rows(const float* p, index_t ldp, const B* v, index_t ldv, index_t value_dim,
                    index_t n, const float* corr, float* acc, index_t lda) {
  constexpr index_t QB = quant_block_values;
  constexpr int group = simd::lanes<float> >= 16 ? 2 : 1;  // blocks per pass
  const index_t full = value_dim / QB, rest = value_dim - full * QB;
  index_t b = 0;
  for (; b + group <= full; b += group)
    value_blocks<B, group, R>(p, ldp, v, ldv, b, n, corr, acc, lda);
  for (; b < full; ++b) value_blocks<B, 1, R>(p, ldp, v, ldv, b, n, corr, acc, lda);
  if (rest > 0) {
    for (int g = 0; g < R; ++g) {
      float* out = acc + g * lda + full * QB;
      for (index_t e = 0; e < rest; ++e) out[e] = simd::scalar_mul(corr[g], out[e]);
    }
    for (index_t j = 0; j < n; ++j) {
      const B& blk = v[j * ldv + full];
      const float scale = simd::scale_of(blk.scale);
      for (int g = 0; g < R; ++g) {
        float* out = acc + g * lda + full * QB;
        const float w = simd::scalar_mul(p[g * ldp + j], scale);
        for (index_t e = 0; e < rest; ++e)
          out[e] = simd::scalar_fma(w, static_cast<float>(block_code(blk, e)), out[e]);
      }
    }
  }
}

/// The outputs of `rows` query rows (any number) against the same values: two rows at once
/// with 32 registers, else one.
template <class B>
void rows_values_quant(const float* p, index_t ldp, index_t rows, const B* v, index_t ldv,
                       index_t value_dim, index_t n, const float* corr, float* acc, index_t lda) {
  constexpr int most = simd::lanes<float> >= 16 ? 2 : 1;
  index_t g = 0;
  for (; g + most <= rows; g += most)
    values_of_rows<B, most>(p + g * ldp, ldp, v, ldv, value_dim, n, corr + g, acc + g * lda, lda);
  if constexpr (most > 1)
    for (; g < rows; ++g)
      values_of_rows<B, 1>(p + g * ldp, ldp, v, ldv, value_dim, n, corr + g, acc + g * lda, lda);
}

/// y[0, d) = the row of ceil(d / 32) blocks x dequantized, exactly (each value scale · code is
/// a float): the lanes path's tiles of quantized keys and values.
template <class B>
void dequantize_row(const B* x, index_t d, float* y) {
  constexpr index_t L = simd::lanes<float>, QB = quant_block_values;
  index_t b = 0;
  for (; (b + 1) * QB <= d; ++b) {
    const simd::packet<float> s = simd::broadcast(simd::scale_of(x[b].scale));
    XATTN_DETAIL_UNROLL
    for (index_t t = 0; t < QB; t += L)
      simd::store(y + b * QB + t, simd::mul(s, codes_packet(x[b], t)));
  }
  if (b * QB < d) {
    const float s = simd::scale_of(x[b].scale);
    for (index_t e = 0; e < d - b * QB; ++e)
      y[b * QB + e] = simd::scalar_mul(s, static_cast<float>(block_code(x[b], e)));
  }
}

// ---- this level's entry points ------------------------------------------------------------------

/// y = exp_flushed(x) for n a multiple of lanes<T>: the vectorised exp, for the tests.
template <class T>
void exp_flushed_array(const T* x, index_t n, T* y) {
  constexpr index_t L = simd::lanes<T>;
  for (index_t i = 0; i + L <= n; i += L)
    simd::store(y + i, simd::exp_flushed<T>(simd::load(x + i)));
}

/// y = x widened to T: the level's vector conversion for floats, then element by element.
template <class T, class S>
void widen_array(const S* x, index_t n, T* y) {
  index_t i = 0;
  if constexpr (std::is_same_v<T, float>) i = simd::widen(x, n, y);
  for (; i < n; ++i) y[i] = static_cast<T>(x[i]);
}

/// y = x rounded to the half type S (T = float; element by element for other T).
template <class T, class S>
void narrow_array(const T* x, index_t n, S* y) {
  index_t i = 0;
  if constexpr (std::is_same_v<T, float>) i = simd::narrow(x, n, y);
  for (; i < n; ++i) y[i] = static_cast<S>(x[i]);
}

/// The row path's products on keys and values of the half type S, for T = float (null for
/// other T: no kernel computes in them).
template <class T, class S>
constexpr auto half_row_scores() {
  if constexpr (std::is_same_v<T, float>)
    return &row_scores<T, S>;
  else
    return static_cast<void (*)(const T*, const S*, index_t, index_t, index_t, T*)>(nullptr);
}
template <class T, class S>
constexpr auto half_row_values() {
  if constexpr (std::is_same_v<T, float>)
    return &row_values<T, S>;
  else
    return static_cast<void (*)(const T*, const S*, index_t, index_t, index_t, T, T*)>(nullptr);
}

/// The quantized-block loops for T = float (null for other T: no kernel computes in them).
template <class T, class B>
constexpr quant_kernels<T, B> quant_loops() {
  if constexpr (std::is_same_v<T, float>)
    return {&rows_scores_quant<B>, &rows_values_quant<B>, &dequantize_row<B>};
  else
    return {nullptr, nullptr, nullptr};
}

/// The loops above, compiled for this level, as detail::tile_kernels (detail/kernels.hpp).
template <class T>
inline constexpr tile_kernels<T> kernels{level,
                                         simd::lanes<T>,
                                         &tile_scores<T>,
                                         &online_softmax_tile<T>,
                                         &tile_values<T>,
                                         &row_scores<T>,
                                         &online_softmax_row<T>,
                                         &row_values<T>,
                                         &exp_flushed_array<T>,
                                         &widen_array<T, Eigen::half>,
                                         &widen_array<T, Eigen::bfloat16>,
                                         &narrow_array<T, Eigen::half>,
                                         &narrow_array<T, Eigen::bfloat16>,
                                         half_row_scores<T, Eigen::half>(),
                                         half_row_scores<T, Eigen::bfloat16>(),
                                         half_row_values<T, Eigen::half>(),
                                         half_row_values<T, Eigen::bfloat16>(),
                                         quant_loops<T, q8_block>(),
                                         quant_loops<T, q4_block>()};
