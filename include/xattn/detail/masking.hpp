// SPDX-License-Identifier: MIT
// mask_plan: the masks of one call resolved once (broadcast strides, key padding, causal
// limits), so the kernels can ask per query row which keys survive.
#pragma once

#include "xattn/config.hpp"
#include "xattn/half.hpp"
#include "xattn/options.hpp"
#include "xattn/shapes.hpp"

#include <algorithm>
#include <array>
#include <limits>
#include <optional>

namespace xattn::detail {

/// T is the element type of the bias; scores are compute_t<T> (float for the half types).
template <class T>
class mask_plan {
 public:
  using C = compute_t<T>;

  /// The masks must already have been checked against the shape (see validate.hpp).
  mask_plan(const attention_mask<T>& m, const attention_shape& s)
      : kv_lengths_(m.kv_lengths), causal_(m.causal), kv_len_(s.kv_len) {
    const position_window w = m.window.value_or(position_window{});
    q_offset_ = w.query_offset;
    k_offset_ = w.key_offset;
    q_total_ = w.query_len.value_or(w.query_offset + s.q_len);
    k_total_ = w.kv_len.value_or(w.key_offset + s.kv_len);
    if (m.allowed) {
      allowed_ = m.allowed->data();
      allowed_strides_ = broadcast_strides(*m.allowed);
    }
    if (m.bias) {
      bias_ = m.bias->data();
      bias_strides_ = broadcast_strides(*m.bias);
    }
  }

  /// True when some mask needs a look at each score (a boolean mask or a bias).
  bool has_elementwise() const noexcept { return allowed_ != nullptr || bias_ != nullptr; }
  /// True when any mask is set.
  bool any() const noexcept {
    return has_elementwise() || kv_lengths_.has_value() || causal_ != causal_mask::none;
  }

  /// The keys of batch item b that key padding leaves (the rest are never read). In [0, Lk].
  index_t keys(index_t b) const noexcept {
    return local(kv_lengths_ ? (*kv_lengths_)(b) : k_total_);
  }

  /// One past the last key that key padding and causality let query i of batch item b see;
  /// keys [key_end, Lk) are masked for that row. In [0, Lk]. Positions count the window's
  /// whole sequences (see position_window); without one they are the call's own.
  index_t key_end(index_t b, index_t i) const noexcept {
    index_t end = kv_lengths_ ? (*kv_lengths_)(b) : k_total_;
    const index_t pos = q_offset_ + i;
    if (causal_ == causal_mask::top_left) end = std::min(end, pos + 1);
    if (causal_ == causal_mask::bottom_right) end = std::min(end, pos + 1 + k_total_ - q_total_);
    return local(end);
  }

  /// For keys j0 .. j0 + n - 1 of query row (b, h, i): adds the bias to s[(j - j0) * step] and
  /// sets the score of every masked key to -inf, so its exp is exactly 0.
  void apply(index_t b, index_t h, index_t i, index_t j0, C* s, index_t n,
             index_t step = 1) const noexcept {
    constexpr C neg_inf = -std::numeric_limits<C>::infinity();
    const index_t end = key_end(b, i);
    const T* bias_row = bias_ ? bias_ + offset(bias_strides_, b, h, i) : nullptr;
    const bool* allowed_row = allowed_ ? allowed_ + offset(allowed_strides_, b, h, i) : nullptr;
    for (index_t t = 0; t < n; ++t) {
      const index_t j = j0 + t;
      C& x = s[t * step];
      if (bias_row) x += static_cast<C>(bias_row[j * bias_strides_[3]]);
      if (j >= end || (allowed_row && !allowed_row[j * allowed_strides_[3]])) x = neg_inf;
    }
  }

  /// False when the boolean mask forbids every key j0 .. j0 + n - 1 to every query
  /// i0 .. i0 + m - 1 of (b, h): such a tile can be skipped. True when there is no boolean mask.
  bool allows_any(index_t b, index_t h, index_t i0, index_t m, index_t j0,
                  index_t n) const noexcept {
    if (!allowed_) return true;
    for (index_t i = i0; i < i0 + m; ++i) {
      const bool* row = allowed_ + offset(allowed_strides_, b, h, i);
      for (index_t j = j0; j < j0 + n; ++j)
        if (row[j * allowed_strides_[3]]) return true;
    }
    return false;
  }

 private:
  // A broadcast dimension (extent 1) gets stride 0, so indexing it with any b, h, i or j works.
  template <class E>
  static std::array<index_t, 4> broadcast_strides(const tensor_view<E, 4>& v) noexcept {
    std::array<index_t, 4> s{};
    for (std::size_t r = 0; r < 4; ++r) s[r] = v.extent(r) == 1 ? 0 : v.stride(r);
    return s;
  }
  static index_t offset(const std::array<index_t, 4>& s, index_t b, index_t h, index_t i) noexcept {
    return b * s[0] + h * s[1] + i * s[2];
  }

  // A key position of the whole sequence as an end index into the call's keys.
  index_t local(index_t end) const noexcept {
    return std::clamp<index_t>(end - k_offset_, 0, kv_len_);
  }

  std::optional<tensor_view<const index_t, 1>> kv_lengths_;
  causal_mask causal_;
  index_t kv_len_;
  index_t q_offset_ = 0, k_offset_ = 0, q_total_ = 0, k_total_ = 0;
  const bool* allowed_ = nullptr;
  const T* bias_ = nullptr;
  std::array<index_t, 4> allowed_strides_{}, bias_strides_{};
};

}  // namespace xattn::detail
