// SPDX-License-Identifier: MIT
// tiled_attention: the memory-efficient kernel. Same arguments and results as naive_attention
// (see attention_naive.hpp for the math), computed tile by tile with an online softmax
// (detail/online_softmax.inl) so the [Lq, Lk] score matrix is never stored: its scratch depends
// on the tile sizes and Dk, Dv only. Read detail/online_softmax.inl next for the inner loops,
// and dispatch.hpp for the instruction set they run on.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/eigen_interop.hpp"
#include "xattn/detail/kernels.hpp"
#include "xattn/detail/masking.hpp"
#include "xattn/detail/tiling.hpp"
#include "xattn/detail/validate.hpp"
#include "xattn/dispatch.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/options.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#if defined(__SSE2__)
#  include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace xattn {

namespace detail {

/// One tiled_attention call with its arguments checked and its work planned. T is the element
/// type of q, out and the options, KV that of k and v; the work is done in C = compute_t<T>
/// (float for the half types, half.hpp), and compute_t<KV> is the same C.
template <class T, class KV = T>
struct tiled_job {
  using C = compute_t<T>;
  static_assert(std::is_same_v<C, compute_t<KV>> || is_quant_block_v<KV>,
                "q and k, v must compute in the same type");

  tensor_view<const T, 4> q;
  tensor_view<const KV, 4> k, v;
  tensor_view<T, 4> out;
  const attention_options<T>& opts;
  mask_plan<T> mask;
  attention_shape shape;
  index_t group;  ///< H / Hkv
  C scale;
  tiled_plan plan;
  const tile_kernels<C>& loops;  ///< the inner loops of the call's instruction-set path
  team_scratch<C>* team;         ///< sized for plan before the threads start
  C* partials;                   ///< splits > 1: m, l and an output row per query of every unit
  /// The lanes path's products in bf16 (T and KV bf16 on the avx512bf16 level), else null.
  const bf16_product_kernels* products;

  tile_scratch<C>& scratch(int thread) const { return team->threads[std::size_t(thread)]; }

  /// A [n, d] tile of keys or values starting at key j0, as a pointer and a row stride: the
  /// caller's rows in place when each is contiguous and already of type C, else copied into
  /// `copy` (widened from a half type or dequantized from blocks: once per tile, by the path's
  /// conversion loop). d is Dk for keys, Dv for values.
  const C* rows_of(const tensor_view<const KV, 2>& x, index_t j0, index_t n,
                   aligned_vector<C>& copy, index_t& ld, index_t d) const {
    if constexpr (is_quant_block_v<KV>) {  // rows of blocks, contiguous (checked on entry)
      C* dst = at_least(copy, n * d);
      ld = d;
      const KV* src = x.data() + j0 * x.stride(0);
      for (index_t j = 0; j < n; ++j) quant().dequantize_row(src + j * x.stride(0), d, dst + j * d);
      return dst;
    } else {
      XATTN_ASSERT(d == x.extent(1));
      const bool contiguous = x.stride(1) == 1 || x.extent(1) <= 1;
      if constexpr (std::is_same_v<KV, C>) {
        if (contiguous) {
          ld = x.stride(0);
          return x.data() + j0 * x.stride(0);
        }
      }
      C* dst = at_least(copy, n * d);
      ld = d;
      if constexpr (!std::is_same_v<KV, C>) {
        if (contiguous) {
          const KV* src = x.data() + j0 * x.stride(0);
          if (x.stride(0) == d || n == 1)  // one run of n·d elements
            widen(src, n * d, dst);
          else
            for (index_t j = 0; j < n; ++j) widen(src + j * x.stride(0), d, dst + j * d);
          return dst;
        }
      }
      for (index_t j = 0; j < n; ++j)
        for (index_t e = 0; e < d; ++e) dst[j * d + e] = static_cast<C>(x(j0 + j, e));
      return dst;
    }
  }

  /// y[0, m) = x[0, m) widened to C, for x a row (or part of one) of q: the path's vector
  /// conversion when the row is contiguous.
  template <class E>
  void widen_row(const tensor_view<const E, 2>& x, index_t row, index_t e0, index_t m, C* y) const {
    if (x.stride(1) == 1 || m == 1) {
      const E* src = x.data() + row * x.stride(0) + e0 * x.stride(1);
      if constexpr (std::is_same_v<E, Eigen::half>)
        loops.widen_fp16(src, m, y);
      else if constexpr (std::is_same_v<E, Eigen::bfloat16>)
        loops.widen_bf16(src, m, y);
      else
        for (index_t e = 0; e < m; ++e) y[e] = static_cast<C>(src[e]);
    } else {
      for (index_t e = 0; e < m; ++e) y[e] = static_cast<C>(x(row, e0 + e));
    }
  }

  /// out(b, h, i, e0 .. e0 + m - 1) = x[0, m) rounded to T (a half type), by the path's
  /// vector conversion when out's rows are contiguous: each output is rounded once, here.
  void store_out(index_t b, index_t h, index_t i, index_t e0, const C* x, index_t m) const {
    if (out.stride(3) == 1 || m == 1) {
      T* dst = &out(b, h, i, e0);
      if constexpr (std::is_same_v<T, Eigen::half>)
        loops.narrow_fp16(x, m, dst);
      else
        loops.narrow_bf16(x, m, dst);
    } else {
      for (index_t e = 0; e < m; ++e) out(b, h, i, e0 + e) = static_cast<T>(x[e]);
    }
  }

  /// The row path's products on keys or values of type E: C, or KV read in place.
  template <class E>
  void row_scores(const C* qrow, const E* keys, index_t ldk, index_t n, C* s) const {
    if constexpr (std::is_same_v<E, C>)
      loops.row_scores(qrow, keys, ldk, shape.head_dim, n, s);
    else if constexpr (std::is_same_v<E, Eigen::half>)
      loops.row_scores_fp16(qrow, keys, ldk, shape.head_dim, n, s);
    else if constexpr (std::is_same_v<E, Eigen::bfloat16>)
      loops.row_scores_bf16(qrow, keys, ldk, shape.head_dim, n, s);
    else
      quant().rows_scores(qrow, 0, 1, keys, ldk, shape.head_dim, n, s, 0);
  }
  template <class E>
  void row_values(const C* p, const E* values, index_t ldv, index_t n, C corr, C* acc) const {
    if constexpr (std::is_same_v<E, C>)
      loops.row_values(p, values, ldv, shape.value_dim, n, corr, acc);
    else if constexpr (std::is_same_v<E, Eigen::half>)
      loops.row_values_fp16(p, values, ldv, shape.value_dim, n, corr, acc);
    else if constexpr (std::is_same_v<E, Eigen::bfloat16>)
      loops.row_values_bf16(p, values, ldv, shape.value_dim, n, corr, acc);
    else
      quant().rows_values(p, 0, 1, values, ldv, shape.value_dim, n, &corr, acc, 0);
  }
  /// The same for `rows` query rows sharing the keys and values (quantized blocks: each
  /// block's codes are converted once for all of them; the bits are row_scores' and
  /// row_values' for each row).
  void rows_scores(const C* qrows, index_t rows, const KV* keys, index_t ldk, index_t n, C* s,
                   index_t lds) const {
    quant().rows_scores(qrows, shape.head_dim, rows, keys, ldk, shape.head_dim, n, s, lds);
  }
  void rows_values(const C* p, index_t ldp, index_t rows, const KV* values, index_t ldv, index_t n,
                   const C* corr, C* acc) const {
    quant().rows_values(p, ldp, rows, values, ldv, shape.value_dim, n, corr, acc, shape.value_dim);
  }

  /// The path's loops on blocks of type KV (KV a quantized block type).
  const auto& quant() const {
    if constexpr (std::is_same_v<KV, q4_block>)
      return loops.q4;
    else
      return loops.q8;
  }

 private:
  void widen(const KV* x, index_t n, C* y) const {
    if constexpr (std::is_same_v<KV, Eigen::half>)
      loops.widen_fp16(x, n, y);
    else
      loops.widen_bf16(x, n, y);
  }
};

/// The per-query state a unit ends with: running max m, sum l and the unnormalised output,
/// read through acc(i, e) whatever the path's layout.
template <class T>
struct unit_state {
  const T* m;
  const T* l;
  const T* acc;
  index_t acc_row, acc_col;  ///< acc(i, e) = acc[i * acc_row + e * acc_col]
  T operator()(index_t i, index_t e) const noexcept { return acc[i * acc_row + e * acc_col]; }
};

/// The shift used for query rows with running max m: m itself, or 0 while every key seen so far
/// was masked (m = -inf), so that exp(-inf - shift) is 0 and not NaN.
template <class T>
T safe_shift(T m) noexcept {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

/// max(a, b), or NaN when either is NaN.
template <class T>
T max_nan(T a, T b) noexcept {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

/// exp(x) flushed to 0 below the smallest normal number, like simd::exp_flushed.
template <class T>
T exp_flushed(T x) noexcept {
  const T e = std::exp(x);
  return e < std::numeric_limits<T>::min() ? T(0) : e;
}

/// The online-softmax correction exp(m_old - shift), without calling exp in the two common
/// cases: the first tile of a row (m_old = -inf) and a tile that leaves the max unchanged.
template <class T>
T correction(T m_old, T m_new, T shift) noexcept {
  if (m_old == -std::numeric_limits<T>::infinity()) return T(0);
  if (m_old == m_new && m_new == shift) return T(1);
  return exp_flushed(m_old - shift);
}

/// The query rows of one work item: `heads` query heads from h0, which share one key/value
/// head (the row path of grouped-query attention reads each key and value once for all of
/// them; elsewhere heads = 1), and queries [i0, i0 + mq) of each. Row r is head h0 + r / mq,
/// query i0 + r % mq.
struct item_rows {
  index_t b, h0, heads, i0, mq;
  index_t count() const noexcept { return heads * mq; }
  index_t head(index_t r) const noexcept { return h0 + r / mq; }
  index_t query(index_t r) const noexcept { return i0 + r % mq; }
};

/// y[c * ldy + r] = x[r * ldx + c] · scale_c for r < rows and c < cols, with scale_c = scale[c]
/// (or `factor` where scale is null): a scaled transpose, the lanes path's Qᵀ and its output.
/// Float runs in 4 x 4 blocks through SSE registers (every x86-64 CPU has them), each product
/// the scalar loop's; the edges and other types element by element.
template <class C>
void transpose_scaled(const C* x, index_t ldx, index_t rows, index_t cols, const C* scale, C factor,
                      C* y, index_t ldy) {
  index_t c0 = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<C, float>) {
    for (; c0 + 4 <= cols; c0 += 4) {
      const __m128 f = scale ? _mm_loadu_ps(scale + c0) : _mm_set1_ps(factor);
      index_t r0 = 0;
      for (; r0 + 4 <= rows; r0 += 4) {
        __m128 a = _mm_loadu_ps(x + r0 * ldx + c0), b = _mm_loadu_ps(x + (r0 + 1) * ldx + c0),
               c = _mm_loadu_ps(x + (r0 + 2) * ldx + c0), d = _mm_loadu_ps(x + (r0 + 3) * ldx + c0);
        _MM_TRANSPOSE4_PS(a, b, c, d);  // a holds column c0 of rows r0 .. r0 + 3, and so on
        _mm_storeu_ps(y + c0 * ldy + r0, _mm_mul_ps(a, _mm_shuffle_ps(f, f, 0x00)));
        _mm_storeu_ps(y + (c0 + 1) * ldy + r0, _mm_mul_ps(b, _mm_shuffle_ps(f, f, 0x55)));
        _mm_storeu_ps(y + (c0 + 2) * ldy + r0, _mm_mul_ps(c, _mm_shuffle_ps(f, f, 0xAA)));
        _mm_storeu_ps(y + (c0 + 3) * ldy + r0, _mm_mul_ps(d, _mm_shuffle_ps(f, f, 0xFF)));
      }
      for (; r0 < rows; ++r0)
        for (index_t c = c0; c < c0 + 4; ++c)
          y[c * ldy + r0] = x[r0 * ldx + c] * (scale ? scale[c] : factor);
    }
  }
#endif
  for (index_t c = c0; c < cols; ++c) {
    const C f = scale ? scale[c] : factor;
    for (index_t r = 0; r < rows; ++r) y[c * ldy + r] = x[r * ldx + c] * f;
  }
}

/// The same transpose of 32-bit words, as bits (no arithmetic): word c of row r, at byte
/// x + r * ldx_bytes + 4 * c, goes to word c * ldy + r of y. The bf16 lanes path's query pairs:
/// a pair of bf16 is one word. Rows need not be 4-byte aligned.
inline void transpose_words(const unsigned char* x, index_t ldx_bytes, index_t rows, index_t cols,
                            unsigned char* y, index_t ldy) {
  const auto at = [&](index_t r, index_t c) { return x + r * ldx_bytes + 4 * c; };
  index_t c0 = 0;
#if defined(__SSE2__)
  for (; c0 + 4 <= cols; c0 += 4) {
    index_t r0 = 0;
    for (; r0 + 4 <= rows; r0 += 4) {
      // Shuffles move bits: a NaN or subnormal pattern in a word comes out as it went in.
      __m128 a = _mm_loadu_ps(reinterpret_cast<const float*>(at(r0, c0))),
             b = _mm_loadu_ps(reinterpret_cast<const float*>(at(r0 + 1, c0))),
             c = _mm_loadu_ps(reinterpret_cast<const float*>(at(r0 + 2, c0))),
             d = _mm_loadu_ps(reinterpret_cast<const float*>(at(r0 + 3, c0)));
      _MM_TRANSPOSE4_PS(a, b, c, d);
      _mm_storeu_ps(reinterpret_cast<float*>(y + 4 * (c0 * ldy + r0)), a);
      _mm_storeu_ps(reinterpret_cast<float*>(y + 4 * ((c0 + 1) * ldy + r0)), b);
      _mm_storeu_ps(reinterpret_cast<float*>(y + 4 * ((c0 + 2) * ldy + r0)), c);
      _mm_storeu_ps(reinterpret_cast<float*>(y + 4 * ((c0 + 3) * ldy + r0)), d);
    }
    for (; r0 < rows; ++r0)
      for (index_t c = c0; c < c0 + 4; ++c) std::memcpy(y + 4 * (c * ldy + r0), at(r0, c), 4);
  }
#endif
  for (index_t c = c0; c < cols; ++c)
    for (index_t r = 0; r < rows; ++r) std::memcpy(y + 4 * (c * ldy + r), at(r, c), 4);
}

/// Elements of a query or output row a half-precision call converts at a time, on the stack.
inline constexpr index_t half_chunk = 64;

// ---- the lanes path: a tile of queries in SIMD lanes ------------------------------------------

template <class T, class KV>
class lanes_unit {
  using C = compute_t<T>;

 public:
  lanes_unit(const tiled_job<T, KV>& job, tile_scratch<C>& ws, index_t b, index_t h, index_t i0,
             index_t mq)
      : job_(job),
        ws_(ws),
        b_(b),
        h_(h),
        i0_(i0),
        mq_(mq),
        w_(job.plan.width),
        packets_(w_ / job.plan.lanes),
        k_(job.k.select(0, b).select(0, h / job.group)),
        v_(job.v.select(0, b).select(0, h / job.group)) {
    const attention_shape& s = job.shape;
    const auto q = job.q.select(0, b).select(0, h);
    if constexpr (bf16_call)
      if (job.products) pack_query_pairs(q);
    // Qᵀ [Dk, W] with the scale folded in; lanes past the tile's last query stay 0.
    qt_ = at_least(ws.qt, s.head_dim * w_);
    if (pairs_) {
      // the scores scale QP's products instead
    } else if constexpr (std::is_same_v<T, C>) {
      if (q.stride(1) == 1) {
        transpose_scaled<C>(q.data() + i0 * q.stride(0), q.stride(0), mq, s.head_dim, nullptr,
                            job.scale, qt_, w_);
      } else {
        for (index_t d = 0; d < s.head_dim; ++d) {
          C* row = qt_ + d * w_;
          for (index_t i = 0; i < mq; ++i) row[i] = job.scale * q(i0 + i, d);
        }
      }
    } else {  // half queries: each row widened by the path's conversion, a chunk at a time
      C buf[half_chunk];
      for (index_t i = 0; i < mq; ++i)
        for (index_t d0 = 0; d0 < s.head_dim; d0 += half_chunk) {
          const index_t m = std::min(half_chunk, s.head_dim - d0);
          job.widen_row(q, i0 + i, d0, m, buf);
          for (index_t d = 0; d < m; ++d) qt_[(d0 + d) * w_ + i] = job.scale * buf[d];
        }
    }
    if (!pairs_)
      for (index_t d = 0; d < s.head_dim; ++d)
        std::fill(qt_ + d * w_ + mq, qt_ + (d + 1) * w_, C(0));
    s_ = at_least(ws.s, job.plan.kv_tile * w_);
    ot_ = at_least(ws.acc, s.value_dim * w_);
    m_ = at_least(ws.stats, 3 * w_);
    l_ = m_ + w_;
    corr_ = l_ + w_;
    // Keys past the last one any query of the tile may see (key padding, causal) are skipped.
    key_limit_ = 0;
    for (index_t i = 0; i < mq; ++i) key_limit_ = std::max(key_limit_, job.mask.key_end(b, i0 + i));
  }

  /// Runs keys [kbeg, kend) through the online softmax.
  unit_state<C> run(index_t kbeg, index_t kend) {
    const attention_shape& s = job_.shape;
    std::fill(m_, m_ + w_, -std::numeric_limits<C>::infinity());
    std::fill(l_, l_ + w_, C(0));
    std::fill(ot_, ot_ + s.value_dim * w_, C(0));
    kend = std::min(kend, key_limit_);
    for (index_t j0 = kbeg; j0 < kend; j0 += job_.plan.kv_tile) {
      const index_t n = std::min(job_.plan.kv_tile, kend - j0);
      if (!scores(j0, n)) continue;
      job_.loops.online_softmax_tile(s_, w_, n, packets_, m_, l_, corr_);
      if constexpr (bf16_call) {
        if (pairs_) {
          pair_values(j0, n);
          continue;
        }
      }
      index_t ldv = 0;
      const C* v = job_.rows_of(v_, j0, n, ws_.v_copy, ldv, job_.shape.value_dim);
      job_.loops.tile_values(n, packets_, v, ldv, s_, w_, s.value_dim, corr_, ot_, w_);
    }
    return {m_, l_, ot_, 1, w_};
  }

  /// Writes the attention weights of the tile's queries for every key, recomputing the scores
  /// tile by tile: exp(s - m) / l, as naive_attention gives them.
  void write_weights(const tensor_view<C, 4>& weights) {
    const index_t kv_len = job_.shape.kv_len;
    for (index_t i = 0; i < mq_; ++i) {  // shift and 1/l per query, kept in corr
      m_[i] = safe_shift(m_[i]);
      corr_[i] = l_[i] == C(0) ? C(0) : C(1) / l_[i];
    }
    for (index_t j0 = 0; j0 < kv_len; j0 += job_.plan.kv_tile) {
      const index_t n = std::min(job_.plan.kv_tile, kv_len - j0);
      // Keys past key_limit_ are never read; they and skipped tiles weigh 0, or NaN in a NaN
      // row (1/l is NaN there).
      const index_t nk = std::max<index_t>(0, std::min(n, key_limit_ - j0));
      const bool live = nk > 0 && scores(j0, nk);
      for (index_t i = 0; i < mq_; ++i)
        for (index_t j = 0; j < n; ++j)
          weights(b_, h_, i0_ + i, j0 + j) =
              (live && j < nk ? exp_flushed(s_[j * w_ + i] - m_[i]) : C(0)) * corr_[i];
    }
  }

 private:
  // Sᵀ for keys [j0, j0 + n) with the masks applied; false when the masks forbid the whole
  // tile (nothing computed).
  bool scores(index_t j0, index_t n) {
    const mask_plan<T>& mask = job_.mask;
    if (!mask.allows_any(b_, h_, i0_, mq_, j0, n)) return false;
    bool done = false;
    if constexpr (bf16_call) {
      if (pairs_) {
        pair_scores(j0, n);
        done = true;
      }
    }
    if (!done) {
      index_t ldk = 0;
      const C* k = job_.rows_of(k_, j0, n, ws_.k_copy, ldk, job_.shape.head_dim);
      job_.loops.tile_scores(n, packets_, k, ldk, qt_, w_, job_.shape.head_dim, s_, w_);
    }
    if (mask.has_elementwise()) {
      for (index_t i = 0; i < mq_; ++i) mask.apply(b_, h_, i0_ + i, j0, s_ + i, n, w_);
    } else if (mask.any()) {  // key padding and causal: only the keys past each query's end
      for (index_t i = 0; i < mq_; ++i) {
        const index_t end = mask.key_end(b_, i0_ + i);
        for (index_t j = std::max<index_t>(end - j0, 0); j < n; ++j)
          s_[j * w_ + i] = -std::numeric_limits<C>::infinity();
      }
    }
    return true;
  }

  // ---- the bf16-product loops (detail/bf16_products.inl): QP, K pairs, VP and PP ----

  static constexpr bool bf16_call =
      std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<KV, Eigen::bfloat16>;

  // QP [⌈Dk/2⌉][W][2] from the tile's queries, unscaled (the scores are scaled); the other
  // pair arrays' places in ws_.pairs, which reserve_team_scratch sized.
  void pack_query_pairs(const tensor_view<const T, 2>& q) {
    const attention_shape& s = job_.shape;
    const pair_scratch_layout at(job_.plan, s);
    dpairs_ = at.k_row / 2;
    qp_ = ws_.pairs.data();
    kp_ = qp_ + at.k;
    vp_ = qp_ + at.v;
    pp_ = qp_ + at.p;
    std::fill(qp_, kp_, Eigen::bfloat16(0.0f));
    index_t d0 = 0;
    if (q.stride(1) == 1) {  // whole pairs are words of a contiguous row: transposed as bits
      d0 = s.head_dim / 2 * 2;
      transpose_words(reinterpret_cast<const unsigned char*>(q.data() + i0_ * q.stride(0)),
                      index_t(sizeof(T)) * q.stride(0), mq_, d0 / 2,
                      reinterpret_cast<unsigned char*>(qp_), w_);
    }
    for (index_t i = 0; i < mq_; ++i)
      for (index_t d = d0; d < s.head_dim; ++d) qp_[d / 2 * 2 * w_ + 2 * i + d % 2] = q(i0_ + i, d);
    pairs_ = true;
  }

  // Sᵀ for keys [j0, j0 + n), before the masks: K read in place when its rows are contiguous
  // and of whole pairs (Dk even), else copied with a zero after an odd Dk.
  void pair_scores(index_t j0, index_t n) {
    const index_t dk = job_.shape.head_dim;
    const Eigen::bfloat16* k = kp_;
    index_t ldk = 2 * dpairs_;
    if (k_.stride(1) == 1 && dk % 2 == 0) {
      k = k_.data() + j0 * k_.stride(0);
      ldk = k_.stride(0);
    } else {
      for (index_t j = 0; j < n; ++j) {
        for (index_t d = 0; d < dk; ++d) kp_[j * ldk + d] = k_(j0 + j, d);
        if (dk % 2 != 0) kp_[j * ldk + dk] = Eigen::bfloat16(0.0f);
      }
    }
    job_.products->tile_scores(n, packets_, k, ldk, qp_, 2 * w_, dpairs_, job_.scale, s_, w_);
  }

  // Oᵀ += V · P for keys [j0, j0 + n) through VP and PP (P rounded to bf16).
  void pair_values(index_t j0, index_t n) {
    const index_t dv = job_.shape.value_dim;
    job_.products->round_probabilities(s_, w_, n, packets_, pp_, 2 * w_);
    if (v_.stride(1) == 1 || dv <= 1) {
      job_.products->pack_pairs(v_.data() + j0 * v_.stride(0), v_.stride(0), n, dv, vp_);
    } else {
      for (index_t j = 0; j < n; ++j)
        for (index_t e = 0; e < dv; ++e) vp_[j / 2 * 2 * dv + 2 * e + j % 2] = v_(j0 + j, e);
      if (n % 2 != 0)
        for (index_t e = 0; e < dv; ++e) vp_[n / 2 * 2 * dv + 2 * e + 1] = Eigen::bfloat16(0.0f);
    }
    job_.products->tile_values((n + 1) / 2, packets_, vp_, 2 * dv, pp_, 2 * w_, dv, corr_, ot_, w_);
  }

  const tiled_job<T, KV>& job_;
  tile_scratch<C>& ws_;
  index_t b_, h_, i0_, mq_, w_, packets_;
  tensor_view<const KV, 2> k_, v_;
  C *qt_, *s_, *ot_, *m_, *l_, *corr_;
  index_t key_limit_;
  bool pairs_ = false;  // the bf16-product loops run this unit
  index_t dpairs_ = 0;
  Eigen::bfloat16 *qp_ = nullptr, *kp_ = nullptr, *vp_ = nullptr, *pp_ = nullptr;
};

// ---- the row path: fewer queries than one packet has lanes ------------------------------------
// With a handful of queries (a decoder step has one) the lanes path would leave most lanes
// idle. Here each query row runs on its own: its scores are one matrix-vector product over the
// key tile (vectorised along Dk) and its output another (vectorised along Dv).

template <class T, class KV>
class row_unit {
  using C = compute_t<T>;

 public:
  row_unit(const tiled_job<T, KV>& job, tile_scratch<C>& ws, const item_rows& rows)
      : job_(job),
        ws_(ws),
        rows_(rows),
        b_(rows.b),
        nr_(rows.count()),
        k_(job.k.select(0, rows.b).select(0, rows.h0 / job.group)),
        v_(job.v.select(0, rows.b).select(0, rows.h0 / job.group)) {
    const attention_shape& s = job.shape;
    qs_ = at_least(ws.qt, nr_ * s.head_dim);
    for (index_t r = 0; r < nr_; ++r) {
      C* row = qs_ + r * s.head_dim;
      job.widen_row(job.q.select(0, b_).select(0, rows.head(r)), rows.query(r), 0, s.head_dim, row);
      for (index_t d = 0; d < s.head_dim; ++d) row[d] *= job.scale;
    }
    lds_ = job.plan.kv_tile + job.plan.lanes;  // room for online_softmax_row
    s_ = at_least(ws.s, row_chunk * lds_);
    acc_ = at_least(ws.acc, nr_ * s.value_dim);
    m_ = at_least(ws.stats, 2 * nr_);
    l_ = m_ + nr_;
    // Keys and values of a half type with contiguous rows are read in place, each load
    // widened in registers: a decoder step reads half the bytes of float and copies nothing.
    // Quantized blocks are always read in place (their rows' blocks are contiguous).
    if constexpr (is_quant_block_v<KV>)
      in_place_ = true;
    else if constexpr (!std::is_same_v<KV, C>)
      in_place_ =
          (k_.stride(1) == 1 || k_.extent(1) <= 1) && (v_.stride(1) == 1 || v_.extent(1) <= 1);
  }

  unit_state<C> run(index_t kbeg, index_t kend) {
    const attention_shape& s = job_.shape;
    std::fill(m_, m_ + nr_, -std::numeric_limits<C>::infinity());
    std::fill(l_, l_ + nr_, C(0));
    std::fill(acc_, acc_ + nr_ * s.value_dim, C(0));
    // Keys past the last one any row may see (key padding, causal) are never read.
    const index_t key_limit = row_key_limit();
    kend = std::min(kend, key_limit);
    for (index_t j0 = kbeg; j0 < kend; j0 += job_.plan.kv_tile) {
      const index_t n = std::min(job_.plan.kv_tile, kend - j0);
      if (in_place_) {
        tile(j0, n, k_.data() + j0 * k_.stride(0), k_.stride(0), v_.data() + j0 * v_.stride(0),
             v_.stride(0));
      } else {
        index_t ldk = 0, ldv = 0;
        const C* k = job_.rows_of(k_, j0, n, ws_.k_copy, ldk, job_.shape.head_dim);
        const C* v = job_.rows_of(v_, j0, n, ws_.v_copy, ldv, job_.shape.value_dim);
        tile(j0, n, k, ldk, v, ldv);
      }
    }
    return {m_, l_, acc_, s.value_dim, 1};
  }

  void write_weights(const tensor_view<C, 4>& weights) {
    const index_t kv_len = job_.shape.kv_len;
    const index_t key_limit = row_key_limit();
    for (index_t j0 = 0; j0 < kv_len; j0 += job_.plan.kv_tile) {
      const index_t n = std::min(job_.plan.kv_tile, kv_len - j0);
      const index_t nk = std::max<index_t>(0, std::min(n, key_limit - j0));  // keys to read
      index_t ldk = 0;
      const C* k = nk > 0 && !in_place_
                       ? job_.rows_of(k_, j0, nk, ws_.k_copy, ldk, job_.shape.head_dim)
                       : nullptr;
      for (index_t r = 0; r < nr_; ++r) {
        const index_t h = rows_.head(r), i = rows_.query(r);
        const C shift = safe_shift(m_[r]);
        const C inv_l = l_[r] == C(0) ? C(0) : C(1) / l_[r];
        // Keys past the row's end (key padding, causal) are not read: weight 0, or NaN in a
        // NaN row (inv_l is NaN there).
        const index_t ni = std::max<index_t>(0, std::min(n, job_.mask.key_end(b_, i) - j0));
        if (ni > 0 && in_place_)
          scores(r, j0, ni, k_.data() + j0 * k_.stride(0), k_.stride(0));
        else if (ni > 0)
          scores(r, j0, ni, k, ldk);
        for (index_t j = 0; j < ni; ++j)
          weights(b_, h, i, j0 + j) = exp_flushed(s_[j] - shift) * inv_l;
        for (index_t j = ni; j < n; ++j) weights(b_, h, i, j0 + j) = C(0) * inv_l;
      }
    }
  }

 private:
  // Keys and values [j0, j0 + n) (of type E: C, or KV read in place) through each query row's
  // online softmax.
  template <class E>
  void tile(index_t j0, index_t n, const E* k, index_t ldk, const E* v, index_t ldv) {
    const index_t dv = job_.shape.value_dim;
    if constexpr (is_quant_block_v<E>) {
      if (nr_ > 1 && same_key_end()) return tile_rows(j0, n, k, ldk, v, ldv);
    }
    for (index_t r = 0; r < nr_; ++r) {
      const index_t ni = std::min(n, job_.mask.key_end(b_, rows_.query(r)) - j0);  // keys it sees
      if (ni <= 0) continue;
      scores(r, j0, ni, k, ldk);
      C m_new, sum;
      job_.loops.online_softmax_row(s_, ni, m_[r], m_new, sum);
      const C corr = correction(m_[r], m_new, safe_shift(m_new));
      l_[r] = corr * l_[r] + sum;
      m_[r] = m_new;
      job_.row_values(s_, v, ldv, ni, corr, acc_ + r * dv);
    }
  }

  // The same for rows that all see the same keys (the query heads of a grouped-query item at
  // one query position), row_chunk rows at a time: each block of keys and values is converted
  // once per chunk instead of once per row, and every row's arithmetic (so its bits) is the
  // loop above's.
  void tile_rows(index_t j0, index_t n, const KV* k, index_t ldk, const KV* v, index_t ldv) {
    const index_t ni = std::min(n, job_.mask.key_end(b_, rows_.query(0)) - j0);
    if (ni <= 0) return;
    const index_t dv = job_.shape.value_dim, hd = job_.shape.head_dim;
    for (index_t r0 = 0; r0 < nr_; r0 += row_chunk) {
      const index_t rows = std::min(row_chunk, nr_ - r0);
      job_.rows_scores(qs_ + r0 * hd, rows, k, ldk, ni, s_, lds_);
      C corr[row_chunk];
      for (index_t g = 0; g < rows; ++g) {
        const index_t r = r0 + g;
        C* sg = s_ + g * lds_;
        if (job_.mask.any()) job_.mask.apply(b_, rows_.head(r), rows_.query(r), j0, sg, ni);
        C m_new, sum;
        job_.loops.online_softmax_row(sg, ni, m_[r], m_new, sum);
        corr[g] = correction(m_[r], m_new, safe_shift(m_new));
        l_[r] = corr[g] * l_[r] + sum;
        m_[r] = m_new;
      }
      job_.rows_values(s_, lds_, rows, v, ldv, ni, corr, acc_ + r0 * dv);
    }
  }

  // Whether every row of the item sees the same keys (masks aside, which apply per row).
  bool same_key_end() const {
    const index_t end = job_.mask.key_end(b_, rows_.query(0));
    for (index_t r = 1; r < nr_; ++r)
      if (job_.mask.key_end(b_, rows_.query(r)) != end) return false;
    return true;
  }

  // Row r's scores against keys [j0, j0 + n), masks applied, into s_.
  template <class E>
  void scores(index_t r, index_t j0, index_t n, const E* k, index_t ldk) {
    job_.row_scores(qs_ + r * job_.shape.head_dim, k, ldk, n, s_);
    if (job_.mask.any()) job_.mask.apply(b_, rows_.head(r), rows_.query(r), j0, s_, n);
  }

  // One past the last key any row may see.
  index_t row_key_limit() const {
    index_t limit = 0;
    for (index_t i = 0; i < rows_.mq; ++i)
      limit = std::max(limit, job_.mask.key_end(b_, rows_.i0 + i));
    return limit;
  }

  const tiled_job<T, KV>& job_;
  tile_scratch<C>& ws_;
  item_rows rows_;
  index_t b_, nr_;
  tensor_view<const KV, 2> k_, v_;
  C *qs_, *s_, *acc_, *m_, *l_;
  index_t lds_ = 0;        // between the score rows of tile_rows
  bool in_place_ = false;  // for C, rows_of reads contiguous rows in place itself
};

// ---- units, partial results and the merge ------------------------------------------------------

/// out = acc / l and lse = m + log(l) for the unit's queries; a query with l = 0 (every key
/// masked) gets zeros and -inf. The output is rounded to T here, once.
template <class T, class KV, class C>
void write_output(const tiled_job<T, KV>& job, const item_rows& rows, const unit_state<C>& st) {
  const index_t b = rows.b, dv = job.shape.value_dim;
  // A lanes unit's Oᵀ [Dv, W] into one head's contiguous output rows: transposed 4 x 4 (the
  // same products as below), a block of rows at a time.
  bool written = false;
  if constexpr (std::is_same_v<T, C>) {
    if (st.acc_row == 1 && rows.heads == 1 && job.out.stride(3) == 1 && dv > 0) {
      constexpr index_t block = 64;
      C inv_l[block];
      for (index_t r0 = 0; r0 < rows.mq; r0 += block) {
        const index_t n = std::min(block, rows.mq - r0);
        for (index_t r = 0; r < n; ++r)
          inv_l[r] = st.l[r0 + r] == C(0) ? C(0) : C(1) / st.l[r0 + r];
        transpose_scaled<C>(st.acc + r0, st.acc_col, dv, n, inv_l, C(0),
                            &job.out(b, rows.h0, rows.i0 + r0, 0), job.out.stride(2));
      }
      written = true;
    }
  }
  for (index_t r = 0; r < rows.count(); ++r) {
    const index_t h = rows.head(r), i = rows.query(r);
    const C l = st.l[r];
    const C inv_l = l == C(0) ? C(0) : C(1) / l;
    if constexpr (std::is_same_v<T, C>) {
      if (!written)
        for (index_t e = 0; e < dv; ++e) job.out(b, h, i, e) = st(r, e) * inv_l;
    } else if (st.acc_row == 1 && rows.heads == 1) {
      // A lanes unit's Oᵀ [Dv, W]: 4 rows at a time transposed into rows of C (the same
      // products as below), each row then rounded to T by the path's conversion.
      if (r % 4 == 0) {
        const index_t n = std::min<index_t>(4, rows.count() - r);
        C inv[4], buf[4 * half_chunk];
        for (index_t c = 0; c < n; ++c) inv[c] = st.l[r + c] == C(0) ? C(0) : C(1) / st.l[r + c];
        for (index_t e0 = 0; e0 < dv; e0 += half_chunk) {
          const index_t m = std::min(half_chunk, dv - e0);
          transpose_scaled<C>(st.acc + e0 * st.acc_col + r, st.acc_col, m, n, inv, C(0), buf,
                              half_chunk);
          for (index_t c = 0; c < n; ++c)
            job.store_out(b, h, rows.query(r + c), e0, buf + c * half_chunk, m);
        }
      }
    } else {
      C buf[half_chunk];
      for (index_t e0 = 0; e0 < dv; e0 += half_chunk) {
        const index_t m = std::min(half_chunk, dv - e0);
        for (index_t e = 0; e < m; ++e) buf[e] = st(r, e0 + e) * inv_l;
        job.store_out(b, h, i, e0, buf, m);
      }
    }
    if (job.opts.lse_out)
      (*job.opts.lse_out)(b, h, i) =
          l == C(0) ? -std::numeric_limits<C>::infinity() : st.m[r] + std::log(l);
  }
}

template <class T, class KV>
compute_t<T>* partial_block(const tiled_job<T, KV>& job, index_t unit) {
  return job.partials + unit * partial_stride<compute_t<T>>(job.plan, job.shape);
}

template <class T, class KV, class Unit>
void finish_unit(const tiled_job<T, KV>& job, Unit& unit, index_t u, const item_rows& rows,
                 index_t split) {
  using C = compute_t<T>;
  const tiled_plan& p = job.plan;
  const index_t kbeg = split * p.split_len;
  const unit_state<C> st = unit.run(kbeg, std::min(job.shape.kv_len, kbeg + p.split_len));
  if (p.splits == 1) {
    write_output(job, rows, st);
    if (job.opts.weights_out) unit.write_weights(*job.opts.weights_out);
    return;
  }
  C* part = partial_block(job, u);  // m [nr], l [nr], acc [nr, Dv] for the item's nr rows
  const index_t dv = job.shape.value_dim, nr = rows.count();
  for (index_t r = 0; r < nr; ++r) {
    part[r] = st.m[r];
    part[nr + r] = st.l[r];
    for (index_t e = 0; e < dv; ++e) part[2 * nr + r * dv + e] = st(r, e);
  }
}

/// Splits of one item merged in split order: with M the largest split max,
///   l = Σ_s exp(m_s - M) l_s,   acc = Σ_s exp(m_s - M) acc_s,   out = acc / l.
template <class T, class KV>
void merge_item(const tiled_job<T, KV>& job, int thread, index_t item, const item_rows& rows) {
  using C = compute_t<T>;
  const index_t dv = job.shape.value_dim, splits = job.plan.splits, nr = rows.count();
  const index_t b = rows.b;
  C* acc = job.scratch(thread).acc.data();
  for (index_t i = 0; i < nr; ++i) {
    const index_t h = rows.head(i), qi = rows.query(i);
    C big = -std::numeric_limits<C>::infinity();
    for (index_t sp = 0; sp < splits; ++sp)
      big = max_nan(big, partial_block(job, item * splits + sp)[i]);
    const C shift = safe_shift(big);
    C l = 0;
    std::fill(acc, acc + dv, C(0));
    for (index_t sp = 0; sp < splits; ++sp) {
      const C* part = partial_block(job, item * splits + sp);
      const C w = exp_flushed(part[i] - shift);
      l += w * part[nr + i];
      for (index_t e = 0; e < dv; ++e) acc[e] += w * part[2 * nr + i * dv + e];
    }
    const C inv_l = l == C(0) ? C(0) : C(1) / l;
    if constexpr (std::is_same_v<T, C>) {
      for (index_t e = 0; e < dv; ++e) job.out(b, h, qi, e) = acc[e] * inv_l;
    } else {
      for (index_t e = 0; e < dv; ++e) acc[e] *= inv_l;
      job.store_out(b, h, qi, 0, acc, dv);
    }
    if (job.opts.lse_out)
      (*job.opts.lse_out)(b, h, qi) =
          l == C(0) ? -std::numeric_limits<C>::infinity() : big + std::log(l);
  }
}

/// The rows of work item `item`. Items run batch, then head group (plan.heads_per_item query
/// heads), then query tile.
template <class T, class KV>
item_rows rows_of_item(const tiled_job<T, KV>& job, index_t item) {
  const tiled_plan& p = job.plan;
  const index_t groups = job.shape.num_heads / p.heads_per_item;
  const index_t i0 = item % p.q_tiles * p.q_tile;
  return {item / (groups * p.q_tiles), item / p.q_tiles % groups * p.heads_per_item,
          p.heads_per_item, i0, std::min(p.q_tile, job.shape.q_len - i0)};
}

/// Work unit u: item u / splits, key range u % splits.
template <class T, class KV>
void run_unit(const tiled_job<T, KV>& job, int thread, index_t u) {
  const tiled_plan& p = job.plan;
  const index_t item = u / p.splits, split = u % p.splits;
  const item_rows rows = rows_of_item(job, item);
  tile_scratch<compute_t<T>>& ws = job.scratch(thread);
  if (p.rows) {
    row_unit<T, KV> unit(job, ws, rows);
    finish_unit(job, unit, u, rows, split);
  } else {
    lanes_unit<T, KV> unit(job, ws, rows.b, rows.h0, rows.i0, rows.mq);
    finish_unit(job, unit, u, rows, split);
  }
}

template <class T, class KV>
void run_merge(const tiled_job<T, KV>& job, int thread, index_t item) {
  merge_item(job, thread, item, rows_of_item(job, item));
}

/// Runs one tiled_attention call: T is the element type of q, out and opts, KV that of k and v.
/// What a call of shape s runs with: its path's loops, its plan, the bf16-product loops (or
/// null) and its team's scratch, reserved in full on the calling thread before any thread
/// starts (a later call with the same plan allocates nothing).
template <class C>
struct tiled_setup {
  const tile_kernels<C>* loops;
  tiled_plan plan;
  const bf16_product_kernels* products;
  team_scratch<C>* team;
};
template <class T, class KV>
tiled_setup<compute_t<T>> prepare_tiled(const attention_shape& s, const tensor_view<const KV, 4>& k,
                                        const tensor_view<const KV, 4>& v, bool need_weights,
                                        const tile_options& tiles) {
  using C = compute_t<T>;
  const cpu_level level = active_level();
  const tile_kernels<C>& loops = kernels_for<C>(level);
  const tiled_plan plan = make_tiled_plan<C>(s, tiles, need_weights, loops.lanes);
  const bf16_product_kernels* products = nullptr;
  if constexpr (std::is_same_v<T, Eigen::bfloat16> && std::is_same_v<KV, Eigen::bfloat16>)
    if (!plan.rows) products = bf16_products_for(level);
  XATTN_ASSERT(!products || products->lanes == loops.lanes);
  // Keys and values of another type than C are widened into the copies a tile at a time (the
  // lanes path, and the row path on strided rows).
  constexpr bool widen = !std::is_same_v<KV, C>;
  constexpr bool blocks = is_quant_block_v<KV>;  // contiguous in each row (checked on entry)
  const bool strided_k = !blocks && k.stride(3) != 1 && s.head_dim > 1;
  const bool strided_v = !blocks && v.stride(3) != 1 && s.value_dim > 1;
  const bool rows_in_place = plan.rows && !strided_k && !strided_v;  // see row_unit
  // (The bf16-product loops copy into their own pairs, never into these.)
  const bool copy_k = !products && (strided_k || (widen && !rows_in_place));
  const bool copy_v = !products && (strided_v || (widen && !rows_in_place));
  team_scratch<C>& team = reserve_team_scratch<C>(plan, s, copy_k, copy_v, products != nullptr);
  return {&loops, plan, products, &team};
}

/// Reserves the calling thread's scratch for tiled_attention<T>(q, k, v, out, opts, tiles)
/// without computing anything (arguments already checked): a caller that must fail before it
/// commits (the sharded calls, before their ranks exchange data) gets std::bad_alloc here
/// rather than in the call.
template <class T, class KV = T>
void reserve_tiled_attention(const attention_shape& s, const tensor_view<const KV, 4>& k,
                             const tensor_view<const KV, 4>& v, bool need_weights,
                             const tile_options& tiles) {
  if (s.batch == 0 || s.num_heads == 0 || s.q_len == 0) return;
  (void)prepare_tiled<T, KV>(s, k, v, need_weights, tiles);
}

template <class T, class KV>
void run_tiled(const char* fn, const tensor_view<const T, 4>& q, const tensor_view<const KV, 4>& k,
               const tensor_view<const KV, 4>& v, const tensor_view<T, 4>& out,
               const attention_options<T>& opts, const tile_options& tiles) {
  using C = compute_t<T>;
  const attention_problem pr = check_attention_args<T, KV>(fn, q, k, v, out, opts);
  check_tile_options(fn, tiles);
  const attention_shape& s = pr.shape;
  if (s.batch == 0 || s.num_heads == 0 || s.q_len == 0) return;

  const tiled_setup<C> setup = prepare_tiled<T, KV>(s, k, v, opts.weights_out.has_value(), tiles);
  const tile_kernels<C>& loops = *setup.loops;
  const tiled_plan& plan = setup.plan;
  const bf16_product_kernels* products = setup.products;
  team_scratch<C>& team = *setup.team;
  const tiled_job<T, KV> job{q,
                             k,
                             v,
                             out,
                             opts,
                             mask_plan<T>(opts.mask, s),
                             s,
                             pr.group,
                             static_cast<C>(pr.scale),
                             plan,
                             loops,
                             &team,
                             team.partials.data(),
                             products};
  parallel_for(plan.units(), plan.threads,
               [&](index_t u, int thread) { run_unit(job, thread, u); });
  if (plan.splits > 1)
    parallel_for(plan.items, std::min<int>(plan.threads, int(plan.items)),
                 [&](index_t item, int thread) { run_merge(job, thread, item); });
}

}  // namespace detail

/// Bytes of scratch tiled_attention<T> keeps for a call of shape s: per thread, the tiles of
/// Qᵀ, Sᵀ and Oᵀ (and of K and V when their rows are strided or of a half type), plus the
/// per-split partial results when the keys are split. It grows with the tile sizes, Dk and Dv,
/// never with Lq or Lk (splits are bounded, and each partial holds one query tile). The scratch
/// of a call's whole thread team belongs to the calling thread and is reused by its later
/// calls. T may be a half type; the scratch is then float, plus, for bf16 on the avx512bf16
/// path, the bf16 pairs of a query tile, a key tile and a value tile.
template <class T>
index_t tiled_attention_scratch_bytes(const attention_shape& s, const tile_options& tiles = {},
                                      bool need_weights = false) {
  using C = compute_t<T>;
  detail::check_shape("tiled_attention_scratch_bytes", s);
  constexpr const char* fn = "tiled_attention_scratch_bytes";
  const detail::tiled_plan p = detail::make_tiled_plan<C>(s, tiles, need_weights);
  const bool pairs = std::is_same_v<T, Eigen::bfloat16> && !p.rows &&
                     detail::bf16_products_for(detail::active_level()) != nullptr;
  const detail::unit_scratch_sizes n =
      detail::unit_scratch_elements<C>(p, s, !pairs, !pairs, pairs);
  const index_t all =
      detail::checked_mul(fn, index_t(p.threads), n.total()) + detail::partial_elements<C>(p, s);
  return detail::checked_mul(fn, all, index_t(sizeof(C))) +
         detail::checked_mul(fn, detail::checked_mul(fn, index_t(p.threads), n.pairs),
                             index_t(sizeof(Eigen::bfloat16)));
}

/// Scaled dot-product attention with O(tile) scratch; arguments and results as
/// naive_attention (attention_naive.hpp):
///
///   q   [B, H,   Lq, Dk]    queries
///   k   [B, Hkv, Lk, Dk]    keys;   Hkv divides H (grouped-query attention)
///   v   [B, Hkv, Lk, Dv]    values
///   out [B, H,   Lq, Dv]    written; must not overlap the inputs
///
/// Work runs in units of one (batch, head, query tile), on tiles.num_threads OpenMP threads
/// when built with OpenMP. With fewer units than split_target_units the keys are split into
/// ranges as well, and the ranges merged through their log-sum-exp. The output is the same, bit
/// for bit, for every thread count. Tiles whose keys are all masked (key padding, causal, a
/// boolean mask) are skipped. T may be a half type (half.hpp): float arithmetic, the output
/// rounded once, the log-sum-exp and weights in float.
template <class T>
void tiled_attention(detail::identity_t<tensor_view<const T, 4>> q,
                     detail::identity_t<tensor_view<const T, 4>> k,
                     detail::identity_t<tensor_view<const T, 4>> v, tensor_view<T, 4> out,
                     const detail::identity_t<attention_options<T>>& opts = {},
                     const tile_options& tiles = {}) {
  static_assert(is_element_v<T>, "xattn kernels need a floating-point or half element type");
  detail::run_tiled<T, T>("tiled_attention", q, k, v, out, opts, tiles);
}

/// The mixed call: float queries and output against keys and values stored in a half type KV
/// (Eigen::half or Eigen::bfloat16), as a decoder's float activations read a context cache
/// kept in half. K and V are widened to float a tile at a time (the row path of a decoder step
/// reads them in place, widening each load in registers); the arithmetic is the float call's,
/// so the result equals tiled_attention<float> on the widened k and v.
///
/// KV may also be a quantized block type (q8_block, q4_block: quantized.hpp): then k is
/// [B, Hkv, Lk, ceil(Dk / 32)] and v [B, Hkv, Lk, ceil(Dv / 32)] blocks, each row's blocks
/// contiguous (stride(3) = 1), and Dv is out's. The result is the float call's on the
/// dequantized k and v (dequantize: exact): bit for bit on the lanes path (Lq of at least a
/// packet of floats), where tiles are dequantized into scratch; within float rounding on the
/// row path (decoder steps), which reads the blocks in place, each block's codes multiplied in
/// float and then scaled, so the only error the format adds is its own quantization error.
template <
    class T, class KV,
    std::enable_if_t<std::is_same_v<T, float> && (is_half_v<KV> || is_quant_block_v<KV>), int> = 0>
void tiled_attention(detail::identity_t<tensor_view<const T, 4>> q, tensor_view<const KV, 4> k,
                     tensor_view<const KV, 4> v, tensor_view<T, 4> out,
                     const detail::identity_t<attention_options<T>>& opts = {},
                     const tile_options& tiles = {}) {
  detail::run_tiled<T, KV>("tiled_attention", q, k, v, out, opts, tiles);
}

}  // namespace xattn
