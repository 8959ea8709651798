// SPDX-License-Identifier: MIT
// attention_options: what every attention kernel accepts besides Q, K, V and the output: the
// score scale, the masks, and the optional extra outputs (weights and log-sum-exp).
#pragma once

#include "xattn/config.hpp"
#include "xattn/half.hpp"
#include "xattn/tensor_view.hpp"

#include <optional>

namespace xattn {

/// Causal masking and how the causal diagonal is aligned when Lq != Lk.
enum class causal_mask {
  none,          ///< no causal masking
  top_left,      ///< query i sees keys j <= i (the diagonal starts at the top-left corner)
  bottom_right,  ///< query i sees keys j <= i + (Lk - Lq): the last query sees every key
};

/// Where a call's queries and keys sit in longer sequences they were cut from: a shard of a
/// context split across processes (see distributed.hpp), or one slice of the queries. Query i of
/// the call is position query_offset + i of query_len queries, key j is position key_offset + j
/// of kv_len keys. Key padding (kv_lengths) and causal masks count these positions, so each
/// slice masks exactly the keys the whole call would; allowed and bias stay the call's own
/// [.., Lq|1, Lk|1]. An unset length is the offset plus the call's own length.
struct position_window {
  index_t query_offset = 0;          ///< the call's first query position, >= 0
  std::optional<index_t> query_len;  ///< queries in all, >= query_offset + Lq
  index_t key_offset = 0;            ///< the call's first key position, >= 0
  std::optional<index_t> kv_len;     ///< keys in all, >= key_offset + Lk
};

/// The masks of one attention call. Each is optional, and they combine: a key takes part in a
/// query's softmax only when every mask given allows it. A query row whose keys are all masked
/// gets an output of zeros, weights of zeros and a log-sum-exp of -inf (never NaN).
///
/// Element masks are rank 4, [B, H, Lq, Lk], and every extent may be 1 to broadcast:
/// to_rank<4>(v) turns a [Lq, Lk] view into [1, 1, Lq, Lk].
template <class T>
struct attention_mask {
  /// Key padding, the usual cross-attention mask: batch item b has kv_lengths(b) real keys,
  /// keys j >= kv_lengths(b) are padding. [B], each value in [0, Lk].
  std::optional<tensor_view<const index_t, 1>> kv_lengths;
  /// true where query i may attend key j, false where it must not. [B|1, H|1, Lq|1, Lk|1]
  std::optional<tensor_view<const bool, 4>> allowed;
  /// Added to the scaled scores before the softmax; -inf entries mask. [B|1, H|1, Lq|1, Lk|1]
  std::optional<tensor_view<const T, 4>> bias;
  /// Causal masking. Its alignment counts all Lk keys, whatever kv_lengths says.
  causal_mask causal = causal_mask::none;
  /// Set when the call holds a slice of longer sequences: kv_lengths (then each value in
  /// [0, window's kv_len]) and causal count positions in those sequences; see position_window.
  std::optional<position_window> window;
};

/// Options shared by the attention kernels.
///
/// Non-finite values, the same in every kernel (nothing crashes; the argument checks never look
/// at element values):
/// - A score of -inf (a -inf bias, or -inf in q or k) masks its key, like any other mask.
/// - A NaN score (NaN in q, k or the bias, or Inf · 0 inside a dot product) or a +inf score (an
///   Inf input, or a product beyond the element type's range, see scale) of a key that a query
///   row may see makes that row's output, all its weights (masked keys and keys past
///   kv_lengths too) and its log-sum-exp NaN. Other rows keep their values, and so do rows for
///   which a mask hides the key.
/// - NaN or Inf in v's row j reaches the same column of the output of every query that gives
///   key j a weight above 0, and may reach queries whose weight for key j is 0 (0 · Inf is NaN).
/// - Keys at or past mask.kv_lengths(b) are never read: padding may hold anything, even NaN.
template <class T>
struct attention_options {
  /// Multiplies Q Kᵀ. Unset: 1/sqrt(Dk). Every kernel applies it to the queries first: a score
  /// is (scale · q, rounded to T) · k, computed in T (float for the half types, which widen q
  /// and k first: see half.hpp). So scale · q must fit in T even where the
  /// score would (scale 1e30 on q = 1e10 overflows float to inf, and the row becomes NaN by the
  /// policy above), while q · k alone may exceed T's range (scale 1e-30 on q = k = 1e30 gives
  /// scores of 1e30). The same queries, keys and scale give the same scores in every kernel.
  std::optional<double> scale;
  /// Which keys each query may attend; see attention_mask.
  attention_mask<T> mask;
  /// If set, receives the attention weights P (rows sum to 1). [B, H, Lq, Lk]. In float for
  /// the half types (statistic_t, half.hpp).
  std::optional<tensor_view<statistic_t<T>, 4>> weights_out;
  /// If set, receives each row's log-sum-exp of the scaled, masked scores. [B, H, Lq]. In
  /// float for the half types.
  std::optional<tensor_view<statistic_t<T>, 3>> lse_out;
};

/// How tiled_attention cuts its work. Unset fields are chosen by the kernel: tile sizes from Dk,
/// Dv and the cache size, the thread count from OpenMP (1 without OpenMP). A set field must be
/// >= 1 (a value_error otherwise). The result does not depend on num_threads, bit for bit.
struct tile_options {
  std::optional<index_t> q_tile;   ///< query rows per tile
  std::optional<index_t> kv_tile;  ///< key/value rows per tile
  std::optional<int> num_threads;  ///< threads to use, in [1, 4096]; serial without OpenMP
};

}  // namespace xattn
