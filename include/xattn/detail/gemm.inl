// SPDX-License-Identifier: MIT
// The projections' matrix product (detail/gemm.hpp explains the whole of it), written once over
// the SIMD vocabulary of detail/simd.hpp. detail/gemm.hpp includes this file once per
// instruction-set level, inside that level's namespace and target region, where `simd` names
// the level's vocabulary; so there is no include guard, and nothing here may include a header.
//
// Layout: C [m, n] row-major, lanes along n. A block of C of gemm_mr rows and gemm_nr columns
// (block_rows x block_cols packets) is held in registers over a panel of the depth; each step
// of the depth loads block_cols packets of B and broadcasts block_rows elements of A, so every
// step is block_rows x block_cols independent FMAs. A and B are first packed (copied in the
// order the micro-kernel reads them), which also makes any stride or transposition of A and B
// cost the same as the contiguous case.

/// Rows of C per micro-kernel, and columns (a whole number of packets).
inline constexpr index_t gemm_mr = simd::block_rows;
template <class T>
inline constexpr index_t gemm_nr = simd::block_cols * simd::lanes<T>;

/// A [m, kc] (element (i, p) at a[i·rsa + p·csa]) packed into slivers of gemm_mr rows: sliver s,
/// depth p, row r at ap[(s·kc + p)·gemm_mr + r]. Rows past m are zeros.
template <class T>
void gemm_pack_a(index_t m, index_t kc, const T* a, index_t rsa, index_t csa, T* ap) {
  constexpr index_t R = gemm_mr;
  for (index_t i0 = 0; i0 < m; i0 += R, ap += kc * R) {
    const index_t rows = std::min(R, m - i0);
    if (rows == R && csa == 1) {
      // The common case, a row-major A: R rows read side by side, the sliver written in order.
      const T* src[R];
      XATTN_DETAIL_UNROLL
      for (index_t r = 0; r < R; ++r) src[r] = a + (i0 + r) * rsa;
      for (index_t p = 0; p < kc; ++p) {
        XATTN_DETAIL_UNROLL
        for (index_t r = 0; r < R; ++r) ap[p * R + r] = src[r][p];
      }
      continue;
    }
    for (index_t r = 0; r < rows; ++r) {
      const T* src = a + (i0 + r) * rsa;
      for (index_t p = 0; p < kc; ++p) ap[p * R + r] = src[p * csa];
    }
    for (index_t r = rows; r < R; ++r)
      for (index_t p = 0; p < kc; ++p) ap[p * R + r] = T(0);
  }
}

/// B [kc, n] (element (p, j) at b[p·rsb + j·csb]) packed into slivers of gemm_nr columns:
/// sliver s, depth p, column c at bp[(s·kc + p)·gemm_nr + c]. Columns past n are zeros.
template <class T>
void gemm_pack_b(index_t kc, index_t n, const T* b, index_t rsb, index_t csb, T* bp) {
  constexpr index_t N = gemm_nr<T>;
  for (index_t j0 = 0; j0 < n; j0 += N, bp += kc * N) {
    const index_t cols = std::min(N, n - j0);
    if (csb == 1) {
      for (index_t p = 0; p < kc; ++p) {
        const T* src = b + p * rsb + j0;
        T* dst = bp + p * N;
        for (index_t c = 0; c < cols; ++c) dst[c] = src[c];
        for (index_t c = cols; c < N; ++c) dst[c] = T(0);
      }
    } else {
      // B = Wᵀ for a row-major weight W: each column of B is a row of W. The rows are read
      // side by side, so that the writes run along the sliver (one cache line of each row serves
      // several steps of p).
      const T* rows[N];
      for (index_t c = 0; c < cols; ++c) rows[c] = b + (j0 + c) * csb;
      for (index_t p = 0; p < kc; ++p) {
        T* dst = bp + p * N;
        for (index_t c = 0; c < cols; ++c) dst[c] = rows[c][p * rsb];
        for (index_t c = cols; c < N; ++c) dst[c] = T(0);
      }
    }
  }
}

/// The micro-kernel: acc = Σ_p ap[p] ⊗ bp[p] over kc steps, then c = acc (+ c when `add`)
/// (+ bias[c] when bias is set) for the rows < m and columns < n of the block (m, n at most
/// gemm_mr, gemm_nr: the edges of C go through a block on the stack).
template <class T>
XATTN_DETAIL_LOOP_INLINE void gemm_block(index_t kc, const T* ap, const T* bp, T* c, index_t ldc,
                                         index_t m, index_t n, bool add, const T* bias) {
  using P = simd::packet<T>;
  constexpr index_t L = simd::lanes<T>;
  constexpr int R = simd::block_rows, C = simd::block_cols;
  P acc[R][C];
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r) {
    XATTN_DETAIL_UNROLL
    for (int k = 0; k < C; ++k) acc[r][k] = simd::zero<T>();
  }
  for (index_t p = 0; p < kc; ++p) {
    P b[C];
    XATTN_DETAIL_UNROLL
    for (int k = 0; k < C; ++k) b[k] = simd::in_register(simd::load(bp + p * C * L + k * L));
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) {
      const P a = simd::broadcast(ap[p * R + r]);
      XATTN_DETAIL_UNROLL
      for (int k = 0; k < C; ++k) acc[r][k] = simd::fma(a, b[k], acc[r][k]);
    }
  }
  if (m == R && n == C * L) {
    XATTN_DETAIL_UNROLL
    for (int r = 0; r < R; ++r) {
      XATTN_DETAIL_UNROLL
      for (int k = 0; k < C; ++k) {
        P x = acc[r][k];
        if (add) x = simd::add(simd::load(c + r * ldc + k * L), x);
        if (bias) x = simd::add(x, simd::load(bias + k * L));
        simd::store(c + r * ldc + k * L, x);
      }
    }
    return;
  }
  T edge[R * C * L];
  XATTN_DETAIL_UNROLL
  for (int r = 0; r < R; ++r) {
    XATTN_DETAIL_UNROLL
    for (int k = 0; k < C; ++k) simd::store(edge + r * C * L + k * L, acc[r][k]);
  }
  for (index_t r = 0; r < m; ++r)
    for (index_t j = 0; j < n; ++j) {
      T x = edge[r * C * L + j];
      if (add) x = c[r * ldc + j] + x;
      if (bias) x = x + bias[j];
      c[r * ldc + j] = x;
    }
}

/// B [k, n] (the columns [j0, j0 + n) of g's B) packed for gemm_item: one gemm_pack_b panel
/// per kc of the depth, each (n rounded up to gemm_nr) x kc, one after another.
template <class T>
void gemm_pack_b_panels(const gemm_args<T>& g, index_t j0, index_t n, index_t kc, T* bp) {
  const index_t width = (n + gemm_nr<T> - 1) / gemm_nr<T> * gemm_nr<T>;
  for (index_t p0 = 0; p0 < g.k; p0 += kc) {
    const index_t depth = std::min(kc, g.k - p0);
    gemm_pack_b<T>(depth, n, g.b + p0 * g.rsb + j0 * g.csb, g.rsb, g.csb, bp + p0 * width);
  }
}

/// One work item of detail::gemm: rows [i0, i0 + m) and columns [j0, j0 + n) of C, over the
/// whole depth in panels of kc (the order of the sums is fixed by the sizes alone). bp holds
/// those columns of B packed by gemm_pack_b_panels; ap has room for m (rounded up to gemm_mr)
/// x kc elements.
template <class T>
void gemm_item(const gemm_args<T>& g, index_t i0, index_t m, index_t j0, index_t n, index_t kc,
               const T* bp, T* ap) {
  constexpr index_t R = gemm_mr, N = gemm_nr<T>;
  const index_t width = (n + N - 1) / N * N;
  for (index_t p0 = 0; p0 < g.k; p0 += kc) {
    const index_t depth = std::min(kc, g.k - p0);
    const bool add = g.accumulate || p0 > 0;
    const T* bias = p0 + depth == g.k && g.bias ? g.bias + j0 : nullptr;
    gemm_pack_a<T>(m, depth, g.a + i0 * g.rsa + p0 * g.csa, g.rsa, g.csa, ap);
    const T* const panel = bp + p0 * width;
    for (index_t j = 0; j < n; j += N) {
      const T* bs = panel + j * depth;
      for (index_t i = 0; i < m; i += R)
        gemm_block<T>(depth, ap + i * depth, bs, g.c + (i0 + i) * g.ldc + j0 + j, g.ldc,
                      std::min(R, m - i), std::min(N, n - j), add, bias ? bias + j : nullptr);
    }
  }
}

template <class T>
inline constexpr gemm_kernels<T> gemm_loops = {level, gemm_mr, gemm_nr<T>, &gemm_pack_b_panels<T>,
                                               &gemm_item<T>};
