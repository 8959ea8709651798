// SPDX-License-Identifier: MIT
// Randomised differential test: draws thousands of attention calls (sizes, grouped-query heads,
// strided, permuted and padded layouts, every mask kind alone and combined, scales, extra
// outputs, tile shapes, thread counts) and checks naive_attention and tiled_attention against
// the long-double reference in test_support.hpp. Also checked on every case: nothing outside the
// output views is written, padding inside the input buffers (NaN) is never read, and
// tiled_attention's results are identical bit for bit on 1 to 4 threads. The backward kernels
// (naive_attention_backward, tiled_attention_backward) run on the same random cases against the
// long-double naive backward, with the same checks. Quantized keys and values (q8 and q4
// blocks) run on every CPU path against the reference on their dequantized values.
//
// Environment:
//   XATTN_PROPERTY_SEED     the run's seed (default 1); "random" draws one and prints it
//   XATTN_PROPERTY_CASES    cases per element type (default 5000)
//   XATTN_PROPERTY_SECONDS  time budget per element type (default 50); the run stops early,
//                           passing, and says how many cases it ran
//   XATTN_PROPERTY_CASE     replay just this case seed (printed with every failure)
// A failure prints the case seed and the whole configuration. Cases are drawn with the
// standard library's distributions, so a seed replays on the same standard library.
#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/quantized.hpp"

#include "emulated_levels.hpp"
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
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::property::chance;
using xattn_test::property::pick;
using xattn_test::property::rng;

// ---- layouts -----------------------------------------------------------------------------------

// How a rank-R tensor sits in its buffer: the dimensions in storage order (outermost first) and
// the padding added to each stored extent.
template <std::size_t R>
struct layout {
  std::array<std::size_t, R> order{};
  std::array<index_t, R> pad{};
};

template <std::size_t R>
layout<R> draw_layout(rng& g) {
  layout<R> l;
  std::iota(l.order.begin(), l.order.end(), std::size_t(0));
  const double u = std::uniform_real_distribution<double>(0, 1)(g);
  if (R == 4 && u < 0.25) {
    std::swap(l.order[1], l.order[2]);  // [B, L, H, D]: heads read in place from a projection
  } else if (u < 0.45) {
    std::shuffle(l.order.begin(), l.order.end(), g);  // anything, D-major included
  }
  if (chance(g, 0.3))
    for (auto& p : l.pad) p = chance(g, 0.5) ? pick(g, 1, 3) : 0;
  return l;
}

template <std::size_t R>
std::string describe(const layout<R>& l) {
  std::ostringstream s;
  s << "order(";
  for (std::size_t r = 0; r < R; ++r) s << (r ? "," : "") << l.order[r];
  s << ") pad(";
  for (std::size_t r = 0; r < R; ++r) s << (r ? "," : "") << l.pad[r];
  s << ")";
  return s.str();
}

// A buffer holding a rank-R tensor of the given extents in layout l, and the view of it.
// Every element outside the view is `fill`.
template <class E, std::size_t R>
struct placed {
  std::vector<E> buffer;
  xattn::tensor_view<E, R> view;
  std::vector<bool> in_view;  // per buffer element

  placed(const std::array<index_t, R>& extents, const layout<R>& l, E fill) {
    std::array<index_t, R> stored{}, strides{};
    for (std::size_t r = 0; r < R; ++r) stored[r] = extents[l.order[r]] + l.pad[r];
    index_t step = 1, count = 1;
    for (std::size_t r = R; r-- > 0;) {
      strides[l.order[r]] = step;
      step *= std::max<index_t>(stored[r], 1);
      count *= stored[r];
    }
    buffer.assign(std::size_t(std::max<index_t>(count, 1)), fill);
    view = xattn::tensor_view<E, R>(buffer.data(), extents, strides);
    in_view.assign(buffer.size(), false);
    for_each([&](index_t off) { in_view[std::size_t(off)] = true; });
  }

  // Calls f(offset) for every element of the view, in row-major index order.
  template <class F>
  void for_each(F&& f) const {
    if (view.size() == 0) return;
    std::array<index_t, R> idx{};
    for (;;) {
      index_t off = 0;
      for (std::size_t r = 0; r < R; ++r) off += idx[r] * view.stride(r);
      f(off);
      std::size_t r = R;
      while (r-- > 0) {
        if (++idx[r] < view.extent(r)) break;
        idx[r] = 0;
        if (r == 0) return;
      }
    }
  }

  // The view's elements in row-major index order.
  std::vector<E> elements() const {
    std::vector<E> out;
    for_each([&](index_t off) { out.push_back(buffer[std::size_t(off)]); });
    return out;
  }

  // True when every element outside the view still holds `fill` (bit for bit).
  bool outside_untouched(E fill) const {
    for (std::size_t n = 0; n < buffer.size(); ++n)
      if (!in_view[n] && std::memcmp(&buffer[n], &fill, sizeof(E)) != 0) return false;
    return true;
  }
};

// ---- one case ----------------------------------------------------------------------------------

struct config {
  index_t B = 1, H = 1, Hkv = 1, Lq = 1, Lk = 1, Dk = 1, Dv = 1;
  std::optional<double> scale;
  double amp = 1;  // q and k are drawn from [-amp, amp], v from [-1, 1]
  layout<4> lq, lk, lv, lo, lw;
  layout<3> ll;
  bool kv_lengths = false, allowed = false, bias = false, weights = false, lse = false;
  std::array<index_t, 4> allowed_shape{}, bias_shape{};
  double bias_minus_inf = 0;  // probability of a -inf bias entry
  xattn::causal_mask causal = xattn::causal_mask::none;
  xattn::tile_options tiles;

  std::string describe() const {
    std::ostringstream s;
    s << "B=" << B << " H=" << H << " Hkv=" << Hkv << " Lq=" << Lq << " Lk=" << Lk << " Dk=" << Dk
      << " Dv=" << Dv << " scale=";
    if (scale)
      s << *scale;
    else
      s << "auto";
    s << " amp=" << amp << "\n  layouts: q " << ::describe(lq) << ", k " << ::describe(lk) << ", v "
      << ::describe(lv) << ", out " << ::describe(lo);
    if (weights) s << ", weights_out " << ::describe(lw);
    if (lse) s << ", lse_out " << ::describe(ll);
    s << "\n  masks:";
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
    s << "\n  tiles: " << xattn_test::describe(tiles);
    return s.str();
  }
};

config draw_config(rng& g) {
  config c;
  c.B = pick(g, 1, 3);
  c.H = pick(g, 1, 4);
  std::vector<index_t> divisors;
  for (index_t d = 1; d <= c.H; ++d)
    if (c.H % d == 0) divisors.push_back(d);
  c.Hkv = divisors[std::size_t(pick(g, 0, index_t(divisors.size()) - 1))];
  const bool big = chance(g, 0.08);  // past the default-sized tiles now and then
  c.Lq = chance(g, 0.03) ? 0 : big ? pick(g, 1, 70) : pick(g, 1, 12);
  c.Lk = chance(g, 0.03) ? 0 : big ? pick(g, 1, 140) : pick(g, 1, 24);
  c.Dk = pick(g, 1, chance(g, 0.2) ? 40 : 12);
  c.Dv = chance(g, 0.5) ? c.Dk : pick(g, chance(g, 0.03) ? 0 : 1, 12);
  const double u = std::uniform_real_distribution<double>(0, 1)(g);
  if (u < 0.15)
    c.scale = 0.0;
  else if (u < 0.4)
    c.scale = std::uniform_real_distribution<double>(-3, 3)(g);
  c.amp = chance(g, 0.15) ? std::uniform_real_distribution<double>(1, 30)(g) : 1.0;
  c.lq = draw_layout<4>(g);
  c.lk = draw_layout<4>(g);
  c.lv = draw_layout<4>(g);
  c.lo = draw_layout<4>(g);
  c.lw = draw_layout<4>(g);
  c.ll = draw_layout<3>(g);
  const index_t full[4] = {c.B, c.H, c.Lq, c.Lk};
  const auto broadcast_shape = [&] {
    std::array<index_t, 4> e{};
    for (std::size_t r = 0; r < 4; ++r) e[r] = chance(g, 0.5) ? full[r] : 1;
    return e;
  };
  c.kv_lengths = chance(g, 0.3);
  if ((c.allowed = chance(g, 0.3))) c.allowed_shape = broadcast_shape();
  if ((c.bias = chance(g, 0.3))) {
    c.bias_shape = broadcast_shape();
    c.bias_minus_inf = chance(g, 0.3) ? 0.2 : 0.0;
  }
  if (chance(g, 0.3))
    c.causal = chance(g, 0.5) ? xattn::causal_mask::top_left : xattn::causal_mask::bottom_right;
  c.weights = chance(g, 0.5);
  c.lse = chance(g, 0.5);
  if (chance(g, 0.7)) c.tiles.q_tile = pick(g, 1, c.Lq + 3);
  if (chance(g, 0.7)) c.tiles.kv_tile = pick(g, 1, c.Lk + 5);
  if (chance(g, 0.7)) c.tiles.num_threads = int(pick(g, 1, xattn_test::max_threads()));
  return c;
}

template <class T>
const T out_fill = T(-1234.5f);

// The outputs of one kernel run, placed in their layouts: weights and lse in statistic_t<T>
// (float for the half types).
template <class T>
struct run_outputs {
  placed<T, 4> out;
  placed<xattn::statistic_t<T>, 4> weights;
  placed<xattn::statistic_t<T>, 3> lse;
};

// What a run's weights and log-sum-exp got wrong against the reference, and whether it wrote
// outside its output views ("" when nothing).
template <class T>
std::string check_statistics(const std::string& name, const config& c, const run_outputs<T>& r,
                             const xattn_test::reference_result& want, double tol) {
  using S = xattn::statistic_t<T>;
  std::ostringstream err;
  if (c.weights)
    if (auto a = xattn_test::all_close(r.weights.elements(), want.weights, tol); !a)
      err << name << ": weights: " << a.message() << "\n";
  if (c.lse)
    if (auto a = xattn_test::all_close(r.lse.elements(), want.lse, tol); !a)
      err << name << ": log-sum-exp: " << a.message() << "\n";
  if (!r.out.outside_untouched(out_fill<T>) || !r.weights.outside_untouched(out_fill<S>) ||
      !r.lse.outside_untouched(out_fill<S>))
    err << name << ": wrote outside an output view\n";
  return err.str();
}

// The same and the output, each within tol of the reference.
template <class T>
std::string check_outputs(const std::string& name, const config& c, const run_outputs<T>& r,
                          const xattn_test::reference_result& want, double tol) {
  std::string err;
  if (auto a = xattn_test::all_close(r.out.elements(), want.out, tol); !a)
    err = name + ": output: " + a.message() + "\n";
  return err + check_statistics(name, c, r, want, tol);
}

// True when two runs wrote the same bits into their buffers.
template <class E, std::size_t R>
bool same_bits(const placed<E, R>& a, const placed<E, R>& b) {
  return a.buffer.size() == b.buffer.size() &&
         std::memcmp(a.buffer.data(), b.buffer.data(), a.buffer.size() * sizeof(E)) == 0;
}

// Runs one case on every kernel; returns "" on success, else what went wrong. For the half types
// the output is held to the accuracy rule (check_half_rule), the float statistics to float's
// tolerance.
template <class T>
std::string run_case(std::uint64_t case_seed) {
  using S = xattn::statistic_t<T>;
  rng g(case_seed);
  const config c = draw_config(g);
  const T nan = std::numeric_limits<T>::quiet_NaN();

  // Inputs: NaN everywhere in the buffers, values in the views. A kernel that reads outside a
  // view (or reads padding keys) turns its output into NaN.
  placed<T, 4> q({c.B, c.H, c.Lq, c.Dk}, c.lq, nan), k({c.B, c.Hkv, c.Lk, c.Dk}, c.lk, nan),
      v({c.B, c.Hkv, c.Lk, c.Dv}, c.lv, nan);
  std::uniform_real_distribution<double> qk_dist(-c.amp, c.amp), v_dist(-1, 1);
  q.for_each([&](index_t off) { q.buffer[std::size_t(off)] = T(qk_dist(g)); });
  k.for_each([&](index_t off) { k.buffer[std::size_t(off)] = T(qk_dist(g)); });
  v.for_each([&](index_t off) { v.buffer[std::size_t(off)] = T(v_dist(g)); });

  const xattn_test::property::drawn_masks<T> masks(g, c);
  xattn::attention_options<T> opts;
  opts.scale = c.scale;
  opts.mask = masks.mask;
  const std::vector<index_t>& lengths = masks.lengths;

  const xattn::tensor_view<const T, 4> qv = q.view, kv = k.view, vv = v.view;
  const auto want = xattn_test::reference_attention<T>(qv, kv, vv, opts);
  const double tol = xattn_test::attention_tol<S>(c.Dk, c.Lk, want.max_abs_score);
  std::vector<T> q_packed, k_packed, v_packed;  // for the half rule's references
  if constexpr (xattn::is_half_v<T>) {
    q_packed = q.elements();
    k_packed = k.elements();
    v_packed = v.elements();
  }

  // Padding keys hold NaN from here on (the reference read clean ones): never to be read.
  if (c.kv_lengths)
    for (index_t b = 0; b < c.B; ++b)
      for (index_t h = 0; h < c.Hkv; ++h)
        for (index_t j = lengths[std::size_t(b)]; j < c.Lk; ++j) {
          for (index_t d = 0; d < c.Dk; ++d) k.view(b, h, j, d) = nan;
          for (index_t e = 0; e < c.Dv; ++e) v.view(b, h, j, e) = nan;
        }

  const auto run = [&](const xattn_test::kernel<T>& kern) {
    run_outputs<T> r{placed<T, 4>({c.B, c.H, c.Lq, c.Dv}, c.lo, out_fill<T>),
                     placed<S, 4>({c.B, c.H, c.Lq, c.Lk}, c.lw, out_fill<S>),
                     placed<S, 3>({c.B, c.H, c.Lq}, c.ll, out_fill<S>)};
    xattn::attention_options<T> o = opts;
    if (c.weights) o.weights_out = r.weights.view;
    if (c.lse) o.lse_out = r.lse.view;
    kern.run(qv, kv, vv, r.out.view, o);
    return r;
  };
  const auto check = [&](const xattn_test::kernel<T>& kern, const run_outputs<T>& r) {
    if constexpr (xattn::is_half_v<T>) {
      std::ostringstream err;
      const std::array<index_t, 4> eq{c.B, c.H, c.Lq, c.Dk}, ek{c.B, c.Hkv, c.Lk, c.Dk},
          ev{c.B, c.Hkv, c.Lk, c.Dv};
      if (auto a = xattn_test::check_half_rule<T>(
              r.out.elements(), xattn::tensor_view<const T, 4>(q_packed.data(), eq),
              xattn::tensor_view<const T, 4>(k_packed.data(), ek),
              xattn::tensor_view<const T, 4>(v_packed.data(), ev), opts);
          !a)
        err << kern.name << ": output: " << a.message() << "\n";
      return err.str() + check_statistics(kern.name, c, r, want, tol);
    }
    return check_outputs(kern.name, c, r, want, tol);
  };

  std::string failures;
  const auto naive = xattn_test::naive_kernel<T>();
  failures += check(naive, run(naive));
  const auto tiled = xattn_test::tiled_kernel<T>(c.tiles);
  failures += check(tiled, run(tiled));
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) {
    // The bf16-product loops of the avx512bf16 path, emulated on avx2 where this CPU lacks them.
    xattn_test::each_path::products_pass([&](std::string_view name) {
      const auto kern = xattn_test::tiled_kernel<T>(c.tiles);
      failures += check({kern.name + " " + std::string(name), kern.run}, run(kern));
    });
  }

  // tiled_attention on 1, 2, ... threads with the same tiles: identical bits.
  std::optional<run_outputs<T>> first;
  for (int t : xattn_test::thread_counts()) {
    xattn::tile_options o = c.tiles;
    o.num_threads = t;
    const auto kern = xattn_test::tiled_kernel<T>(o);
    auto r = run(kern);
    if (!first) {
      failures += check(kern, r);
      first.emplace(std::move(r));
    } else if (!same_bits(r.out, first->out) || !same_bits(r.weights, first->weights) ||
               !same_bits(r.lse, first->lse)) {
      failures += kern.name + ": results differ from those on 1 thread\n";
    }
  }
  return xattn_test::property::report(
      "case seed", case_seed, [&] { return c.describe(); }, failures);
}

// ---- quantized keys and values ----------------------------------------------------------------

// A block every value of which is NaN: the fill outside the block views, and the padding keys.
template <class Blk>
Blk poisoned_block() {
  Blk b{};
  b.scale = Eigen::half(std::numeric_limits<float>::quiet_NaN());
  return b;
}

// The case's layout of a block tensor [B, Hkv, Lk, blocks]: each row's blocks contiguous (the
// kernels' requirement), the rows, heads and batches in any order, padded or not.
layout<4> rows_contiguous(layout<4> l) {
  const auto blocks = std::find(l.order.begin(), l.order.end(), std::size_t(3));
  std::rotate(blocks, blocks + 1, l.order.end());
  return l;
}

// One random case with keys and values quantized (quantized.hpp): float queries against q8 or
// q4 blocks, on every CPU path this machine runs (and the emulated avx512 level). The contract:
// the float call's result on the dequantized keys and values, so each path is held to float's
// tolerance of the long-double reference on those values; on 1 to 4 threads the same bits.
// Head dimensions run past one block now and then (partial last blocks, several per row); the
// padding keys and everything outside the block views are NaN blocks.
template <class Blk>
std::string run_quantized_case(std::uint64_t case_seed) {
  rng g(case_seed);
  config c = draw_config(g);
  if (chance(g, 0.3)) c.Dk = pick(g, 1, 100);
  if (chance(g, 0.3)) c.Dv = pick(g, 1, 100);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Blk poison = poisoned_block<Blk>();
  const index_t nk = xattn::quant_blocks_per_row(c.Dk), nv = xattn::quant_blocks_per_row(c.Dv);
  placed<float, 4> q({c.B, c.H, c.Lq, c.Dk}, c.lq, nan);
  placed<Blk, 4> kb({c.B, c.Hkv, c.Lk, nk}, rows_contiguous(c.lk), poison),
      vb({c.B, c.Hkv, c.Lk, nv}, rows_contiguous(c.lv), poison);
  std::vector<float> kf(std::size_t(c.B * c.Hkv * c.Lk * c.Dk)),
      vf(std::size_t(c.B * c.Hkv * c.Lk * c.Dv));
  std::uniform_real_distribution<double> qk_dist(-c.amp, c.amp), v_dist(-1, 1);
  q.for_each([&](index_t off) { q.buffer[std::size_t(off)] = float(qk_dist(g)); });
  for (float& x : kf) x = float(qk_dist(g));
  for (float& x : vf) x = float(v_dist(g));
  const std::array<index_t, 4> ek{c.B, c.Hkv, c.Lk, c.Dk}, ev{c.B, c.Hkv, c.Lk, c.Dv};
  xattn::quantize(xattn::tensor_view<const float, 4>(kf.data(), ek), kb.view);
  xattn::quantize(xattn::tensor_view<const float, 4>(vf.data(), ev), vb.view);
  // What the kernels must compute with: the blocks' values (dequantize is exact).
  xattn::dequantize(kb.view, xattn::tensor_view<float, 4>(kf.data(), ek));
  xattn::dequantize(vb.view, xattn::tensor_view<float, 4>(vf.data(), ev));

  const xattn_test::property::drawn_masks<float> masks(g, c);
  xattn::attention_options<float> opts;
  opts.scale = c.scale;
  opts.mask = masks.mask;
  const xattn::tensor_view<const float, 4> qv = q.view;
  const auto want = xattn_test::reference_attention<float>(
      qv, xattn::tensor_view<const float, 4>(kf.data(), ek),
      xattn::tensor_view<const float, 4>(vf.data(), ev), opts);
  const double tol = xattn_test::attention_tol<float>(c.Dk, c.Lk, want.max_abs_score);
  if (c.kv_lengths)  // padding keys: never to be read
    for (index_t b = 0; b < c.B; ++b)
      for (index_t h = 0; h < c.Hkv; ++h)
        for (index_t j = masks.lengths[std::size_t(b)]; j < c.Lk; ++j) {
          for (index_t n = 0; n < nk; ++n) kb.view(b, h, j, n) = poison;
          for (index_t n = 0; n < nv; ++n) vb.view(b, h, j, n) = poison;
        }

  const xattn::tensor_view<const Blk, 4> kv = kb.view, vv = vb.view;
  const auto run = [&](const xattn::tile_options& t) {
    run_outputs<float> r{placed<float, 4>({c.B, c.H, c.Lq, c.Dv}, c.lo, out_fill<float>),
                         placed<float, 4>({c.B, c.H, c.Lq, c.Lk}, c.lw, out_fill<float>),
                         placed<float, 3>({c.B, c.H, c.Lq}, c.ll, out_fill<float>)};
    xattn::attention_options<float> o = opts;
    if (c.weights) o.weights_out = r.weights.view;
    if (c.lse) o.lse_out = r.lse.view;
    xattn::tiled_attention<float>(qv, kv, vv, r.out.view, o, t);
    return r;
  };
  const std::string name = std::string("tiled_attention on ") + xattn::quant_name<Blk>() + " ";
  std::string failures;
  xattn_test::each_path()([&](std::string_view path) {
    failures += check_outputs(name + std::string(path) + " " + xattn_test::describe(c.tiles), c,
                              run(c.tiles), want, tol);
  });
  std::optional<run_outputs<float>> first;
  for (int t : xattn_test::thread_counts()) {
    xattn::tile_options o = c.tiles;
    o.num_threads = t;
    auto r = run(o);
    if (!first)
      first.emplace(std::move(r));
    else if (!same_bits(r.out, first->out) || !same_bits(r.weights, first->weights) ||
             !same_bits(r.lse, first->lse))
      failures += name + xattn_test::describe(o) + ": results differ from those on 1 thread\n";
  }
  return xattn_test::property::report(
      "quantized case seed", case_seed, [&] { return c.describe(); }, failures);
}

// ---- the backward ------------------------------------------------------------------------------

// A packed copy of a view's elements in another element type.
template <class To, class From>
std::vector<To> converted(const std::vector<From>& x) {
  return std::vector<To>(x.begin(), x.end());
}

// One random case through both backward kernels: the forward in T gives out and lse, a random
// dout flows back, and every gradient (and dbias when there is a bias) is checked against the
// naive backward in long double on the same numbers. For a half T the log-sum-exp is float, and
// the tolerance T's (the half backward is the float one on the widened inputs, each gradient
// rounded once, and reads the half forward's rounded output).
template <class T>
std::string run_backward_case(std::uint64_t case_seed) {
  using ld = long double;
  using S = xattn::statistic_t<T>;
  rng g(case_seed);
  config c = draw_config(g);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  placed<T, 4> q({c.B, c.H, c.Lq, c.Dk}, c.lq, nan), k({c.B, c.Hkv, c.Lk, c.Dk}, c.lk, nan),
      v({c.B, c.Hkv, c.Lk, c.Dv}, c.lv, nan), dout({c.B, c.H, c.Lq, c.Dv}, c.lo, nan);
  std::uniform_real_distribution<double> qk_dist(-c.amp, c.amp), v_dist(-1, 1);
  q.for_each([&](index_t off) { q.buffer[std::size_t(off)] = T(qk_dist(g)); });
  k.for_each([&](index_t off) { k.buffer[std::size_t(off)] = T(qk_dist(g)); });
  v.for_each([&](index_t off) { v.buffer[std::size_t(off)] = T(v_dist(g)); });
  dout.for_each([&](index_t off) { dout.buffer[std::size_t(off)] = T(v_dist(g)); });

  const xattn_test::property::drawn_masks<T> masks(g, c);
  xattn::attention_options<T> opts;
  opts.scale = c.scale;
  opts.mask = masks.mask;
  const std::vector<index_t>& lengths = masks.lengths;
  const std::vector<T>& bias = masks.bias;
  xattn::attention_options<ld> lopts;
  lopts.scale = c.scale;
  lopts.mask.causal = c.causal;
  lopts.mask.kv_lengths = opts.mask.kv_lengths;
  lopts.mask.allowed = opts.mask.allowed;
  std::vector<ld> lbias;
  if (c.bias) {
    lbias = converted<ld>(masks.bias);
    lopts.mask.bias = xattn::tensor_view<const ld, 4>(lbias.data(), c.bias_shape);
  }

  // The reference: the naive backward in long double on packed copies.
  const std::array<index_t, 4> eq{c.B, c.H, c.Lq, c.Dk}, ek{c.B, c.Hkv, c.Lk, c.Dk},
      ev{c.B, c.Hkv, c.Lk, c.Dv}, eo{c.B, c.H, c.Lq, c.Dv};
  const auto lq = converted<ld>(q.elements()), lk = converted<ld>(k.elements()),
             lv = converted<ld>(v.elements()), ldo = converted<ld>(dout.elements());
  const auto packed = [](const std::vector<ld>& x, const std::array<index_t, 4>& e) {
    return xattn::tensor_view<const ld, 4>(x.data(), e);
  };
  std::vector<ld> lout(std::size_t(c.B * c.H * c.Lq * c.Dv)), wq(lq.size()), wk(lk.size()),
      wv(lv.size()), wdb(lbias.size());
  xattn::naive_attention<ld>(packed(lq, eq), packed(lk, ek), packed(lv, ev),
                             xattn::tensor_view<ld, 4>(lout.data(), eo), lopts);
  xattn::attention_grads<ld> lg{xattn::tensor_view<ld, 4>(wq.data(), eq),
                                xattn::tensor_view<ld, 4>(wk.data(), ek),
                                xattn::tensor_view<ld, 4>(wv.data(), ev), std::nullopt};
  if (c.bias) lg.dbias = xattn::tensor_view<ld, 4>(wdb.data(), c.bias_shape);
  xattn::naive_attention_backward<ld>(packed(lq, eq), packed(lk, ek), packed(lv, ev),
                                      packed(lout, eo), packed(ldo, eo), lg, lopts);
  const auto ref = xattn_test::reference_attention<T>(q.view, k.view, v.view, opts);
  const double group = double(c.H) / double(c.Hkv);
  const auto backward_tol = [&](auto compute) {
    using C = decltype(compute);
    return 4.0 * xattn_test::attention_tol<C>(c.Dk + c.Dv, c.Lk, ref.max_abs_score) *
           (1.0 + c.amp) * std::sqrt(double(std::max<index_t>(c.Lq, 1)) * group) *
           (c.bias ? std::sqrt(double(c.B * c.H * std::max<index_t>(c.Lq, 1))) : 1.0);
  };
  double tol = backward_tol(T());

  // Padding keys hold NaN from here on: never to be read.
  if (c.kv_lengths)
    for (index_t b = 0; b < c.B; ++b)
      for (index_t h = 0; h < c.Hkv; ++h)
        for (index_t j = lengths[std::size_t(b)]; j < c.Lk; ++j) {
          for (index_t d = 0; d < c.Dk; ++d) k.view(b, h, j, d) = nan;
          for (index_t e = 0; e < c.Dv; ++e) v.view(b, h, j, e) = nan;
        }
  // The forward in T (tiled: its lse is what the tiled backward reads).
  std::vector<T> out(lout.size());
  std::vector<S> lse(std::size_t(c.B * c.H * c.Lq));
  xattn::attention_options<T> fwd = opts;
  fwd.lse_out = xattn::tensor_view<S, 3>(lse.data(), {c.B, c.H, c.Lq});
  const xattn::tensor_view<const T, 4> qv = q.view, kv = k.view, vv = v.view, dov = dout.view;
  xattn::tiled_attention<T>(qv, kv, vv, xattn::tensor_view<T, 4>(out.data(), eo), fwd);
  const xattn::tensor_view<const T, 4> outv(out.data(), eo);
  if constexpr (xattn::is_half_v<T>) {
    // The half backward reads the half forward's rounded output; given the same output, the
    // exact gradients are its float gradients within float's arithmetic, then one rounding to T
    // (half a unit in the last place: relative, so all_close's |got - want| / (1 + |want|)
    // grows by at most that).
    const auto lout_t = converted<ld>(out);
    xattn::naive_attention_backward<ld>(packed(lq, eq), packed(lk, ek), packed(lv, ev),
                                        packed(lout_t, eo), packed(ldo, eo), lg, lopts);
    tol = backward_tol(float()) + 0.5 * xattn_test::epsilon<T>();
  }

  struct grads_out {
    placed<T, 4> dq, dk, dv;
    std::vector<T> dbias;
  };
  const auto run = [&](bool tiled, const xattn::tile_options& t) {
    grads_out r{placed<T, 4>(eq, c.lq, out_fill<T>), placed<T, 4>(ek, c.lk, out_fill<T>),
                placed<T, 4>(ev, c.lv, out_fill<T>), std::vector<T>(bias.size(), out_fill<T>)};
    xattn::attention_grads<T> gr{r.dq.view, r.dk.view, r.dv.view, std::nullopt};
    if (c.bias) gr.dbias = xattn::tensor_view<T, 4>(r.dbias.data(), c.bias_shape);
    if (tiled)
      xattn::tiled_attention_backward<T>(qv, kv, vv, outv, dov, gr, fwd, t);
    else
      xattn::naive_attention_backward<T>(qv, kv, vv, outv, dov, gr, fwd);
    return r;
  };
  const auto check = [&](const std::string& name, const grads_out& r) {
    std::ostringstream err;
    const std::pair<const char*, std::pair<const placed<T, 4>*, const std::vector<ld>*>> gs[] = {
        {"dq", {&r.dq, &wq}}, {"dk", {&r.dk, &wk}}, {"dv", {&r.dv, &wv}}};
    for (const auto& [what, pw] : gs) {
      if (auto a = xattn_test::all_close(pw.first->elements(), *pw.second, tol); !a)
        err << name << ": " << what << ": " << a.message() << "\n";
      if (!pw.first->outside_untouched(out_fill<T>))
        err << name << ": wrote outside " << what << "\n";
    }
    if (c.bias) {  // the buffers hold one element more than an empty bias view
      const auto& e = c.bias_shape;
      const std::size_t n = std::size_t(e[0] * e[1] * e[2] * e[3]);
      const std::vector<T> got(r.dbias.begin(), r.dbias.begin() + std::ptrdiff_t(n));
      const std::vector<ld> want(wdb.begin(), wdb.begin() + std::ptrdiff_t(n));
      if (auto a = xattn_test::all_close(got, want, tol); !a)
        err << name << ": dbias: " << a.message() << "\n";
    }
    return err.str();
  };
  const auto same_bits = [](const grads_out& a, const grads_out& b) {
    const auto same = [](const auto& x, const auto& y) {
      return x.size() == y.size() &&
             (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(T)) == 0);
    };
    return same(a.dq.buffer, b.dq.buffer) && same(a.dk.buffer, b.dk.buffer) &&
           same(a.dv.buffer, b.dv.buffer) && same(a.dbias, b.dbias);
  };

  std::string failures;
  failures += check("naive_attention_backward", run(false, {}));
  std::optional<grads_out> first;
  for (int t : xattn_test::thread_counts()) {
    xattn::tile_options o = c.tiles;
    o.num_threads = t;
    const std::string name = "tiled_attention_backward " + xattn_test::describe(o);
    auto r = run(true, o);
    if (!first) {
      failures += check(name, r);
      first.emplace(std::move(r));
    } else if (!same_bits(r, *first)) {
      failures += name + ": gradients differ from those on 1 thread\n";
    }
  }
  return xattn_test::property::report(
      "backward case seed", case_seed, [&] { return c.describe(); }, failures);
}

template <class T>
class Property : public ::testing::Test {};
TYPED_TEST_SUITE(Property, xattn_test::element_types, );

TYPED_TEST(Property, KernelsMatchTheReferenceOnRandomCases) {
  xattn_test::property::run_cases(run_case<TypeParam>, xattn_test::property::run_seed(), 1,
                                  "cases");
}

// The half types (half.hpp), forward only: a fifth as many cases as float's, each checked by
// the accuracy rule, which runs a second reference.
template <class T>
class PropertyHalf : public ::testing::Test {};
using half_types = ::testing::Types<Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(PropertyHalf, half_types, );

TYPED_TEST(PropertyHalf, KernelsHoldTheAccuracyRuleOnRandomCases) {
  xattn_test::property::run_cases(run_case<TypeParam>, xattn_test::property::run_seed() + 0x4a1f, 5,
                                  "half cases");
}

// Quantized keys and values, a fifth as many cases per block type as float's: each runs on
// every CPU path.
template <class Blk>
class PropertyQuantized : public ::testing::Test {};
using block_types = ::testing::Types<xattn::q8_block, xattn::q4_block>;
TYPED_TEST_SUITE(PropertyQuantized, block_types, );

TYPED_TEST(PropertyQuantized, KernelsReadTheBlocksAsTheirValues) {
  xattn_test::property::run_cases(run_quantized_case<TypeParam>,
                                  xattn_test::property::run_seed() + 0x9b10c5, 5,
                                  "quantized cases");
}

// A fifth as many cases as the forward's: each runs the long-double backward too.
TYPED_TEST(Property, BackwardKernelsMatchTheReferenceOnRandomCases) {
  xattn_test::property::run_cases(run_backward_case<TypeParam>,
                                  xattn_test::property::run_seed() + 0x5eed, 5, "backward cases");
}

// The half backward, as many cases as float's (the reference dominates their cost).
TYPED_TEST(PropertyHalf, BackwardKernelsMatchTheReferenceOnRandomCases) {
  xattn_test::property::run_cases(run_backward_case<TypeParam>,
                                  xattn_test::property::run_seed() + 0x4a1f5eed, 5,
                                  "half backward cases");
}

}  // namespace
