// SPDX-License-Identifier: MIT
// naive_attention: scaled dot-product attention computed the direct way, materialising the
// [Lq, Lk] score matrix of each head. It is the reference every other kernel is tested against,
// and the place where the math is explained. attention.hpp has the Eigen-in, Eigen-out call.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/eigen_interop.hpp"
#include "xattn/detail/masking.hpp"
#include "xattn/detail/softmax.hpp"
#include "xattn/detail/validate.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/options.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

namespace xattn {

/// Bytes of scratch naive_attention<T> allocates for a call of shape s: one [Lq, Lk] score
/// matrix of compute_t<T>, reused across heads (plus copies of Q, K, V slices whose rows are not
/// contiguous or, for the half types, widened to float).
/// A negative size, or Hkv not dividing H, is a shape_error; so is a byte count that overflows.
template <class T>
index_t naive_attention_scratch_bytes(const attention_shape& s) {
  detail::check_shape("naive_attention_scratch_bytes", s);
  const index_t scores = detail::checked_mul("naive_attention", s.q_len, s.kv_len);
  return detail::checked_mul("naive_attention", scores, index_t(sizeof(compute_t<T>)));
}

namespace detail {

/// naive_attention on q, out and opts of type T and k, v of type KV (both T, or float queries
/// against half keys and values); everything is computed in C = compute_t<T>.
template <class T, class KV>
void run_naive(const tensor_view<const T, 4>& q, const tensor_view<const KV, 4>& k,
               const tensor_view<const KV, 4>& v, const tensor_view<T, 4>& out,
               const attention_options<T>& opts) {
  using C = compute_t<T>;
  const attention_problem p = check_attention_args<T, KV>("naive_attention", q, k, v, out, opts);
  const attention_shape& s = p.shape;
  if (s.batch == 0 || s.num_heads == 0 || s.q_len == 0) return;

  // Scaled dot-product attention for one (batch, head) slice:
  //   S = s · Q Kᵀ      S: [Lq, Lk], s = 1/sqrt(Dk) unless opts.scale is set
  //   S += bias, and S(i, j) = -inf wherever a mask forbids query i to see key j
  //   P = softmax of each row of S (rows of P sum to 1; masked keys get exactly 0)
  //   O = P V           O: [Lq, Dv]
  // Cross-attention: Q comes from the target side, K and V from the context side, so Lq and Lk
  // are independent. The row max is subtracted before exp() so large scores cannot overflow.
  (void)naive_attention_scratch_bytes<T>(s);  // an Lq * Lk overflow is a shape_error, not a crash
  const mask_plan<T> mask(opts.mask, s);
  row_matrix<C> scores(s.q_len, s.kv_len);  // S, then P in place; reused for every head
  row_matrix<C> q_scaled(s.q_len, s.head_dim), k_copy, v_copy, out_copy;
  const C scale = static_cast<C>(p.scale);
  constexpr C nan = std::numeric_limits<C>::quiet_NaN();

  for (index_t b = 0; b < s.batch; ++b) {
    for (index_t h = 0; h < s.num_heads; ++h) {
      const index_t hkv = h / p.group;
      // Only the first n keys can take part (key padding): the others are never read, so the
      // padding may hold anything, even NaN. Their weights are exactly 0.
      const index_t n = mask.keys(b);
      const auto K = compute_rows<C>(first_rows(k.select(0, b).select(0, hkv), n), k_copy);
      const auto V = compute_rows<C>(first_rows(v.select(0, b).select(0, hkv), n), v_copy);
      auto P = scores.leftCols(n);

      // pass 1: all Lq x n scores with one GEMM. The scale multiplies the queries first,
      // S = (s·Q) Kᵀ, rounded to C, as in every kernel (see attention_options::scale).
      q_scaled.noalias() =
          scale * as_strided_matrix(q.select(0, b).select(0, h)).template cast<C>();
      P.noalias() = q_scaled * K.transpose();

      // pass 2: masks, then the softmax of each row in place. Keys past n weigh 0, or NaN in a
      // row that the NaN policy makes NaN.
      for (index_t i = 0; i < s.q_len; ++i) {
        C* row = scores.row(i).data();
        if (mask.any()) mask.apply(b, h, i, 0, row, n);
        const C lse = softmax_row(row, n);
        if (opts.lse_out) (*opts.lse_out)(b, h, i) = lse;
        std::fill(row + n, row + s.kv_len, std::isnan(lse) ? nan : C(0));
      }

      // pass 3: O = P V with one GEMM, written straight into out's slice when its rows are
      // contiguous
      assign_rows(out.select(0, b).select(0, h), P * V, out_copy);
      if (opts.weights_out) as_strided_matrix(opts.weights_out->select(0, b).select(0, h)) = scores;
    }
  }
}

}  // namespace detail

/// Scaled dot-product attention, one (batch, head) slice at a time:
///
///   q   [B, H,   Lq, Dk]    queries (target side)
///   k   [B, Hkv, Lk, Dk]    keys    (context side)
///   v   [B, Hkv, Lk, Dv]    values  (context side)
///   out [B, H,   Lq, Dv]    written; must not overlap the inputs
///
/// Hkv must divide H: query head h reads key/value head h / (H / Hkv) (grouped-query attention;
/// Hkv = 1 is multi-query attention). Any strides are accepted. Keys at or past
/// opts.mask.kv_lengths(b) are never read. Non-finite inputs: see attention_options. T may be a
/// half type (half.hpp): then the work is done in float and the output rounded once.
template <class T>
void naive_attention(detail::identity_t<tensor_view<const T, 4>> q,
                     detail::identity_t<tensor_view<const T, 4>> k,
                     detail::identity_t<tensor_view<const T, 4>> v, tensor_view<T, 4> out,
                     const detail::identity_t<attention_options<T>>& opts = {}) {
  static_assert(is_element_v<T>, "xattn kernels need a floating-point or half element type");
  detail::run_naive<T, T>(q, k, v, out, opts);
}

/// The mixed call: float queries and output against keys and values stored in a half type KV,
/// as tiled_attention's (attention_tiled.hpp): naive_attention<float>'s arithmetic on the
/// widened k and v.
template <class T, class KV, std::enable_if_t<std::is_same_v<T, float> && is_half_v<KV>, int> = 0>
void naive_attention(detail::identity_t<tensor_view<const T, 4>> q, tensor_view<const KV, 4> k,
                     tensor_view<const KV, 4> v, tensor_view<T, 4> out,
                     const detail::identity_t<attention_options<T>>& opts = {}) {
  detail::run_naive<T, KV>(q, k, v, out, opts);
}

}  // namespace xattn
