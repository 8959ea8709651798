// SPDX-License-Identifier: MIT
// attention_shape: the sizes of one attention call, in the vocabulary used everywhere in xattn
// (B, H, Lq, Lk, Dk, Dv), and the FLOP count that benchmarks report.
#pragma once

#include "xattn/config.hpp"

namespace xattn {

/// Sizes of one attention call. Q is [B, H, Lq, Dk], K is [B, Hkv, Lk, Dk], V is [B, Hkv, Lk, Dv]
/// and the output is [B, H, Lq, Dv]. Lq and Lk are unrelated (cross-attention).
struct attention_shape {
  index_t batch = 1;         ///< B: independent sequences
  index_t num_heads = 1;     ///< H: query heads
  index_t q_len = 0;         ///< Lq: query positions (target side)
  index_t kv_len = 0;        ///< Lk: key/value positions (context side)
  index_t head_dim = 0;      ///< Dk: per-head width of q and k
  index_t value_dim = 0;     ///< Dv: per-head width of v and of the output
  index_t num_kv_heads = 0;  ///< Hkv: key/value heads (0 means num_heads); divides num_heads

  /// Hkv with the 0 default resolved.
  constexpr index_t kv_heads() const noexcept {
    return num_kv_heads > 0 ? num_kv_heads : num_heads;
  }
};

/// Forward FLOPs: 2·B·H·Lq·Lk·Dk for Q Kᵀ plus 2·B·H·Lq·Lk·Dv for P V (softmax not counted).
/// With Dk = Dv = D this is the usual 4·B·H·Lq·Lk·D.
constexpr double attention_flops(const attention_shape& s) noexcept {
  return 2.0 * double(s.batch) * double(s.num_heads) * double(s.q_len) * double(s.kv_len) *
         double(s.head_dim + s.value_dim);
}

}  // namespace xattn
