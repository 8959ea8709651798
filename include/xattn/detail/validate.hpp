// SPDX-License-Identifier: MIT
// The argument checks every attention kernel runs once at its entry, before any work.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/overlap.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/options.hpp"
#include "xattn/quantized.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

namespace xattn::detail {

/// What the checks establish: the sizes, the scale to use, and how many query heads share
/// one key/value head.
struct attention_problem {
  attention_shape shape;
  double scale = 1.0;
  index_t group = 1;  ///< H / Hkv: query head h reads key/value head h / group
};

template <class E>
void require_broadcastable(const char* fn, const char* arg, const tensor_view<E, 4>& m,
                           const attention_shape& s) {
  const index_t want[4] = {s.batch, s.num_heads, s.q_len, s.kv_len};
  for (int r = 0; r < 4; ++r) require_extent_or_one(fn, arg, r, m.extent(std::size_t(r)), want[r]);
}

/// Checks the sizes in s: every field >= 0, and Hkv (when set) divides H.
inline void check_shape(const char* fn, const attention_shape& s) {
  const std::pair<const char*, index_t> fields[] = {{"batch", s.batch},
                                                    {"num_heads", s.num_heads},
                                                    {"q_len", s.q_len},
                                                    {"kv_len", s.kv_len},
                                                    {"head_dim", s.head_dim},
                                                    {"value_dim", s.value_dim},
                                                    {"num_kv_heads", s.num_kv_heads}};
  for (const auto& f : fields)
    if (f.second < 0)
      fail_shape(message(fn, ": shape.", f.first, " is ", f.second, ", expected >= 0"));
  if (s.num_kv_heads > 0 && s.num_heads % s.num_kv_heads != 0)
    fail_shape(message(fn, ": shape.num_kv_heads is ", s.num_kv_heads,
                       ", expected a divisor of shape.num_heads = ", s.num_heads));
}

/// The sizes q [B, H, Lq, Dk], k [B, Hkv, Lk, Dk] and v [B, Hkv, Lk, Dv] describe, after
/// checking that they agree (Hkv divides H); throws shape_error naming `fn`. For k and v of a
/// quantized block type (quantized.hpp) their last extent counts blocks, ceil(Dk / 32) and
/// ceil(Dv / 32), each row's blocks contiguous, and Dv is `value_dim` (the output's).
template <class Q, class KV>
attention_shape check_qkv_shapes(const char* fn, const tensor_view<const Q, 4>& q,
                                 const tensor_view<const KV, 4>& k,
                                 const tensor_view<const KV, 4>& v, index_t value_dim = -1) {
  attention_shape s;
  s.batch = q.extent(0);
  s.num_heads = q.extent(1);
  s.q_len = q.extent(2);
  s.head_dim = q.extent(3);
  s.num_kv_heads = k.extent(1);
  s.kv_len = k.extent(2);
  s.value_dim = is_quant_block_v<KV> ? value_dim : v.extent(3);

  require_extent(fn, "k", 0, k.extent(0), s.batch);
  if (s.num_kv_heads == 0 ? s.num_heads != 0 : s.num_heads % s.num_kv_heads != 0)
    fail_shape(message(fn, ": k.extent(1) is ", s.num_kv_heads,
                       ", expected a divisor of q.extent(1) = ", s.num_heads));
  if constexpr (is_quant_block_v<KV>) {
    require_extent(fn, "k", 3, k.extent(3), quant_blocks_per_row(s.head_dim));
    require_extent(fn, "v", 3, v.extent(3), quant_blocks_per_row(s.value_dim));
    const auto blocks_contiguous = [&](const char* name, const tensor_view<const KV, 4>& x) {
      if (x.extent(3) > 1 && x.stride(3) != 1)
        fail_shape(message(fn, ": ", name, ".stride(3) is ", x.stride(3),
                           ", expected 1 (the blocks of a row must be contiguous)"));
    };
    blocks_contiguous("k", k);
    blocks_contiguous("v", v);
  } else {
    require_extent(fn, "k", 3, k.extent(3), s.head_dim);
  }
  require_extent(fn, "v", 0, v.extent(0), s.batch);
  require_extent(fn, "v", 1, v.extent(1), s.num_kv_heads);
  require_extent(fn, "v", 2, v.extent(2), s.kv_len);
  return s;
}

/// An output `o` named `name` must not overlap itself, q, k, v or any mask of m: the kernels
/// read inputs after writing outputs, and threads write outputs concurrently.
template <class T, class KV, class Out>
void require_apart_from_inputs(const char* fn, const char* name, const Out& o,
                               const tensor_view<const T, 4>& q, const tensor_view<const KV, 4>& k,
                               const tensor_view<const KV, 4>& v, const attention_mask<T>& m) {
  require_no_self_overlap(fn, name, o);
  require_disjoint(fn, name, o, "q", q);
  require_disjoint(fn, name, o, "k", k);
  require_disjoint(fn, name, o, "v", v);
  if (m.kv_lengths) require_disjoint(fn, name, o, "mask.kv_lengths", *m.kv_lengths);
  if (m.allowed) require_disjoint(fn, name, o, "mask.allowed", *m.allowed);
  if (m.bias) require_disjoint(fn, name, o, "mask.bias", *m.bias);
}

/// Checks opts.scale and opts.mask against the sizes in s (taken from the kernel's q, k and v);
/// returns the problem they describe. Throws shape_error or value_error naming `fn`.
template <class T>
attention_problem check_scale_and_mask(const char* fn, const attention_shape& s,
                                       const attention_options<T>& opts) {
  attention_problem p;
  p.shape = s;
  p.group = s.num_kv_heads > 0 ? s.num_heads / s.num_kv_heads : 1;
  p.scale = opts.scale ? *opts.scale : (s.head_dim > 0 ? 1.0 / std::sqrt(double(s.head_dim)) : 1.0);
  if (!std::isfinite(p.scale))
    fail_value(message(fn, ": scale is ", p.scale, ", expected a finite number"));
  using C = compute_t<T>;  // the scale multiplies the queries in the compute type
  if (std::abs(p.scale) > double(std::numeric_limits<C>::max()))
    fail_value(message(fn, ": scale is ", p.scale, ", expected a magnitude of at most ",
                       double(std::numeric_limits<C>::max()), " (the compute type's largest)"));

  const attention_mask<T>& m = opts.mask;
  index_t kv_total = s.kv_len;  // key positions kv_lengths counts
  if (m.window) {
    const position_window& w = *m.window;
    const auto check = [&](const char* offset_name, index_t offset, const char* len_name,
                           const std::optional<index_t>& len, index_t local) {
      if (offset < 0)
        fail_value(message(fn, ": mask.window.", offset_name, " is ", offset, ", expected >= 0"));
      if (offset > std::numeric_limits<index_t>::max() - local)
        fail_value(message(fn, ": mask.window.", offset_name, " is ", offset, ", too large"));
      if (len && *len < offset + local)
        fail_value(message(fn, ": mask.window.", len_name, " is ", *len, ", expected >= ",
                           offset + local, " (", offset_name, " + the call's ", local, ")"));
    };
    check("query_offset", w.query_offset, "query_len", w.query_len, s.q_len);
    check("key_offset", w.key_offset, "kv_len", w.kv_len, s.kv_len);
    kv_total = w.kv_len.value_or(w.key_offset + s.kv_len);
  }
  if (m.kv_lengths) {
    const auto& len = *m.kv_lengths;
    require_extent(fn, "mask.kv_lengths", 0, len.extent(0), s.batch);
    for (index_t b = 0; b < s.batch; ++b)
      if (len(b) < 0 || len(b) > kv_total)
        fail_value(message(fn, ": mask.kv_lengths(", b, ") is ", len(b),
                           ", expected a value in [0, ", kv_total, "]"));
  }
  if (m.allowed) require_broadcastable(fn, "mask.allowed", *m.allowed, s);
  if (m.bias) require_broadcastable(fn, "mask.bias", *m.bias, s);
  return p;
}

/// Checks q [B, H, Lq, Dk], k [B, Hkv, Lk, Dk], v [B, Hkv, Lk, Dv], out [B, H, Lq, Dv] (Hkv
/// divides H) and every option against them; throws shape_error or value_error naming `fn`.
/// KV, the element type of k and v, differs from T only in tiled_attention's mixed call.
template <class T, class KV = T>
attention_problem check_attention_args(const char* fn, const tensor_view<const T, 4>& q,
                                       const tensor_view<const KV, 4>& k,
                                       const tensor_view<const KV, 4>& v,
                                       const tensor_view<T, 4>& out,
                                       const attention_options<T>& opts) {
  const attention_shape s = check_qkv_shapes(fn, q, k, v, out.extent(3));
  require_extent(fn, "out", 0, out.extent(0), s.batch);
  require_extent(fn, "out", 1, out.extent(1), s.num_heads);
  require_extent(fn, "out", 2, out.extent(2), s.q_len);
  require_extent(fn, "out", 3, out.extent(3), s.value_dim);

  const attention_problem p = check_scale_and_mask<T>(fn, s, opts);
  const attention_mask<T>& m = opts.mask;
  if (opts.weights_out) {
    const index_t want[4] = {s.batch, s.num_heads, s.q_len, s.kv_len};
    for (int r = 0; r < 4; ++r)
      require_extent(fn, "weights_out", r, opts.weights_out->extent(std::size_t(r)), want[r]);
  }
  if (opts.lse_out) {
    const index_t want[3] = {s.batch, s.num_heads, s.q_len};
    for (int r = 0; r < 3; ++r)
      require_extent(fn, "lse_out", r, opts.lse_out->extent(std::size_t(r)), want[r]);
  }

  // No output may share memory with an input or another output, nor elements with itself:
  // the kernels read inputs after writing outputs, and threads write outputs concurrently.
  const auto require_output_apart = [&](const char* name, const auto& o) {
    require_apart_from_inputs(fn, name, o, q, k, v, m);
  };
  require_output_apart("out", out);
  if (opts.weights_out) {
    require_output_apart("weights_out", *opts.weights_out);
    require_disjoint(fn, "weights_out", *opts.weights_out, "out", out);
  }
  if (opts.lse_out) {
    require_output_apart("lse_out", *opts.lse_out);
    require_disjoint(fn, "lse_out", *opts.lse_out, "out", out);
    if (opts.weights_out)
      require_disjoint(fn, "lse_out", *opts.lse_out, "weights_out", *opts.weights_out);
  }
  return p;
}

}  // namespace xattn::detail
