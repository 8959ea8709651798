// SPDX-License-Identifier: MIT
// The backward pass of attention: given the forward's inputs, its output and the gradient of a
// loss with respect to that output, the gradients with respect to q, k, v (and the bias).
// naive_attention_backward is the reference and explains the math; tiled_attention_backward
// recomputes the weights tile by tile from the forward's log-sum-exp (FlashAttention-2), so it
// never stores an [Lq, Lk] matrix. Read attention_naive.hpp first for the forward.
#pragma once

#include "xattn/attention_tiled.hpp"
#include "xattn/config.hpp"
#include "xattn/detail/eigen_interop.hpp"
#include "xattn/detail/masking.hpp"
#include "xattn/detail/overlap.hpp"
#include "xattn/detail/softmax.hpp"
#include "xattn/detail/tiling.hpp"
#include "xattn/detail/validate.hpp"
#include "xattn/errors.hpp"
#include "xattn/options.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace xattn {

/// Where the backward kernels write their gradients. Every view is written in full (zeros
/// where nothing flows back) and must not overlap an input, another gradient or itself.
template <class T>
struct attention_grads {
  tensor_view<T, 4> dq;  ///< dL/dq [B, H,   Lq, Dk]
  tensor_view<T, 4> dk;  ///< dL/dk [B, Hkv, Lk, Dk]: the sum over the query heads reading it
  tensor_view<T, 4> dv;  ///< dL/dv [B, Hkv, Lk, Dv]: the sum over the query heads reading it
  /// If set, dL/d(opts.mask.bias), with the bias view's extents: summed over every dimension
  /// the bias broadcasts (extent 1). Needs opts.mask.bias.
  std::optional<tensor_view<T, 4>> dbias;
};

/// Backward FLOPs, counted as FlashAttention counts them: 2.5 x the forward's
/// (five GEMM-shaped products instead of two).
constexpr double attention_backward_flops(const attention_shape& s) noexcept {
  return 2.5 * attention_flops(s);
}

namespace detail {

/// Checks the arguments of a backward kernel: q, k, v, out, dout and every option as the
/// forward would, the gradients' extents, and that no gradient shares memory with an input,
/// another gradient or itself. The lse (opts.lse_out, here an input) is required when
/// `need_lse`. Throws shape_error or value_error naming fn; nothing is written before.
template <class T>
attention_problem check_backward_args(const char* fn, const tensor_view<const T, 4>& q,
                                      const tensor_view<const T, 4>& k,
                                      const tensor_view<const T, 4>& v,
                                      const tensor_view<const T, 4>& out,
                                      const tensor_view<const T, 4>& dout,
                                      const attention_grads<T>& g, const attention_options<T>& opts,
                                      bool need_lse) {
  const attention_shape s = check_qkv_shapes(fn, q, k, v);
  const auto require_all = [&](const char* name, const auto& x, std::array<index_t, 4> want) {
    for (int r = 0; r < 4; ++r)
      require_extent(fn, name, r, x.extent(std::size_t(r)), want[std::size_t(r)]);
  };
  require_all("out", out, {s.batch, s.num_heads, s.q_len, s.value_dim});
  require_all("dout", dout, {s.batch, s.num_heads, s.q_len, s.value_dim});
  require_all("grads.dq", g.dq, {s.batch, s.num_heads, s.q_len, s.head_dim});
  require_all("grads.dk", g.dk, {s.batch, s.num_kv_heads, s.kv_len, s.head_dim});
  require_all("grads.dv", g.dv, {s.batch, s.num_kv_heads, s.kv_len, s.value_dim});

  const attention_problem p = check_scale_and_mask<T>(fn, s, opts);
  const attention_mask<T>& m = opts.mask;
  if (opts.lse_out) {
    const index_t want[3] = {s.batch, s.num_heads, s.q_len};
    for (int r = 0; r < 3; ++r)
      require_extent(fn, "opts.lse_out", r, opts.lse_out->extent(std::size_t(r)), want[r]);
  } else if (need_lse) {
    fail_value(message(fn,
                       ": opts.lse_out is unset, expected the forward's log-sum-exp [B, H, Lq] "
                       "(set lse_out in the forward's options and pass the same options here)"));
  }
  if (g.dbias) {
    if (!m.bias)
      fail_value(message(fn,
                         ": grads.dbias is set but opts.mask.bias is not (a bias gradient "
                         "needs the bias)"));
    for (int r = 0; r < 4; ++r)
      require_extent(fn, "grads.dbias", r, g.dbias->extent(std::size_t(r)),
                     m.bias->extent(std::size_t(r)));
  }

  const auto apart = [&](const char* name, const auto& o) {
    require_apart_from_inputs(fn, name, o, q, k, v, m);
    require_disjoint(fn, name, o, "out", out);
    require_disjoint(fn, name, o, "dout", dout);
    if (opts.lse_out) require_disjoint(fn, name, o, "opts.lse_out", *opts.lse_out);
  };
  apart("grads.dq", g.dq);
  apart("grads.dk", g.dk);
  apart("grads.dv", g.dv);
  require_disjoint(fn, "grads.dk", g.dk, "grads.dq", g.dq);
  require_disjoint(fn, "grads.dv", g.dv, "grads.dq", g.dq);
  require_disjoint(fn, "grads.dv", g.dv, "grads.dk", g.dk);
  if (g.dbias) {
    apart("grads.dbias", *g.dbias);
    require_disjoint(fn, "grads.dbias", *g.dbias, "grads.dq", g.dq);
    require_disjoint(fn, "grads.dbias", *g.dbias, "grads.dk", g.dk);
    require_disjoint(fn, "grads.dbias", *g.dbias, "grads.dv", g.dv);
  }
  return p;
}

/// Calls f(a, b, c, d) for every index of a view of extents x's, in row-major order.
template <class T, class F>
void for_each_index(const tensor_view<T, 4>& x, const F& f) {
  for (index_t a = 0; a < x.extent(0); ++a)
    for (index_t b = 0; b < x.extent(1); ++b)
      for (index_t c = 0; c < x.extent(2); ++c)
        for (index_t d = 0; d < x.extent(3); ++d) f(a, b, c, d);
}

/// Writes zeros into every element of x.
template <class T>
void fill_zero(const tensor_view<T, 4>& x) {
  for_each_index(x, [&](index_t a, index_t b, index_t c, index_t d) { x(a, b, c, d) = T(0); });
}

/// dS = P ∘ (dP - D) for one row of n keys, in place of dP. A key whose weight is exactly 0
/// (masked, or its exp flushed) gets dS = 0 even when dP is not finite (NaN or Inf in v of a
/// masked key must not reach the gradients of the keys a query does see).
template <class T>
void row_score_grad(const T* p, T* dp, index_t n, T d) noexcept {
  for (index_t j = 0; j < n; ++j) dp[j] = p[j] == T(0) ? T(0) : p[j] * (dp[j] - d);
}

/// seen[j] = 1 for every key j that some row of P [rows, n] (row stride ld) weighs (p != 0, NaN
/// included); other entries are left as they are.
template <class T>
void mark_weighed_keys(const T* p, index_t rows, index_t n, T* seen, index_t ld = -1) noexcept {
  if (ld < 0) ld = n;
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < n; ++j)
      if (p[i * ld + j] != T(0)) seen[j] = T(1);
}

/// A key no query weighs (masked for every query, or its weight flushed everywhere) passes no
/// gradient: its rows of dK [n, dk] and dV [n, dv] are set to 0, also where a NaN or Inf in
/// dO (of a fully masked row, say) made 0 · NaN of them in dV += Pᵀ dO.
template <class T>
void zero_unweighed_keys(const T* seen, index_t n, T* dk_acc, index_t dk, T* dv_acc,
                         index_t dv) noexcept {
  for (index_t j = 0; j < n; ++j)
    if (seen[j] == T(0)) {
      std::fill(dk_acc + j * dk, dk_acc + (j + 1) * dk, T(0));
      std::fill(dv_acc + j * dv, dv_acc + (j + 1) * dv, T(0));
    }
}

/// The weights of one row from its scores and the forward's log-sum-exp: p = exp(s - lse),
/// flushed to 0 below the smallest normal number as in the forward. A row whose every key was
/// masked (lse = -inf) gets weights of 0.
template <class T>
void row_weights_from_lse(T* s, index_t n, T lse) {
  if (lse == -std::numeric_limits<T>::infinity()) {
    std::fill(s, s + n, T(0));
    return;
  }
  exp_shifted(s, n, lse);
}

}  // namespace detail

/// Bytes of scratch naive_attention_backward<T> allocates for a call of shape s: the weights P
/// and their gradient, two [Lq, Lk] matrices reused across heads, plus the per-head copies of
/// the scaled queries and of each key/value head's gradient accumulators.
template <class T>
index_t naive_attention_backward_scratch_bytes(const attention_shape& s) {
  constexpr const char* fn = "naive_attention_backward_scratch_bytes";
  detail::check_shape(fn, s);
  const index_t scores = detail::checked_mul(fn, s.q_len, s.kv_len);
  index_t n = detail::checked_mul(fn, scores, 2);
  n += detail::checked_mul(fn, s.q_len, s.head_dim + s.head_dim + s.value_dim);
  n += detail::checked_mul(fn, s.kv_len, s.head_dim + s.value_dim);
  return detail::checked_mul(fn, n, index_t(sizeof(T)));
}

namespace detail {

/// A packed float copy of a half tensor (the backward kernels' inputs on the half types).
template <class T>
struct widened {
  aligned_vector<float> data;
  tensor_view<const float, 4> view;
  explicit widened(const tensor_view<const T, 4>& x)
      : data(std::size_t(x.extent(0) * x.extent(1) * x.extent(2) * x.extent(3))),
        view(data.data(), {x.extent(0), x.extent(1), x.extent(2), x.extent(3)}) {
    std::size_t n = 0;
    for_each_index(x, [&](index_t a, index_t b, index_t c, index_t d) {
      data[n++] = static_cast<float>(x(a, b, c, d));
    });
  }
};

/// The backward kernels on the half types: after the checks, the float kernel `run` on widened
/// copies of q, k, v, out, dout and the bias (exact: every half value is a float) with the
/// options' masks, scale and float log-sum-exp, into float gradients, each rounded once into
/// grads. Every copy is allocated before anything is written, so a failed call writes nothing.
template <class T, class Run>
void half_backward(const char* fn, const tensor_view<const T, 4>& q,
                   const tensor_view<const T, 4>& k, const tensor_view<const T, 4>& v,
                   const tensor_view<const T, 4>& out, const tensor_view<const T, 4>& dout,
                   const attention_grads<T>& grads, const attention_options<T>& opts, bool need_lse,
                   const Run& run) {
  (void)check_backward_args<T>(fn, q, k, v, out, dout, grads, opts, need_lse);
  const widened<T> qf(q), kf(k), vf(v), of(out), dof(dout);
  std::optional<widened<T>> bias;
  if (opts.mask.bias) bias.emplace(*opts.mask.bias);
  attention_options<float> fo;
  fo.scale = opts.scale;
  fo.mask.kv_lengths = opts.mask.kv_lengths;
  fo.mask.allowed = opts.mask.allowed;
  fo.mask.causal = opts.mask.causal;
  fo.mask.window = opts.mask.window;
  if (bias) fo.mask.bias = bias->view;
  fo.lse_out = opts.lse_out;
  // The float gradients, packed.
  const auto packed = [](const auto& g, aligned_vector<float>& data) {
    const std::array<index_t, 4> e{g.extent(0), g.extent(1), g.extent(2), g.extent(3)};
    data.resize(std::size_t(e[0] * e[1] * e[2] * e[3]));
    return tensor_view<float, 4>(data.data(), e);
  };
  aligned_vector<float> dq, dk, dv, db;
  attention_grads<float> fg{packed(grads.dq, dq), packed(grads.dk, dk), packed(grads.dv, dv), {}};
  if (grads.dbias) fg.dbias = packed(*grads.dbias, db);
  run(qf.view, kf.view, vf.view, of.view, dof.view, fg, fo);
  const auto round_into = [](const tensor_view<float, 4>& from, const tensor_view<T, 4>& to) {
    for_each_index(to, [&](index_t a, index_t b, index_t c, index_t d) {
      to(a, b, c, d) = static_cast<T>(from(a, b, c, d));
    });
  };
  round_into(fg.dq, grads.dq);
  round_into(fg.dk, grads.dk);
  round_into(fg.dv, grads.dv);
  if (grads.dbias) round_into(*fg.dbias, *grads.dbias);
}

// naive_attention_backward for float and double (documented below).
template <class T>
void naive_backward(detail::identity_t<tensor_view<const T, 4>> q,
                    detail::identity_t<tensor_view<const T, 4>> k,
                    detail::identity_t<tensor_view<const T, 4>> v,
                    detail::identity_t<tensor_view<const T, 4>> out,
                    detail::identity_t<tensor_view<const T, 4>> dout,
                    const attention_grads<T>& grads,
                    const detail::identity_t<attention_options<T>>& opts) {
  static_assert(std::is_floating_point_v<T>, "xattn kernels need a floating-point element type");
  constexpr const char* fn = "naive_attention_backward";
  const detail::attention_problem p =
      detail::check_backward_args<T>(fn, q, k, v, out, dout, grads, opts, false);
  const attention_shape& s = p.shape;
  (void)naive_attention_backward_scratch_bytes<T>(s);  // an Lq * Lk overflow is a shape_error

  // The forward, for one (batch, head), is (see attention_naive.hpp)
  //   S = (s·Q) Kᵀ + bias, masked;   P = softmax of each row of S;   O = P V.
  // With dO = dL/dO given, the chain rule through each step, in reverse:
  //   dV = Pᵀ dO                      (O = P V is linear in V)
  //   dP = dO Vᵀ                      (and in P)
  //   dS = P ∘ (dP - D),  D = rowsum(dO ∘ O)
  //        The softmax's Jacobian for one row is diag(p) - p pᵀ, so
  //        dS_j = p_j (dP_j - Σ_l p_l dP_l), and Σ_l p_l dP_l = Σ_l p_l (dO · v_l) = dO · o:
  //        D needs only the row of dO and of the output, not the whole row of P.
  //   dbias = dS, summed over the dimensions the bias broadcasts
  //   dQ = s · dS K,   dK = dSᵀ (s·Q)  (S is bilinear in s·Q and K)
  // A masked key has p = 0, hence dS = 0: no gradient flows through it. With grouped-query
  // heads a key/value head is read by several query heads, so its dK and dV are the sums of
  // their contributions.
  const bool work = s.batch > 0 && s.num_heads > 0 && s.q_len > 0;
  // The [Lq, Lk] matrices are allocated before anything is written: a failed allocation leaves
  // the gradients as they were.
  row_matrix<T> P(work ? s.q_len : 0, s.kv_len), dS(work ? s.q_len : 0, s.kv_len);
  row_matrix<T> q_scaled(s.q_len, s.head_dim), dq_head(s.q_len, s.head_dim), dk_acc, dv_acc, k_copy,
      v_copy, dout_copy;
  Eigen::Matrix<T, Eigen::Dynamic, 1> D(s.q_len), seen;
  detail::fill_zero(grads.dk);
  detail::fill_zero(grads.dv);
  if (grads.dbias) detail::fill_zero(*grads.dbias);
  detail::fill_zero(grads.dq);
  if (!work) return;

  const detail::mask_plan<T> mask(opts.mask, s);
  const T scale = static_cast<T>(p.scale);

  for (index_t b = 0; b < s.batch; ++b) {
    const index_t n = mask.keys(b);
    for (index_t hkv = 0; hkv < s.kv_heads(); ++hkv) {
      const auto K =
          detail::contiguous_rows(detail::first_rows(k.select(0, b).select(0, hkv), n), k_copy);
      const auto V =
          detail::contiguous_rows(detail::first_rows(v.select(0, b).select(0, hkv), n), v_copy);
      dk_acc.setZero(n, s.head_dim);
      dv_acc.setZero(n, s.value_dim);
      seen.setZero(n);
      for (index_t h = hkv * p.group; h < (hkv + 1) * p.group; ++h) {
        const auto dO = detail::contiguous_rows(dout.select(0, b).select(0, h), dout_copy);
        const auto O = detail::as_strided_matrix(out.select(0, b).select(0, h));
        auto Ph = P.leftCols(n);
        auto dSh = dS.leftCols(n);

        // The weights again, exactly as the forward computes them.
        q_scaled.noalias() = scale * detail::as_strided_matrix(q.select(0, b).select(0, h));
        Ph.noalias() = q_scaled * K.transpose();
        for (index_t i = 0; i < s.q_len; ++i) {
          T* row = P.row(i).data();
          if (mask.any()) mask.apply(b, h, i, 0, row, n);
          detail::softmax_row(row, n);
        }

        detail::mark_weighed_keys(P.data(), s.q_len, n, seen.data(), s.kv_len);
        dv_acc.noalias() += Ph.transpose() * dO;
        dSh.noalias() = dO * V.transpose();  // dP, turned into dS in place
        D = (dO.array() * O.array()).rowwise().sum().matrix();
        for (index_t i = 0; i < s.q_len; ++i)
          detail::row_score_grad(P.row(i).data(), dS.row(i).data(), n, D(i));

        dq_head.noalias() = dSh * K;
        detail::as_strided_matrix(grads.dq.select(0, b).select(0, h)) = scale * dq_head;
        dk_acc.noalias() += dSh.transpose() * q_scaled;

        if (grads.dbias) {
          const tensor_view<T, 4>& db = *grads.dbias;
          const index_t bb = db.extent(0) == 1 ? 0 : b, hh = db.extent(1) == 1 ? 0 : h;
          for (index_t i = 0; i < s.q_len; ++i)
            for (index_t j = 0; j < n; ++j)
              db(bb, hh, db.extent(2) == 1 ? 0 : i, db.extent(3) == 1 ? 0 : j) += dS(i, j);
        }
      }
      detail::zero_unweighed_keys(seen.data(), n, dk_acc.data(), s.head_dim, dv_acc.data(),
                                  s.value_dim);
      detail::as_strided_matrix(detail::first_rows(grads.dk.select(0, b).select(0, hkv), n)) =
          dk_acc;
      detail::as_strided_matrix(detail::first_rows(grads.dv.select(0, b).select(0, hkv), n)) =
          dv_acc;
    }
  }
}

}  // namespace detail

/// Gradients of scaled dot-product attention, computed the direct way, one (batch, head) at a
/// time with its [Lq, Lk] weights materialised: the reference for tiled_attention_backward.
///
///   q, k, v, opts   as given to the forward (naive_attention or tiled_attention)
///   out  [B, H, Lq, Dv]   the forward's output
///   dout [B, H, Lq, Dv]   dL/dout, the gradient flowing back into the output
///   grads               dq [B, H, Lq, Dk], dk [B, Hkv, Lk, Dk], dv [B, Hkv, Lk, Dv], and
///                       dbias (the bias's extents) when set: all written
///
/// opts.lse_out, when set, must have the forward's extents; this kernel recomputes the softmax
/// and does not read it. opts.weights_out is not used. Keys at or past opts.mask.kv_lengths(b)
/// are never read and get zero gradients; a query row whose keys are all masked gets dq = 0.
///
/// T may be a half type (Eigen::half, Eigen::bfloat16; half.hpp), as in the forward: the float
/// backward runs on float copies of q, k, v, out, dout and the bias (exact), with lse_out in
/// float as the half forward writes it, and each gradient is rounded once. The copies and the
/// float gradients take 4 bytes per element of those tensors, allocated per call. The same
/// holds for tiled_attention_backward.
template <class T>
void naive_attention_backward(detail::identity_t<tensor_view<const T, 4>> q,
                              detail::identity_t<tensor_view<const T, 4>> k,
                              detail::identity_t<tensor_view<const T, 4>> v,
                              detail::identity_t<tensor_view<const T, 4>> out,
                              detail::identity_t<tensor_view<const T, 4>> dout,
                              const attention_grads<T>& grads,
                              const detail::identity_t<attention_options<T>>& opts = {}) {
  static_assert(is_element_v<T>, "xattn kernels need a floating-point or half element type");
  if constexpr (is_half_v<T>)
    detail::half_backward<T>("naive_attention_backward", q, k, v, out, dout, grads, opts, false,
                             [](const auto&... a) { detail::naive_backward<float>(a...); });
  else
    detail::naive_backward<T>(q, k, v, out, dout, grads, opts);
}

namespace detail {

/// How tiled_attention_backward cuts one call. Pass 1 runs units of one (batch, key/value head,
/// key tile) and writes dk and dv; pass 2 units of one (batch, head, query tile) and writes dq;
/// pass 3 (only for dbias) units of one block of dbias rows. No two units write the same
/// element, and each unit adds its terms in a fixed order, so the gradients do not depend on
/// the thread count, bit for bit.
struct backward_plan {
  index_t q_tile = 0, kv_tile = 0;
  index_t q_tiles = 0, kv_tiles = 0;
  index_t units1 = 0, units2 = 0, units3 = 0;
  index_t bias_row_block = 0;  ///< dbias rows per pass-3 unit (1 when dbias broadcasts over Lq)
  int threads = 1;             ///< the most threads any pass starts
  int threads_for(index_t units) const noexcept {
    return int(std::max<index_t>(1, std::min<index_t>(threads, units)));
  }
};

/// Default backward tiles: 64 queries by 64 keys keep P, dS and both accumulators of a unit in
/// L2 at Dk = Dv = 128.
inline constexpr index_t default_backward_q_tile = 64;
inline constexpr index_t default_backward_kv_tile = 64;

inline backward_plan make_backward_plan(const attention_shape& s, const tile_options& t,
                                        const std::array<index_t, 4>* dbias_extents) {
  backward_plan p;
  p.q_tile =
      std::max<index_t>(1, std::min(t.q_tile ? *t.q_tile : default_backward_q_tile, s.q_len));
  p.kv_tile =
      std::max<index_t>(1, std::min(t.kv_tile ? *t.kv_tile : default_backward_kv_tile, s.kv_len));
  p.q_tiles = (s.q_len + p.q_tile - 1) / p.q_tile;
  p.kv_tiles = (s.kv_len + p.kv_tile - 1) / p.kv_tile;
  p.units1 = s.batch * s.kv_heads() * p.kv_tiles;
  p.units2 = s.batch * s.num_heads * p.q_tiles;
  if (dbias_extents) {
    const auto& e = *dbias_extents;
    p.bias_row_block = e[2] == 1 ? 1 : p.q_tile;
    p.units3 = e[0] * e[1] * ((e[2] + p.bias_row_block - 1) / p.bias_row_block);
  }
  int asked = t.num_threads ? *t.num_threads : default_threads();
  if (!t.num_threads) {  // as the forward: a thread only for a fair share of the work
    const double flops = attention_backward_flops(s);
    asked = int(std::max(1.0, std::min(double(asked), flops / min_flops_per_thread)));
  }
  p.threads = int(std::max<index_t>(
      1, std::min<index_t>(asked, std::max({p.units1, p.units2, p.units3, index_t(1)}))));
  return p;
}

/// One thread's scratch for any unit of a backward_plan (elements; see backward_unit).
struct backward_scratch_sizes {
  index_t qs, dout, lse, p, ds, k, v, acc_a, acc_b, seen;
  index_t total() const noexcept {
    return qs + dout + lse + p + ds + k + v + acc_a + acc_b + seen;
  }
};

inline backward_scratch_sizes backward_scratch_elements(const backward_plan& p,
                                                        const attention_shape& s) {
  constexpr const char* fn = "tiled_attention_backward";
  const index_t mq = p.q_tile, nk = p.kv_tile;
  backward_scratch_sizes n{};
  n.qs = checked_mul(fn, mq, s.head_dim);
  n.dout = checked_mul(fn, mq, s.value_dim);
  n.lse = 2 * mq;  // the forward's lse and D = rowsum(dO ∘ O)
  n.p = checked_mul(fn, mq, nk);
  n.ds = n.p;
  n.k = checked_mul(fn, nk, s.head_dim);
  n.v = checked_mul(fn, nk, s.value_dim);
  n.acc_a = std::max(checked_mul(fn, nk, s.head_dim), n.qs);  // dK (pass 1) or dQ (pass 2)
  n.acc_b = n.v;                                              // dV (pass 1)
  n.seen = nk;  // pass 1: 1 for the keys some query weighs, 0 for the others
  return n;
}

template <class T>
struct backward_thread_scratch {
  aligned_vector<T> qs, dout, lse, p, ds, k, v, acc_a, acc_b, seen;
};

/// The backward's scratch for a whole thread team, kept by the calling thread and sized before
/// any thread starts (as the forward's team_scratch).
template <class T>
std::vector<backward_thread_scratch<T>>& reserve_backward_scratch(const backward_plan& p,
                                                                  const attention_shape& s) {
  static thread_local std::vector<backward_thread_scratch<T>> team;
  const backward_scratch_sizes n = backward_scratch_elements(p, s);
  if (team.size() < std::size_t(p.threads)) team.resize(std::size_t(p.threads));
  for (int t = 0; t < p.threads; ++t) {
    auto& ws = team[std::size_t(t)];
    at_least(ws.qs, n.qs);
    at_least(ws.dout, n.dout);
    at_least(ws.lse, n.lse);
    at_least(ws.p, n.p);
    at_least(ws.ds, n.ds);
    at_least(ws.k, n.k);
    at_least(ws.v, n.v);
    at_least(ws.acc_a, n.acc_a);
    at_least(ws.acc_b, n.acc_b);
    at_least(ws.seen, n.seen);
  }
  return team;
}

/// One tiled_attention_backward call with its arguments checked and its work planned.
template <class T>
struct backward_job {
  tensor_view<const T, 4> q, k, v, out, dout;
  tensor_view<const T, 3> lse;
  const attention_grads<T>& grads;
  mask_plan<T> mask;
  attention_shape shape;
  index_t group;
  T scale;
  backward_plan plan;
  std::vector<backward_thread_scratch<T>>* team;

  /// The keys batch item b has (key padding): later keys are never read.
  index_t keys(index_t b) const noexcept { return mask.keys(b); }
};

/// The work of one unit on one thread's scratch. A query tile is loaded once (scaled queries,
/// dO rows, lse and D per row); then each key tile gives P and dS for the tile's queries:
///   S = (s·Q) Kᵀ, masked;  P = exp(S - lse);  dP = dO Vᵀ;  dS = P ∘ (dP - D)
/// (see naive_attention_backward for the math). Every product is one tile_gemm.
template <class T>
class backward_unit {
 public:
  backward_unit(const backward_job<T>& job, backward_thread_scratch<T>& ws) : job_(job), ws_(ws) {}

  /// Loads query rows [i0, i0 + mq) of (b, h).
  void load_queries(index_t b, index_t h, index_t i0, index_t mq) {
    const attention_shape& s = job_.shape;
    b_ = b;
    h_ = h;
    i0_ = i0;
    mq_ = mq;
    const auto q = job_.q.select(0, b).select(0, h);
    const auto dout = job_.dout.select(0, b).select(0, h);
    const auto out = job_.out.select(0, b).select(0, h);
    const index_t dk = s.head_dim, dv = s.value_dim;
    for (index_t i = 0; i < mq; ++i)
      for (index_t d = 0; d < dk; ++d) ws_.qs[std::size_t(i * dk + d)] = job_.scale * q(i0 + i, d);
    if (dout.stride(1) == 1 || dv <= 1) {
      dout_ = dout.data() + i0 * dout.stride(0);
      ld_dout_ = dout.stride(0);
    } else {
      for (index_t i = 0; i < mq; ++i)
        for (index_t e = 0; e < dv; ++e) ws_.dout[std::size_t(i * dv + e)] = dout(i0 + i, e);
      dout_ = ws_.dout.data();
      ld_dout_ = dv;
    }
    T* lse = ws_.lse.data();
    T* d = lse + mq;
    key_limit_ = 0;
    for (index_t i = 0; i < mq; ++i) {
      lse[i] = job_.lse(b, h, i0 + i);
      T sum = 0;
      for (index_t e = 0; e < dv; ++e) sum += dout(i0 + i, e) * out(i0 + i, e);
      d[i] = sum;
      key_limit_ = std::max(key_limit_, job_.mask.key_end(b, i0 + i));
    }
  }

  /// One past the last key any loaded query may see (key padding, causal).
  index_t key_limit() const noexcept { return key_limit_; }

  /// P and dS of the loaded queries for keys [j0, j0 + nk) of key/value head (b, h / group),
  /// with k and v rows at the given pointers; false when the masks forbid the whole tile.
  bool tile(index_t j0, index_t nk, const T* k, index_t ldk, const T* v, index_t ldv) {
    const attention_shape& s = job_.shape;
    const mask_plan<T>& mask = job_.mask;
    if (j0 >= key_limit_ || !mask.allows_any(b_, h_, i0_, mq_, j0, nk)) return false;
    T* p = ws_.p.data();
    T* ds = ws_.ds.data();
    const T* lse = ws_.lse.data();
    const T* d = lse + mq_;
    tile_gemm<false, true>(mq_, nk, s.head_dim, ws_.qs.data(), s.head_dim, k, ldk, p, nk, T(1),
                           false);
    tile_gemm<false, true>(mq_, nk, s.value_dim, dout_, ld_dout_, v, ldv, ds, nk, T(1), false);
    for (index_t i = 0; i < mq_; ++i) {
      T* row = p + i * nk;
      if (mask.any()) mask.apply(b_, h_, i0_ + i, j0, row, nk);
      row_weights_from_lse(row, nk, lse[i]);
      row_score_grad(row, ds + i * nk, nk, d[i]);
    }
    return true;
  }

  const T* p() const noexcept { return ws_.p.data(); }
  const T* ds() const noexcept { return ws_.ds.data(); }
  const T* qs() const noexcept { return ws_.qs.data(); }
  const T* dout() const noexcept { return dout_; }
  index_t ld_dout() const noexcept { return ld_dout_; }
  index_t rows() const noexcept { return mq_; }

 private:
  const backward_job<T>& job_;
  backward_thread_scratch<T>& ws_;
  index_t b_ = 0, h_ = 0, i0_ = 0, mq_ = 0, key_limit_ = 0;
  const T* dout_ = nullptr;
  index_t ld_dout_ = 0;
};

/// Rows [j0, j0 + n) of a [Lk, D] slice as a pointer and a row stride: in place when the rows
/// are contiguous, else copied into `copy`.
template <class T>
const T* key_rows(const tensor_view<const T, 2>& x, index_t j0, index_t n, aligned_vector<T>& copy,
                  index_t& ld) {
  if (x.stride(1) == 1 || x.extent(1) <= 1) {
    ld = x.stride(0);
    return x.data() + j0 * x.stride(0);
  }
  const index_t d = x.extent(1);
  for (index_t j = 0; j < n; ++j)
    for (index_t e = 0; e < d; ++e) copy[std::size_t(j * d + e)] = x(j0 + j, e);
  ld = d;
  return copy.data();
}

/// Pass 1: dK and dV of keys [j0, j0 + kv_tile) of one key/value head, summed over the query
/// heads of its group and all their query tiles, in that order.
template <class T>
void backward_keys(const backward_job<T>& job, int thread, index_t u) {
  const attention_shape& s = job.shape;
  const backward_plan& pl = job.plan;
  auto& ws = (*job.team)[std::size_t(thread)];
  const index_t b = u / (s.kv_heads() * pl.kv_tiles);
  const index_t hkv = u / pl.kv_tiles % s.kv_heads();
  const index_t j0 = u % pl.kv_tiles * pl.kv_tile;
  const index_t n_tile = std::min(pl.kv_tile, s.kv_len - j0);
  const index_t nk = std::max<index_t>(0, std::min(n_tile, job.keys(b) - j0));  // keys to read
  const index_t dk = s.head_dim, dv = s.value_dim;
  T* dk_acc = ws.acc_a.data();
  T* dv_acc = ws.acc_b.data();
  std::fill(dk_acc, dk_acc + n_tile * dk, T(0));
  std::fill(dv_acc, dv_acc + n_tile * dv, T(0));
  T* seen = ws.seen.data();
  std::fill(seen, seen + n_tile, T(0));
  if (nk > 0) {
    index_t ldk = 0, ldv = 0;
    const T* kp = key_rows(job.k.select(0, b).select(0, hkv), j0, nk, ws.k, ldk);
    const T* vp = key_rows(job.v.select(0, b).select(0, hkv), j0, nk, ws.v, ldv);
    backward_unit<T> unit(job, ws);
    for (index_t h = hkv * job.group; h < (hkv + 1) * job.group; ++h)
      for (index_t i0 = 0; i0 < s.q_len; i0 += pl.q_tile) {
        const index_t mq = std::min(pl.q_tile, s.q_len - i0);
        unit.load_queries(b, h, i0, mq);
        if (!unit.tile(j0, nk, kp, ldk, vp, ldv)) continue;
        mark_weighed_keys(unit.p(), mq, nk, seen);
        tile_gemm<true, false>(nk, dv, mq, unit.p(), nk, unit.dout(), unit.ld_dout(), dv_acc, dv,
                               T(1), true);  // dV += Pᵀ dO
        tile_gemm<true, false>(nk, dk, mq, unit.ds(), nk, unit.qs(), dk, dk_acc, dk, T(1),
                               true);  // dK += dSᵀ (s·Q)
      }
  }
  zero_unweighed_keys(seen, n_tile, dk_acc, dk, dv_acc, dv);
  const auto gk = job.grads.dk.select(0, b).select(0, hkv);
  const auto gv = job.grads.dv.select(0, b).select(0, hkv);
  for (index_t j = 0; j < n_tile; ++j) {
    for (index_t d = 0; d < dk; ++d) gk(j0 + j, d) = dk_acc[j * dk + d];
    for (index_t e = 0; e < dv; ++e) gv(j0 + j, e) = dv_acc[j * dv + e];
  }
}

/// Pass 2: dQ of one query tile, summed over the key tiles in order.
template <class T>
void backward_queries(const backward_job<T>& job, int thread, index_t u) {
  const attention_shape& s = job.shape;
  const backward_plan& pl = job.plan;
  auto& ws = (*job.team)[std::size_t(thread)];
  const index_t b = u / (s.num_heads * pl.q_tiles);
  const index_t h = u / pl.q_tiles % s.num_heads;
  const index_t i0 = u % pl.q_tiles * pl.q_tile;
  const index_t mq = std::min(pl.q_tile, s.q_len - i0);
  const index_t dk = s.head_dim;
  T* dq_acc = ws.acc_a.data();
  std::fill(dq_acc, dq_acc + mq * dk, T(0));
  backward_unit<T> unit(job, ws);
  unit.load_queries(b, h, i0, mq);
  const auto kh = job.k.select(0, b).select(0, h / job.group);
  const auto vh = job.v.select(0, b).select(0, h / job.group);
  for (index_t j0 = 0; j0 < unit.key_limit(); j0 += pl.kv_tile) {
    const index_t nk = std::min(pl.kv_tile, unit.key_limit() - j0);
    index_t ldk = 0, ldv = 0;
    const T* kp = key_rows(kh, j0, nk, ws.k, ldk);
    const T* vp = key_rows(vh, j0, nk, ws.v, ldv);
    if (!unit.tile(j0, nk, kp, ldk, vp, ldv)) continue;
    tile_gemm<false, false>(mq, dk, nk, unit.ds(), nk, kp, ldk, dq_acc, dk, T(1),
                            true);  // dQ += dS K
  }
  const auto gq = job.grads.dq.select(0, b).select(0, h);
  for (index_t i = 0; i < mq; ++i)
    for (index_t d = 0; d < dk; ++d) gq(i0 + i, d) = job.scale * dq_acc[i * dk + d];
}

/// Pass 3: one block of dbias rows (bb, hh, rows [r0, r0 + bias_row_block)), summed over the
/// batch items, heads and query rows the bias broadcasts over, in index order.
template <class T>
void backward_bias(const backward_job<T>& job, int thread, index_t u) {
  const attention_shape& s = job.shape;
  const backward_plan& pl = job.plan;
  const tensor_view<T, 4>& db = *job.grads.dbias;
  auto& ws = (*job.team)[std::size_t(thread)];
  const index_t row_blocks = (db.extent(2) + pl.bias_row_block - 1) / pl.bias_row_block;
  const index_t bb = u / (db.extent(1) * row_blocks);
  const index_t hh = u / row_blocks % db.extent(1);
  const index_t r0 = u % row_blocks * pl.bias_row_block;
  const index_t r1 = std::min(db.extent(2), r0 + pl.bias_row_block);
  for (index_t r = r0; r < r1; ++r)
    for (index_t j = 0; j < db.extent(3); ++j) db(bb, hh, r, j) = T(0);
  // The query rows feeding dbias rows [r0, r1): the same rows, or all Lq when broadcast.
  const bool all_rows = db.extent(2) == 1;
  const index_t q_begin = all_rows ? 0 : r0, q_end = all_rows ? s.q_len : r1;
  backward_unit<T> unit(job, ws);
  for (index_t b = 0; b < s.batch; ++b) {
    if (db.extent(0) != 1 && b != bb) continue;
    for (index_t h = 0; h < s.num_heads; ++h) {
      if (db.extent(1) != 1 && h != hh) continue;
      const auto kh = job.k.select(0, b).select(0, h / job.group);
      const auto vh = job.v.select(0, b).select(0, h / job.group);
      for (index_t i0 = q_begin; i0 < q_end; i0 += pl.q_tile) {
        const index_t mq = std::min(pl.q_tile, q_end - i0);
        unit.load_queries(b, h, i0, mq);
        for (index_t j0 = 0; j0 < unit.key_limit(); j0 += pl.kv_tile) {
          const index_t nk = std::min(pl.kv_tile, unit.key_limit() - j0);
          index_t ldk = 0, ldv = 0;
          const T* kp = key_rows(kh, j0, nk, ws.k, ldk);
          const T* vp = key_rows(vh, j0, nk, ws.v, ldv);
          if (!unit.tile(j0, nk, kp, ldk, vp, ldv)) continue;
          const T* ds = unit.ds();
          for (index_t i = 0; i < mq; ++i)
            for (index_t j = 0; j < nk; ++j)
              db(bb, hh, all_rows ? 0 : i0 + i, db.extent(3) == 1 ? 0 : j0 + j) += ds[i * nk + j];
        }
      }
    }
  }
}

}  // namespace detail

/// Bytes of scratch tiled_attention_backward<T> keeps for a call of shape s: per thread, a tile
/// of scaled queries and of dO, the weights and their gradient for one query tile by one key
/// tile, copies of strided key and value rows, and the tile accumulators. It grows with the
/// tile sizes, Dk and Dv, never with Lq or Lk. Like the forward's, the scratch of a call's
/// thread team belongs to the calling thread and is reused by its later calls.
template <class T>
index_t tiled_attention_backward_scratch_bytes(const attention_shape& s,
                                               const tile_options& tiles = {}) {
  constexpr const char* fn = "tiled_attention_backward_scratch_bytes";
  detail::check_shape(fn, s);
  const detail::backward_plan p = detail::make_backward_plan(s, tiles, nullptr);
  const index_t per_thread = detail::backward_scratch_elements(p, s).total();
  return detail::checked_mul(fn, detail::checked_mul(fn, index_t(p.threads), per_thread),
                             index_t(sizeof(T)));
}

namespace detail {

// tiled_attention_backward for float and double (documented below).
template <class T>
void tiled_backward(
    detail::identity_t<tensor_view<const T, 4>> q, detail::identity_t<tensor_view<const T, 4>> k,
    detail::identity_t<tensor_view<const T, 4>> v, detail::identity_t<tensor_view<const T, 4>> out,
    detail::identity_t<tensor_view<const T, 4>> dout, const attention_grads<T>& grads,
    const detail::identity_t<attention_options<T>>& opts, const tile_options& tiles) {
  static_assert(std::is_floating_point_v<T>, "xattn kernels need a floating-point element type");
  constexpr const char* fn = "tiled_attention_backward";
  const detail::attention_problem pr =
      detail::check_backward_args<T>(fn, q, k, v, out, dout, grads, opts, true);
  detail::check_tile_options(fn, tiles);
  const attention_shape& s = pr.shape;
  std::array<index_t, 4> db_extents{};
  if (grads.dbias)
    for (std::size_t r = 0; r < 4; ++r) db_extents[r] = grads.dbias->extent(r);
  const detail::backward_plan plan =
      detail::make_backward_plan(s, tiles, grads.dbias ? &db_extents : nullptr);
  // All scratch is allocated here, on the calling thread, before any thread starts.
  auto& team = detail::reserve_backward_scratch<T>(plan, s);
  const detail::backward_job<T> job{q,
                                    k,
                                    v,
                                    out,
                                    dout,
                                    *opts.lse_out,
                                    grads,
                                    detail::mask_plan<T>(opts.mask, s),
                                    s,
                                    pr.group,
                                    static_cast<T>(pr.scale),
                                    plan,
                                    &team};
  detail::parallel_for(plan.units1, plan.threads_for(plan.units1),
                       [&](index_t u, int thread) { detail::backward_keys(job, thread, u); });
  detail::parallel_for(plan.units2, plan.threads_for(plan.units2),
                       [&](index_t u, int thread) { detail::backward_queries(job, thread, u); });
  if (grads.dbias)
    detail::parallel_for(plan.units3, plan.threads_for(plan.units3),
                         [&](index_t u, int thread) { detail::backward_bias(job, thread, u); });
}

}  // namespace detail

/// Gradients of scaled dot-product attention with O(tile) scratch; arguments and results as
/// naive_attention_backward, plus the forward's log-sum-exp:
///
///   q, k, v, opts        as given to the forward
///   opts.lse_out         [B, H, Lq] the forward's log-sum-exp: required (a value_error if
///                        unset); here it is read, not written
///   out, dout            [B, H, Lq, Dv] the forward's output and dL/dout
///   grads                dq, dk, dv (and dbias): all written
///   tiles                tile sizes and threads, as tiled_attention's
///
/// The FlashAttention-2 scheme: the weights are recomputed tile by tile as exp(s - lse), never
/// stored. Pass 1 runs units of (batch, key/value head, key tile), each summing dK and dV over
/// its group's query heads and query tiles; pass 2 runs units of (batch, head, query tile), each
/// summing dQ over the key tiles; a dbias pass runs only when dbias is asked for. No unit shares
/// an output element with another and each adds in a fixed order, so every gradient is the same,
/// bit for bit, for every thread count. The price: P and dS are recomputed twice (three times
/// with dbias), about 2 x the FLOPs of a backward that shares partial sums between threads.
/// Half types as for naive_attention_backward.
template <class T>
void tiled_attention_backward(
    detail::identity_t<tensor_view<const T, 4>> q, detail::identity_t<tensor_view<const T, 4>> k,
    detail::identity_t<tensor_view<const T, 4>> v, detail::identity_t<tensor_view<const T, 4>> out,
    detail::identity_t<tensor_view<const T, 4>> dout, const attention_grads<T>& grads,
    const detail::identity_t<attention_options<T>>& opts, const tile_options& tiles = {}) {
  static_assert(is_element_v<T>, "xattn kernels need a floating-point or half element type");
  if constexpr (is_half_v<T>)
    detail::half_backward<T>(
        "tiled_attention_backward", q, k, v, out, dout, grads, opts, true,
        [&tiles](const auto&... a) { detail::tiled_backward<float>(a..., tiles); });
  else
    detail::tiled_backward<T>(q, k, v, out, dout, grads, opts, tiles);
}

}  // namespace xattn
