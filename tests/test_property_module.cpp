// SPDX-License-Identifier: MIT
// Randomised differential test of multi_head_cross_attention: draws module configurations
// (model, context and value widths, heads, grouped and multi-query key/value heads, head width,
// bias on or off) with random weights, batch-first and sequence-first inputs with padded rows,
// every library mask alone and combined with a PyTorch-style key_padding_mask (padding at the
// end or anywhere), the naive and the tiled kernel with random tiles and threads, per-head and
// head-averaged weights, and checks the module against an independent composition in long
// double: y = x Wᵀ + b by plain loops, attention head by head, the output projection. Also
// checked on every case: the context-cache path (encode_context, then forward with the cache)
// and a second forward on the same module give the same bits as the first, and nothing outside
// the output views is written.
//
// Environment (the same as test_property's):
//   XATTN_PROPERTY_SEED     the run's seed (default 1); "random" draws one and prints it
//   XATTN_PROPERTY_CASES    kernel cases per element type (default 5000); this test runs a fifth
//                           as many module cases (at least 1), each being several forwards
//   XATTN_PROPERTY_SECONDS  time budget per element type (default 50); the run stops early,
//                           passing, and says how many cases it ran
//   XATTN_PROPERTY_CASE     replay just this case seed (printed with every failure)
// A failure prints the case seed and the whole configuration. Cases are drawn with the
// standard library's distributions, so a seed replays on the same standard library.
#include "xattn/cross_attention.hpp"

#include "kernels.hpp"
#include "property_support.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using xattn::index_t;
using ld = long double;
using xattn_test::property::chance;
using xattn_test::property::mix;
using xattn_test::property::pick;
using xattn_test::property::rng;
using xattn_test::property::uniform;

// The module cases draw from their own stream of case seeds.
constexpr std::uint64_t module_stream = 0x6d6f64756c65ULL;

// ---- rank-3 inputs and outputs -----------------------------------------------------------------

// How a [B, L, D] tensor sits in its buffer: batch-first or sequence-first ([L, B, D], PyTorch's
// default), with padding after each row and after each (outer) block of rows.
struct layout3 {
  bool seq_first = false;
  index_t row_pad = 0, block_pad = 0;
};

layout3 draw_layout3(rng& g) {
  layout3 l;
  l.seq_first = chance(g, 0.3);
  if (chance(g, 0.3)) {
    l.row_pad = pick(g, 0, 3);
    l.block_pad = pick(g, 0, 5);
  }
  return l;
}

std::string describe(const layout3& l) {
  std::ostringstream s;
  s << (l.seq_first ? "[L,B,D]" : "[B,L,D]") << " pad(" << l.row_pad << "," << l.block_pad << ")";
  return s.str();
}

// A buffer holding a [B, L, D] tensor in layout l and the view of it; every element outside the
// view is `fill`.
template <class E>
struct placed3 {
  std::vector<E> buffer;
  xattn::tensor_view<E, 3> view;

  placed3(index_t B, index_t L, index_t D, const layout3& l, E fill) {
    const index_t row = D + l.row_pad;
    const index_t inner = l.seq_first ? B : L, outer = l.seq_first ? L : B;
    const index_t block = inner * row + l.block_pad;
    buffer.assign(std::size_t(std::max<index_t>(outer * block, 1)), fill);
    const index_t sb = l.seq_first ? row : block, sl = l.seq_first ? block : row;
    view = xattn::tensor_view<E, 3>(buffer.data(), {B, L, D}, {sb, sl, 1});
  }

  std::vector<E> elements() const {
    std::vector<E> out;
    for (index_t b = 0; b < view.extent(0); ++b)
      for (index_t i = 0; i < view.extent(1); ++i)
        for (index_t d = 0; d < view.extent(2); ++d) out.push_back(view(b, i, d));
    return out;
  }

  // True when every element outside the view still holds `fill` (bit for bit).
  bool outside_untouched(E fill) const {
    std::vector<bool> in(buffer.size(), false);
    for (index_t b = 0; b < view.extent(0); ++b)
      for (index_t i = 0; i < view.extent(1); ++i)
        for (index_t d = 0; d < view.extent(2); ++d)
          in[std::size_t(&view(b, i, d) - buffer.data())] = true;
    for (std::size_t n = 0; n < buffer.size(); ++n)
      if (!in[n] && std::memcmp(&buffer[n], &fill, sizeof(E)) != 0) return false;
    return true;
  }
};

// ---- one case ----------------------------------------------------------------------------------

struct config {
  xattn::cross_attention_config module;  // resolved
  index_t B = 1, Lq = 1, Lk = 1;
  std::optional<double> scale;
  double amp = 1;                // query and context drawn from [-amp, amp], values from [-1, 1]
  bool separate_values = false;  // forward(query, context, values, ...) or forward(query, context)
  layout3 lq, lc, lv, lo;
  bool kv_lengths = false, allowed = false, bias = false;
  std::array<index_t, 4> allowed_shape{}, bias_shape{};
  double bias_minus_inf = 0;
  xattn::causal_mask causal = xattn::causal_mask::none;
  int key_padding = 0;  // 0: none, 1: padding at the end of each item, 2: anywhere
  bool weights = false, average = false, cache = false;
  xattn::attention_kernel kernel = xattn::attention_kernel::tiled;
  xattn::tile_options tiles;

  std::string describe() const {
    const auto& m = module;
    std::ostringstream s;
    s << "model_dim=" << m.model_dim << " context_dim=" << m.context_dim
      << " value_context_dim=" << m.value_context_dim << " num_heads=" << m.num_heads
      << " num_kv_heads=" << m.num_kv_heads << " head_dim=" << m.head_dim
      << " bias=" << (m.bias ? "on" : "off") << "\n  B=" << B << " Lq=" << Lq << " Lk=" << Lk
      << " scale=";
    if (scale)
      s << *scale;
    else
      s << "auto";
    s << " amp=" << amp << (separate_values ? " separate values" : " values = context")
      << "\n  layouts: query " << ::describe(lq) << ", context " << ::describe(lc);
    if (separate_values) s << ", values " << ::describe(lv);
    s << ", out " << ::describe(lo) << "\n  masks:";
    if (kv_lengths) s << " kv_lengths";
    const auto shape = [&](const std::array<index_t, 4>& e) {
      s << "[" << e[0] << "," << e[1] << "," << e[2] << "," << e[3] << "]";
    };
    if (allowed) {
      s << " allowed";
      shape(allowed_shape);
    }
    if (bias) {
      s << " bias";
      shape(bias_shape);
      s << " (-inf with p=" << bias_minus_inf << ")";
    }
    if (causal != xattn::causal_mask::none)
      s << (causal == xattn::causal_mask::top_left ? " causal top_left" : " causal bottom_right");
    if (key_padding) s << (key_padding == 1 ? " key_padding_mask(end)" : " key_padding_mask(any)");
    s << "\n  outputs: out" << (weights ? ", weights_out" : "")
      << (average ? ", average_weights_out" : "") << (cache ? " (also via the context cache)" : "")
      << "\n  kernel: ";
    if (kernel == xattn::attention_kernel::naive)
      s << "naive";
    else
      s << "tiled " << xattn_test::describe(tiles);
    return s.str();
  }
};

config draw_config(rng& g) {
  config c;
  xattn::cross_attention_config m;
  m.num_heads = pick(g, 1, 4);
  std::vector<index_t> divisors;
  for (index_t d = 1; d <= m.num_heads; ++d)
    if (m.num_heads % d == 0) divisors.push_back(d);
  m.num_kv_heads = divisors[std::size_t(pick(g, 0, index_t(divisors.size()) - 1))];
  m.head_dim = pick(g, 1, chance(g, 0.2) ? 24 : 8);
  m.model_dim = chance(g, 0.3) ? m.num_heads * m.head_dim : pick(g, 1, chance(g, 0.2) ? 48 : 16);
  m.context_dim = chance(g, 0.3) ? m.model_dim : pick(g, 1, chance(g, 0.2) ? 48 : 16);
  m.value_context_dim = chance(g, 0.5) ? m.context_dim : pick(g, 1, 16);
  m.bias = chance(g, 0.7);
  c.module = m.resolved();
  c.separate_values = m.value_context_dim != m.context_dim || chance(g, 0.5);

  c.B = pick(g, 1, 3);
  const bool big = chance(g, 0.08);  // past the default-sized tiles now and then
  c.Lq = chance(g, 0.02) ? 0 : big ? pick(g, 1, 40) : pick(g, 1, 10);
  c.Lk = chance(g, 0.02) ? 0 : big ? pick(g, 1, 150) : pick(g, 1, 20);
  const double u = uniform(g, 0, 1);
  if (u < 0.1)
    c.scale = 0.0;
  else if (u < 0.3)
    c.scale = uniform(g, -3, 3);
  c.amp = chance(g, 0.15) ? uniform(g, 1, 12) : 1.0;
  c.lq = draw_layout3(g);
  c.lc = draw_layout3(g);
  c.lv = draw_layout3(g);
  c.lo = draw_layout3(g);

  const index_t full[4] = {c.B, m.num_heads, c.Lq, c.Lk};
  const auto broadcast_shape = [&] {
    std::array<index_t, 4> e{};
    for (std::size_t r = 0; r < 4; ++r) e[r] = chance(g, 0.5) ? full[r] : 1;
    return e;
  };
  c.kv_lengths = chance(g, 0.25);
  if ((c.allowed = chance(g, 0.25))) c.allowed_shape = broadcast_shape();
  if ((c.bias = chance(g, 0.25))) {
    c.bias_shape = broadcast_shape();
    c.bias_minus_inf = chance(g, 0.3) ? 0.2 : 0.0;
  }
  if (chance(g, 0.25))
    c.causal = chance(g, 0.5) ? xattn::causal_mask::top_left : xattn::causal_mask::bottom_right;
  if (chance(g, 0.4)) c.key_padding = chance(g, 0.5) ? 1 : 2;
  c.weights = chance(g, 0.35);
  c.average = chance(g, 0.35);
  c.cache = chance(g, 0.4);
  if (chance(g, 0.3)) {
    c.kernel = xattn::attention_kernel::naive;
  } else {
    if (chance(g, 0.6)) c.tiles.q_tile = pick(g, 1, c.Lq + 3);
    if (chance(g, 0.6)) c.tiles.kv_tile = pick(g, 1, c.Lk + 5);
    if (chance(g, 0.6)) c.tiles.num_threads = int(pick(g, 1, xattn_test::max_threads()));
  }
  return c;
}

// The tolerance for the module's output in T against the exact composition. Each projection is
// a dot product of length n (model_dim, context_dim, value_context_dim, then num_heads·head_dim
// for the output) with inputs and weights scaled so the result is O(1); its rounding is about
// eps·sqrt(n). Errors in q and k move a score s by about that much relative to |s|, and the
// output by as much again; the attention itself adds what attention_tol allows.
template <class T>
double module_tol(const xattn::cross_attention_config& m, index_t kv_len, double max_abs_score) {
  const double eps = std::numeric_limits<T>::epsilon();
  const auto r = [](index_t n) { return std::sqrt(double(std::max<index_t>(n, 1))); };
  return xattn_test::attention_tol<T>(m.head_dim, kv_len, max_abs_score) +
         8.0 * eps *  // 8: the headroom attention_tol uses
             ((r(m.model_dim) + r(m.context_dim)) * (1.0 + max_abs_score) + r(m.value_context_dim) +
              r(m.num_heads * m.head_dim));
}

// y[r, o] = sum_i x[r, i] W[o, i] + b[o] in long double, for x [B, L, in] packed [B·L, in].
template <class T>
std::vector<ld> project(const std::vector<ld>& x, index_t rows, const xattn::linear<T>& l) {
  const index_t in = l.in_features(), out = l.out_features();
  std::vector<ld> y(std::size_t(rows * out));
  for (index_t r = 0; r < rows; ++r)
    for (index_t o = 0; o < out; ++o) {
      ld s = l.has_bias() ? ld(l.bias(o)) : 0.0L;
      for (index_t i = 0; i < in; ++i) s += x[std::size_t(r * in + i)] * ld(l.weight(o, i));
      y[std::size_t(r * out + o)] = s;
    }
  return y;
}

template <class T>
std::vector<ld> widen(const std::vector<T>& x) {
  return std::vector<ld>(x.begin(), x.end());
}

// What the composition computes: the output [B, Lq, Dm], the per-head weights [B, H, Lq, Lk],
// their head average [B, Lq, Lk], and the largest |score| of a kept key.
struct reference_result {
  std::vector<ld> out, weights, average;
  double max_abs_score = 0.0;
};

template <class T>
reference_result reference_module(const config& c, const xattn::cross_attention_weights<T>& w,
                                  const std::vector<T>& query, const std::vector<T>& context,
                                  const std::vector<T>& values, const std::vector<bool>& padding,
                                  const xattn::attention_options<T>& opts) {
  const auto& m = c.module;
  const index_t B = c.B, Lq = c.Lq, Lk = c.Lk, H = m.num_heads, Hkv = m.num_kv_heads;
  const index_t D = m.head_dim;
  const std::vector<ld> q = project(widen(query), B * Lq, w.q_proj);
  const std::vector<ld> k = project(widen(context), B * Lk, w.k_proj);
  const std::vector<ld> v = project(widen(values), B * Lk, w.v_proj);
  const ld scale = opts.scale ? ld(*opts.scale) : 1.0L / std::sqrt(ld(D));
  const auto& mask = opts.mask;
  const auto bcast = [](const auto& view, index_t b, index_t h, index_t i, index_t j) {
    return view(view.extent(0) == 1 ? 0 : b, view.extent(1) == 1 ? 0 : h,
                view.extent(2) == 1 ? 0 : i, view.extent(3) == 1 ? 0 : j);
  };
  constexpr ld inf = std::numeric_limits<ld>::infinity();

  reference_result r;
  r.weights.assign(std::size_t(B * H * Lq * Lk), 0.0L);
  r.average.assign(std::size_t(B * Lq * Lk), 0.0L);
  std::vector<ld> o(std::size_t(B * Lq * H * D), 0.0L);  // heads concatenated, [B·Lq, H·D]
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / (H / Hkv);  // query heads h share key/value head hk
      for (index_t i = 0; i < Lq; ++i) {
        const ld* qi = &q[std::size_t((b * Lq + i) * H * D + h * D)];
        std::vector<ld> s(static_cast<std::size_t>(Lk)), p(static_cast<std::size_t>(Lk), 0.0L);
        std::vector<bool> keep(static_cast<std::size_t>(Lk));
        ld mx = -inf;
        for (index_t j = 0; j < Lk; ++j) {
          const ld* kj = &k[std::size_t((b * Lk + j) * Hkv * D + hk * D)];
          ld dot = 0;
          for (index_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
          ld x = scale * dot;
          if (mask.bias) x += ld(bcast(*mask.bias, b, h, i, j));
          bool ok = x != -inf;
          if (mask.kv_lengths && j >= (*mask.kv_lengths)(b)) ok = false;
          if (mask.allowed && !bcast(*mask.allowed, b, h, i, j)) ok = false;
          if (mask.causal == xattn::causal_mask::top_left && j > i) ok = false;
          if (mask.causal == xattn::causal_mask::bottom_right && j > i + Lk - Lq) ok = false;
          if (!padding.empty() && padding[std::size_t(b * Lk + j)]) ok = false;
          s[std::size_t(j)] = x;
          keep[std::size_t(j)] = ok;
          if (ok) {
            mx = std::max(mx, x);
            r.max_abs_score = std::max(r.max_abs_score, std::abs(double(x)));
          }
        }
        if (mx > -inf) {
          ld sum = 0;
          for (index_t j = 0; j < Lk; ++j)
            if (keep[std::size_t(j)]) sum += p[std::size_t(j)] = std::exp(s[std::size_t(j)] - mx);
          for (ld& x : p) x /= sum;
        }
        ld* oi = &o[std::size_t((b * Lq + i) * H * D + h * D)];
        for (index_t j = 0; j < Lk; ++j) {
          const ld* vj = &v[std::size_t((b * Lk + j) * Hkv * D + hk * D)];
          for (index_t d = 0; d < D; ++d) oi[d] += p[std::size_t(j)] * vj[d];
          r.weights[std::size_t(((b * H + h) * Lq + i) * Lk + j)] = p[std::size_t(j)];
          r.average[std::size_t((b * Lq + i) * Lk + j)] += p[std::size_t(j)] / ld(H);
        }
      }
    }
  r.out = project(o, B * Lq, w.out_proj);
  return r;
}

template <class T>
constexpr T out_fill = T(-1234.5);

// Runs one case; returns "" on success, else what went wrong.
template <class T>
std::string run_case(std::uint64_t case_seed) {
  rng g(case_seed);
  const config c = draw_config(g);
  const auto& m = c.module;
  const index_t B = c.B, Lq = c.Lq, Lk = c.Lk, H = m.num_heads;
  const T nan = std::numeric_limits<T>::quiet_NaN();

  const auto weights = xattn::random_weights<T>(m, std::uint32_t(g()));
  // Inputs: NaN in the buffers' padding, values in the views.
  placed3<T> query(B, Lq, m.model_dim, c.lq, nan), context(B, Lk, m.context_dim, c.lc, nan),
      values(B, Lk, m.value_context_dim, c.lv, nan);
  std::uniform_real_distribution<double> in_dist(-c.amp, c.amp), v_dist(-1, 1);
  for (auto* p : {&query, &context})
    for (index_t b = 0; b < p->view.extent(0); ++b)
      for (index_t i = 0; i < p->view.extent(1); ++i)
        for (index_t d = 0; d < p->view.extent(2); ++d) p->view(b, i, d) = T(in_dist(g));
  for (index_t b = 0; b < B; ++b)
    for (index_t j = 0; j < Lk; ++j)
      for (index_t d = 0; d < m.value_context_dim; ++d)
        values.view(b, j, d) = c.separate_values ? T(v_dist(g)) : context.view(b, j, d);

  xattn::cross_attention_options<T> opts;
  opts.scale = c.scale;
  opts.kernel = c.kernel;
  opts.tiles = c.tiles;
  const xattn_test::property::drawn_masks<T> masks(g, c);
  opts.mask = masks.mask;
  std::vector<bool> padding;  // true: key j of item b is padding
  std::unique_ptr<bool[]> padding_flags;
  if (c.key_padding) {
    padding.assign(std::size_t(B * Lk), false);
    for (index_t b = 0; b < B; ++b) {
      if (c.key_padding == 1) {
        const index_t len = chance(g, 0.3) ? Lk : pick(g, 0, Lk);
        for (index_t j = len; j < Lk; ++j) padding[std::size_t(b * Lk + j)] = true;
      } else {
        for (index_t j = 0; j < Lk; ++j) padding[std::size_t(b * Lk + j)] = chance(g, 0.3);
      }
    }
    padding_flags.reset(new bool[std::size_t(std::max<index_t>(B * Lk, 1))]);
    std::copy(padding.begin(), padding.end(), padding_flags.get());
    opts.key_padding_mask =
        xattn::tensor_view<const bool, 2>(padding_flags.get(), std::array<index_t, 2>{B, Lk});
  }

  xattn::attention_options<T> ref_opts;
  ref_opts.scale = opts.scale;
  ref_opts.mask = opts.mask;
  const reference_result want = reference_module<T>(
      c, weights, query.elements(), context.elements(), values.elements(), padding, ref_opts);
  const double tol = module_tol<T>(m, Lk, want.max_abs_score);

  // One forward's outputs: out in its layout, weights and their average packed, all pre-filled.
  struct outputs {
    placed3<T> out;
    std::vector<T> weights, average;
  };
  const auto make_outputs = [&] {
    return outputs{placed3<T>(B, Lq, m.model_dim, c.lo, out_fill<T>),
                   std::vector<T>(std::size_t(B * H * Lq * Lk), out_fill<T>),
                   std::vector<T>(std::size_t(B * Lq * Lk), out_fill<T>)};
  };
  const auto with_outputs = [&](outputs& r) {
    xattn::cross_attention_options<T> o = opts;
    if (c.weights) o.weights_out = xattn::tensor_view<T, 4>(r.weights.data(), {B, H, Lq, Lk});
    if (c.average) o.average_weights_out = xattn::tensor_view<T, 3>(r.average.data(), {B, Lq, Lk});
    return o;
  };
  const auto same = [](const outputs& a, const outputs& b) {
    const auto bits = [](const std::vector<T>& x, const std::vector<T>& y) {
      return x.size() == y.size() &&
             (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0);
    };
    return bits(a.out.buffer, b.out.buffer) && bits(a.weights, b.weights) &&
           bits(a.average, b.average);
  };

  std::ostringstream err;
  try {
    xattn::multi_head_cross_attention<T> module(m, weights);
    const xattn::tensor_view<const T, 3> qv = query.view, cv = context.view, vv = values.view;
    outputs first = make_outputs();
    if (c.separate_values)
      module.forward(qv, cv, vv, first.out.view, with_outputs(first));
    else
      module.forward(qv, cv, first.out.view, with_outputs(first));

    if (auto a = xattn_test::all_close(first.out.elements(), want.out, tol); !a)
      err << "output: " << a.message() << "\n";
    if (c.weights)
      if (auto a = xattn_test::all_close(first.weights, want.weights, tol); !a)
        err << "weights_out: " << a.message() << "\n";
    if (c.average)
      if (auto a = xattn_test::all_close(first.average, want.average, tol); !a)
        err << "average_weights_out: " << a.message() << "\n";
    if (!first.out.outside_untouched(out_fill<T>)) err << "wrote outside the output view\n";
    if (!c.weights && !std::all_of(first.weights.begin(), first.weights.end(),
                                   [](T x) { return x == out_fill<T>; }))
      err << "wrote weights_out when not asked\n";

    // The same module again (its workspace now allocated): the same bits.
    outputs again = make_outputs();
    module.forward(qv, cv, vv, again.out.view, with_outputs(again));
    if (!same(first, again)) err << "a second forward gives different results\n";

    if (c.cache) {
      const auto cache =
          c.separate_values ? module.encode_context(cv, vv) : module.encode_context(cv);
      outputs cached = make_outputs();
      module.forward(qv, cache, cached.out.view, with_outputs(cached));
      if (!same(first, cached))
        err << "forward with the context cache differs from the direct forward\n";
    }
  } catch (const std::exception& e) {
    err << "threw: " << e.what() << "\n";
  }
  const std::string failures = err.str();
  return xattn_test::property::report(
      "case seed", case_seed,
      [&] {
        std::ostringstream d;
        d << c.describe() << "\n  tolerance " << tol << ", largest |score| " << want.max_abs_score;
        return d.str();
      },
      failures);
}

template <class T>
class PropertyModule : public ::testing::Test {};
TYPED_TEST_SUITE(PropertyModule, xattn_test::element_types, );

TYPED_TEST(PropertyModule, ModuleMatchesTheReferenceOnRandomCases) {
  // The module's cases come from their own stream, so they differ from test_property's; each
  // runs several forwards, so a fifth as many.
  const std::uint64_t base = mix(xattn_test::property::run_seed() ^ module_stream);
  xattn_test::property::run_cases(run_case<TypeParam>, base, 5, "module cases");
}

}  // namespace
