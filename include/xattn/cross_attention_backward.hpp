// SPDX-License-Identifier: MIT
// Training multi_head_cross_attention: training_forward keeps what the backward needs in a
// cross_attention_saved<T> the caller owns, and training_backward turns dL/dout into the
// gradients of the three inputs and of all four projections. The attention part is
// attention_backward.hpp; this file adds the chain rule through the projections.
#pragma once

#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/config.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/detail/overlap.hpp"
#include "xattn/errors.hpp"
#include "xattn/options.hpp"
#include "xattn/projection.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace xattn {

/// What training_forward keeps for training_backward; the caller owns one per forward whose
/// gradients it wants. With H heads of width Dk over Hkv key/value heads it holds, per query
/// token, Q and the attention output O (2·H·Dk values) and a log-sum-exp per head (H values);
/// per context token K and V (2·Hkv·Dk values) unless they were read from a context_cache. It
/// never holds an [Lq, Lk] matrix.
///
/// It refers to, and does not copy, the forward's inputs (query, context, values), its masks
/// and, for the cache overload, the cache: they must stay alive and unchanged until the
/// backward, as PyTorch's autograd keeps its saved tensors. Movable, not copyable.
template <class T>
struct cross_attention_saved {
  cross_attention_saved() = default;
  cross_attention_saved(const cross_attention_saved&) = delete;
  cross_attention_saved& operator=(const cross_attention_saved&) = delete;
  cross_attention_saved(cross_attention_saved&&) noexcept = default;
  cross_attention_saved& operator=(cross_attention_saved&&) noexcept = default;

  index_t batch = 0, q_len = 0, kv_len = 0;
  tensor_view<const T, 3> query, context, values;  ///< the forward's inputs, referenced
  row_matrix<T> q, o;                              ///< Q and the attention output, [B·Lq, H·Dk]
  row_matrix<T> k, v;                  ///< K and V, [B·Lk, Hkv·Dk] (empty when read from a cache)
  tensor_view<const T, 4> keys, vals;  ///< the key and value heads the kernel read
  row_matrix<T> lse;                   ///< the forward's log-sum-exp, [B·H, Lq]
  attention_options<T> opts;  ///< scale, masks (key padding folded in) and lse, as the kernel saw
  attention_kernel kernel = attention_kernel::tiled;
  tile_options tiles;
  std::vector<index_t> lengths;     ///< key padding folded into kv_lengths
  std::unique_ptr<bool[]> allowed;  ///< key padding folded into an allowed mask
};

namespace detail {

/// A [B, L, D] view copied into a [B·L, D] matrix.
template <class T>
row_matrix<T> gather_rows(const tensor_view<const T, 3>& x) {
  row_matrix<T> m(x.extent(0) * x.extent(1), x.extent(2));
  for (index_t b = 0; b < x.extent(0); ++b)
    m.middleRows(b * x.extent(1), x.extent(1)) = as_strided_matrix(x.select(0, b));
  return m;
}

/// A [B·L, D] matrix written into a [B, L, D] view.
template <class T, class M>
void scatter_rows(const tensor_view<T, 3>& x, const M& m) {
  for (index_t b = 0; b < x.extent(0); ++b)
    as_strided_matrix(x.select(0, b)) = m.middleRows(b * x.extent(1), x.extent(1));
}

template <class T>
tensor_view<T, 3> rows_view(row_matrix<T>& m, index_t batch, index_t len) {
  return tensor_view<T, 3>(m.data(), {batch, len, index_t(m.cols())});
}

// PyTorch's key_padding_mask (true = ignore) folded into the saved mask, as
// multi_head_cross_attention::forward folds it: kv_lengths when every row is padding only at its
// end, else an allowed mask [B, H|1, Lq|1, Lk] combined with the caller's.
template <class T>
void fold_key_padding(const char* fn, const tensor_view<const bool, 2>& pad,
                      const attention_shape& s, cross_attention_saved<T>& saved) {
  attention_mask<T>& mask = saved.opts.mask;
  const index_t B = s.batch, Lk = s.kv_len;
  require_extent(fn, "key_padding_mask", 0, pad.extent(0), B);
  require_extent(fn, "key_padding_mask", 1, pad.extent(1), Lk);
  if (mask.kv_lengths) require_extent(fn, "mask.kv_lengths", 0, mask.kv_lengths->extent(0), B);
  if (mask.allowed) require_broadcastable(fn, "mask.allowed", *mask.allowed, s);
  saved.lengths.assign(std::size_t(B), Lk);
  bool suffix = true;
  for (index_t b = 0; b < B; ++b) {
    index_t first = Lk;
    for (index_t j = 0; j < Lk && first == Lk; ++j)
      if (pad(b, j)) first = j;
    for (index_t j = first; j < Lk; ++j) suffix = suffix && pad(b, j);
    index_t len = first;
    if (mask.kv_lengths) {
      const index_t theirs = (*mask.kv_lengths)(b);
      if (theirs < 0 || theirs > Lk)
        fail_value(message(fn, ": mask.kv_lengths(", b, ") is ", theirs,
                           ", expected a value in [0, ", Lk, "]"));
      len = std::min(len, theirs);
    }
    saved.lengths[std::size_t(b)] = len;
  }
  if (suffix) {
    mask.kv_lengths = tensor_view<const index_t, 1>(saved.lengths.data(), {B});
    return;
  }
  const index_t H = mask.allowed ? mask.allowed->extent(1) : 1;
  const index_t Lq = mask.allowed ? mask.allowed->extent(2) : 1;
  const index_t n = checked_mul(fn, checked_mul(fn, B * H, Lq), Lk);
  saved.allowed.reset(new bool[std::size_t(n)]);
  const tensor_view<bool, 4> allowed(saved.allowed.get(), {B, H, Lq, Lk});
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Lq; ++i)
        for (index_t j = 0; j < Lk; ++j) {
          bool ok = !pad(b, j);
          if (mask.allowed) {
            const auto& a = *mask.allowed;
            ok = ok && a(a.extent(0) == 1 ? 0 : b, h, i, a.extent(3) == 1 ? 0 : j);
          }
          allowed(b, h, i, j) = ok;
        }
  mask.allowed = tensor_view<const bool, 4>(allowed);
}

/// training_forward past its checks: fills saved and writes out (the caller empties saved if
/// anything here throws: an allocation, or a key padding folded into a position window).
template <class T>
void training_forward_fill(const char* fn, const multi_head_cross_attention<T>& mha,
                           const tensor_view<const T, 3>& query, const context_cache<T>* cache,
                           const tensor_view<const T, 3>& context,
                           const tensor_view<const T, 3>& values, const tensor_view<T, 3>& out,
                           cross_attention_saved<T>& saved, const cross_attention_options<T>& opts,
                           const attention_shape& s) {
  const cross_attention_config& c = mha.config();
  const cross_attention_weights<T>& w = mha.weights();
  const index_t B = s.batch, Lq = s.q_len, Lk = s.kv_len, H = s.num_heads;
  const index_t width = c.num_heads * c.head_dim, kv_width = c.num_kv_heads * c.head_dim;
  saved.batch = B;
  saved.q_len = Lq;
  saved.kv_len = Lk;
  saved.query = query;
  saved.context = context;
  saved.values = values;
  saved.kernel = opts.kernel;
  saved.tiles = opts.tiles;
  saved.opts = attention_options<T>{};
  saved.opts.scale = opts.scale ? opts.scale : c.scale;
  saved.opts.mask = opts.mask;
  saved.opts.weights_out = opts.weights_out;
  if (opts.key_padding_mask) fold_key_padding(fn, *opts.key_padding_mask, s, saved);

  saved.q.resize(checked_mul(fn, B, Lq), width);
  saved.o.resize(B * Lq, width);
  saved.lse.resize(B * H, Lq);
  row_matrix<T> scratch;
  w.q_proj.forward(query, rows_view(saved.q, B, Lq), scratch);
  if (cache) {
    saved.k.resize(0, 0);
    saved.v.resize(0, 0);
    saved.keys = cache->keys();
    saved.vals = cache->values();
  } else {
    saved.k.resize(checked_mul(fn, B, Lk), kv_width);
    saved.v.resize(B * Lk, kv_width);
    w.k_proj.forward(context, rows_view(saved.k, B, Lk), scratch);
    w.v_proj.forward(values, rows_view(saved.v, B, Lk), scratch);
    const index_t hkv = c.num_kv_heads;
    saved.keys = split_heads(tensor_view<const T, 3>(rows_view(saved.k, B, Lk)), hkv);
    saved.vals = split_heads(tensor_view<const T, 3>(rows_view(saved.v, B, Lk)), hkv);
  }
  saved.opts.lse_out = tensor_view<T, 3>(saved.lse.data(), {B, H, Lq});
  const auto qh = split_heads(tensor_view<const T, 3>(rows_view(saved.q, B, Lq)), H);
  const auto oh = split_heads(rows_view(saved.o, B, Lq), H);
  if (saved.kernel == attention_kernel::naive)
    naive_attention<T>(qh, saved.keys, saved.vals, oh, saved.opts);
  else
    tiled_attention<T>(qh, saved.keys, saved.vals, oh, saved.opts, saved.tiles);
  saved.opts.weights_out.reset();  // an output of the forward only
  w.out_proj.forward(tensor_view<const T, 3>(rows_view(saved.o, B, Lq)), out, scratch);
}

template <class T>
void training_forward_impl(const char* fn, const multi_head_cross_attention<T>& mha,
                           const tensor_view<const T, 3>& query, const context_cache<T>* cache,
                           const tensor_view<const T, 3>& context,
                           const tensor_view<const T, 3>& values, const tensor_view<T, 3>& out,
                           cross_attention_saved<T>& saved,
                           const cross_attention_options<T>& opts) {
  static_assert(std::is_floating_point_v<T>,
                "training needs a float or double module; a half module runs inference only");
  const cross_attention_config& c = mha.config();
  const index_t B = query.extent(0), Lq = query.extent(1), Lk = context.extent(1);
  const index_t H = c.num_heads;
  require_extent(fn, "query", 2, query.extent(2), c.model_dim);
  require_extent(fn, "context", 0, context.extent(0), B);
  require_extent(fn, "context", 2, context.extent(2), c.context_dim);
  require_extent(fn, "values", 0, values.extent(0), B);
  require_extent(fn, "values", 1, values.extent(1), Lk);
  require_extent(fn, "values", 2, values.extent(2), c.value_context_dim);
  require_extent(fn, "out", 0, out.extent(0), B);
  require_extent(fn, "out", 1, out.extent(1), Lq);
  require_extent(fn, "out", 2, out.extent(2), c.model_dim);
  if (cache) {
    if (!cache->usable())
      fail_value(message(fn,
                         ": the cache is unusable: an earlier encode_context into it failed "
                         "while writing; encode a context into it again"));
    if (cache->batch() != B || cache->kv_len() != Lk)
      fail_shape(message(fn, ": the cache holds ", cache->batch(), " contexts of ", cache->kv_len(),
                         " keys, expected ", B, " of ", Lk, " (the context it was encoded from)"));
    if (cache->num_kv_heads() != c.num_kv_heads || cache->head_dim() != c.head_dim)
      fail_shape(message(fn, ": the cache holds ", cache->num_kv_heads(), " heads of width ",
                         cache->head_dim(), ", expected ", c.num_kv_heads, " of width ",
                         c.head_dim));
  }
  if (opts.average_weights_out)
    fail_value(message(fn, ": average_weights_out is not supported in training; use weights_out"));
  require_no_self_overlap(fn, "out", out);
  require_disjoint(fn, "out", out, "query", query);
  require_disjoint(fn, "out", out, "context", context);
  require_disjoint(fn, "out", out, "values", values);
  // The attention's arguments too, before saved is written: a rejected call leaves it as it
  // was (the kernel would check them only after the projections had filled saved).
  const attention_shape s{B, H, Lq, Lk, c.head_dim, c.head_dim, c.num_kv_heads};
  {
    attention_options<T> ao;
    ao.scale = opts.scale ? opts.scale : c.scale;
    ao.mask = opts.mask;
    (void)check_scale_and_mask<T>(fn, s, ao);
    if (opts.weights_out) {
      const tensor_view<T, 4>& wo = *opts.weights_out;
      const index_t want[4] = {B, H, Lq, Lk};
      for (int r = 0; r < 4; ++r)
        require_extent(fn, "weights_out", r, wo.extent(std::size_t(r)), want[r]);
      require_no_self_overlap(fn, "weights_out", wo);
      require_disjoint(fn, "weights_out", wo, "out", out);
      require_disjoint(fn, "weights_out", wo, "query", query);
      require_disjoint(fn, "weights_out", wo, "context", context);
      require_disjoint(fn, "weights_out", wo, "values", values);
    }
    if (opts.key_padding_mask) {
      require_extent(fn, "key_padding_mask", 0, opts.key_padding_mask->extent(0), B);
      require_extent(fn, "key_padding_mask", 1, opts.key_padding_mask->extent(1), Lk);
    }
    if (opts.kernel == attention_kernel::tiled) check_tile_options(fn, opts.tiles);
  }
  // Past the checks what can still throw (above all a failure to allocate) empties saved, so
  // that training_backward rejects it instead of mixing two forwards.
  try {
    training_forward_fill(fn, mha, query, cache, context, values, out, saved, opts, s);
  } catch (...) {
    saved.q.resize(0, 0);
    saved.opts.lse_out.reset();
    throw;
  }
}

template <class T>
void require_same_shape(const char* fn, const char* name, const linear<T>& g, const linear<T>& w) {
  if (g.weight.rows() != w.weight.rows() || g.weight.cols() != w.weight.cols() ||
      g.bias.size() != w.bias.size())
    fail_shape(message(fn, ": grads.", name, " is [", g.weight.rows(), ", ", g.weight.cols(),
                       "] with a bias of ", g.bias.size(), ", expected [", w.weight.rows(), ", ",
                       w.weight.cols(), "] with a bias of ", w.bias.size(),
                       " (make it with zero_weights of the module's config)"));
}

}  // namespace detail

/// The module's forward for training: as multi_head_cross_attention::forward, and fills `saved`
/// for training_backward.
///
///   query [B, Lq, Dm]   context [B, Lk, Dc]   values [B, Lk, Dcv]   out [B, Lq, Dm] (written)
///
/// opts as for forward (masks, key_padding_mask, scale, kernel, tiles, weights_out);
/// average_weights_out is not supported here (a value_error).
template <class T>
void training_forward(const multi_head_cross_attention<T>& mha,
                      detail::identity_t<tensor_view<const T, 3>> query,
                      detail::identity_t<tensor_view<const T, 3>> context,
                      detail::identity_t<tensor_view<const T, 3>> values,
                      detail::identity_t<tensor_view<T, 3>> out, cross_attention_saved<T>& saved,
                      const cross_attention_options<T>& opts = {}) {
  detail::training_forward_impl<T>("training_forward", mha, query, nullptr, context, values, out,
                                   saved, opts);
}

/// As above, with keys and values read from `cache` (encode_context of this context and values,
/// with the module's current weights) instead of projected again: a decoder trained with teacher
/// forcing against one encoded context. context and values are still needed: the backward
/// computes their gradients, and those of k_proj and v_proj, from them.
template <class T>
void training_forward(const multi_head_cross_attention<T>& mha,
                      detail::identity_t<tensor_view<const T, 3>> query,
                      const context_cache<T>& cache,
                      detail::identity_t<tensor_view<const T, 3>> context,
                      detail::identity_t<tensor_view<const T, 3>> values,
                      detail::identity_t<tensor_view<T, 3>> out,
                      cross_attention_saved<T>& saved,
                      const cross_attention_options<T>& opts = {}) {
  detail::training_forward_impl<T>("training_forward", mha, query, &cache, context, values, out,
                                   saved, opts);
}

/// The gradients of one training_forward, given dL/dout:
///
///   dout     [B, Lq, Dm]    dL/dout
///   dquery   [B, Lq, Dm]    written: dL/dquery
///   dcontext [B, Lk, Dc]    written: dL/dcontext through the keys
///   dvalues  [B, Lk, Dcv]   written: dL/dvalues through the values (when keys and values came
///                           from one context, its gradient is dcontext + dvalues)
///   grads                   shaped like the module's weights (zero_weights of its config):
///                           each projection's weight and bias gradient is ADDED to it, so
///                           several backward calls (a batch split in parts) accumulate
///
/// The mha must hold the weights the forward ran with. The attention gradients come from
/// tiled_attention_backward or naive_attention_backward, the kernel the forward used (the tiled
/// one's are the same, bit for bit, for every tiles.num_threads); the projections' products run
/// through Eigen's GEMM, as in forward.
template <class T>
void training_backward(const multi_head_cross_attention<T>& mha,
                       const cross_attention_saved<T>& saved,
                       detail::identity_t<tensor_view<const T, 3>> dout,
                       detail::identity_t<tensor_view<T, 3>> dquery,
                       detail::identity_t<tensor_view<T, 3>> dcontext,
                       detail::identity_t<tensor_view<T, 3>> dvalues,
                       cross_attention_weights<T>& grads) {
  static_assert(std::is_floating_point_v<T>,
                "training needs a float or double module; a half module runs inference only");
  constexpr const char* fn = "training_backward";
  const cross_attention_config& c = mha.config();
  const cross_attention_weights<T>& w = mha.weights();
  const index_t B = saved.batch, Lq = saved.q_len, Lk = saved.kv_len;
  const index_t H = c.num_heads, hkv = c.num_kv_heads;
  if (saved.q.rows() != B * Lq || saved.q.cols() != H * c.head_dim || !saved.opts.lse_out)
    detail::fail_value(
        detail::message(fn, ": saved does not hold a training_forward of this module"));
  const auto require3 = [&](const char* name, const auto& x, index_t l, index_t d) {
    detail::require_extent(fn, name, 0, x.extent(0), B);
    detail::require_extent(fn, name, 1, x.extent(1), l);
    detail::require_extent(fn, name, 2, x.extent(2), d);
  };
  require3("dout", dout, Lq, c.model_dim);
  require3("dquery", dquery, Lq, c.model_dim);
  require3("dcontext", dcontext, Lk, c.context_dim);
  require3("dvalues", dvalues, Lk, c.value_context_dim);
  detail::require_same_shape(fn, "q_proj", grads.q_proj, w.q_proj);
  detail::require_same_shape(fn, "k_proj", grads.k_proj, w.k_proj);
  detail::require_same_shape(fn, "v_proj", grads.v_proj, w.v_proj);
  detail::require_same_shape(fn, "out_proj", grads.out_proj, w.out_proj);
  // The gradients the call adds to, and the module's weights it reads, as flat views.
  const auto flat = [](const auto& m) {
    return tensor_view<const T, 1>(m.data(), {index_t(m.size())});
  };
  const std::pair<const char*, const linear<T>*> layers[] = {
      {"q_proj", &grads.q_proj},
      {"k_proj", &grads.k_proj},
      {"v_proj", &grads.v_proj},
      {"out_proj", &grads.out_proj}};
  const auto apart = [&](const char* name, const auto& o) {
    detail::require_no_self_overlap(fn, name, o);
    detail::require_disjoint(fn, name, o, "dout", dout);
    detail::require_disjoint(fn, name, o, "query", saved.query);
    detail::require_disjoint(fn, name, o, "context", saved.context);
    detail::require_disjoint(fn, name, o, "values", saved.values);
    for (const auto& [layer, g] : layers) {
      detail::require_disjoint(fn, name, o, detail::message("grads.", layer, ".weight").c_str(),
                               flat(g->weight));
      detail::require_disjoint(fn, name, o, detail::message("grads.", layer, ".bias").c_str(),
                               flat(g->bias));
    }
    for (const linear<T>* l : {&w.q_proj, &w.k_proj, &w.v_proj, &w.out_proj}) {
      detail::require_disjoint(fn, name, o, "the module's weights", flat(l->weight));
      detail::require_disjoint(fn, name, o, "the module's weights", flat(l->bias));
    }
  };
  apart("dquery", dquery);
  apart("dcontext", dcontext);
  apart("dvalues", dvalues);
  detail::require_disjoint(fn, "dcontext", dcontext, "dquery", dquery);
  detail::require_disjoint(fn, "dvalues", dvalues, "dquery", dquery);
  detail::require_disjoint(fn, "dvalues", dvalues, "dcontext", dcontext);

  // out = O Woᵀ + bo:  dWo += dOutᵀ O,  dbo += Σ_rows dOut,  dO = dOut Wo
  const row_matrix<T> g_out = detail::gather_rows(dout);
  detail::product<T>(grads.out_proj.weight, g_out, true, saved.o, false, true);
  if (grads.out_proj.has_bias()) grads.out_proj.bias += g_out.colwise().sum();
  row_matrix<T> d_o(g_out.rows(), w.out_proj.weight.cols());
  detail::product<T>(d_o, g_out, false, w.out_proj.weight, false, false);

  // The attention itself (attention_backward.hpp).
  row_matrix<T> d_q(B * Lq, H * c.head_dim), d_k(B * Lk, hkv * c.head_dim),
      d_v(B * Lk, hkv * c.head_dim);
  const auto heads = [](row_matrix<T>& m, index_t batch, index_t len, index_t n) {
    return split_heads(detail::rows_view(m, batch, len), n);
  };
  const auto cheads = [](const row_matrix<T>& m, index_t batch, index_t len, index_t n) {
    return split_heads(tensor_view<const T, 3>(m.data(), {batch, len, index_t(m.cols())}), n);
  };
  const attention_grads<T> ag{heads(d_q, B, Lq, H), heads(d_k, B, Lk, hkv), heads(d_v, B, Lk, hkv),
                              std::nullopt};
  const auto qh = cheads(saved.q, B, Lq, H), oh = cheads(saved.o, B, Lq, H);
  const auto doh = cheads(d_o, B, Lq, H);
  if (saved.kernel == attention_kernel::naive)
    naive_attention_backward<T>(qh, saved.keys, saved.vals, oh, doh, ag, saved.opts);
  else
    tiled_attention_backward<T>(qh, saved.keys, saved.vals, oh, doh, ag, saved.opts, saved.tiles);

  // Each input projection y = x Wᵀ + b:  dW += dYᵀ x,  db += Σ_rows dY,  dx = dY W
  const auto through = [](const tensor_view<const T, 3>& x, const row_matrix<T>& dy,
                          const linear<T>& lin, linear<T>& g, const tensor_view<T, 3>& dx) {
    const row_matrix<T> xm = detail::gather_rows(x);
    detail::product<T>(g.weight, dy, true, xm, false, true);
    if (g.has_bias()) g.bias += dy.colwise().sum();
    row_matrix<T> dxm(dy.rows(), lin.weight.cols());
    detail::product<T>(dxm, dy, false, lin.weight, false, false);
    detail::scatter_rows(dx, dxm);
  };
  through(saved.query, d_q, w.q_proj, grads.q_proj, dquery);
  through(saved.context, d_k, w.k_proj, grads.k_proj, dcontext);
  through(saved.values, d_v, w.v_proj, grads.v_proj, dvalues);
}

}  // namespace xattn
