// SPDX-License-Identifier: MIT
// position_window (options.hpp): a call over a slice of the queries or a shard of the keys masks
// exactly what the whole call would, so shards merged by their log-sum-exp give the whole
// result, forward and backward. This is what distributed.hpp builds on, checked in one process.
#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/cross_attention.hpp"

#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::bool_mask;
using xattn_test::key_columns;
using xattn_test::key_rows;
using xattn_test::tensor;

template <class T>
class PositionWindow : public ::testing::Test {};
TYPED_TEST_SUITE(PositionWindow, xattn_test::element_types, );

/// The masks of opts for keys [begin, end) of `total`: element masks cut, the rest in a window.
template <class T>
xattn::attention_options<T> shard_call_options(const xattn::attention_options<T>& opts,
                                               index_t begin, index_t end, index_t total) {
  xattn::attention_options<T> o;
  o.scale = opts.scale;
  o.mask.kv_lengths = opts.mask.kv_lengths;
  o.mask.causal = opts.mask.causal;
  if (opts.mask.allowed) o.mask.allowed = key_columns(*opts.mask.allowed, begin, end - begin);
  if (opts.mask.bias) o.mask.bias = key_columns(*opts.mask.bias, begin, end - begin);
  xattn::position_window w;
  w.key_offset = begin;
  w.kv_len = total;
  o.mask.window = w;
  return o;
}

/// The masks every shard test runs: none, key padding, both causal alignments, a boolean mask
/// and a bias (with a -inf) that cross the shard boundaries.
struct masks {
  std::vector<index_t> lengths;
  bool_mask allowed;
  tensor<double, 4> bias_d;

  explicit masks(const xattn::attention_shape& s)
      : allowed({1, 1, s.q_len, s.kv_len}), bias_d({s.batch, 1, 1, s.kv_len}) {
    for (index_t b = 0; b < s.batch; ++b) lengths.push_back(std::max<index_t>(0, s.kv_len - 3 * b - 2));
    for (index_t i = 0; i < s.q_len; ++i)
      for (index_t j = 0; j < s.kv_len; ++j) allowed.data.get()[i * s.kv_len + j] = (i + 2 * j) % 3 != 0;
    for (index_t n = 0; n < index_t(bias_d.data.size()); ++n)
      bias_d.data[std::size_t(n)] = n % 5 == 1 ? -std::numeric_limits<double>::infinity() : 0.25 * double(n % 7) - 0.5;
  }

  template <class T>
  std::vector<std::pair<std::string, xattn::attention_options<T>>> cases(tensor<T, 4>& bias) const {
    std::vector<std::pair<std::string, xattn::attention_options<T>>> out(6);
    out[0].first = "no mask";
    out[1].first = "key padding";
    out[1].second.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {index_t(lengths.size())});
    out[2].first = "causal top-left";
    out[2].second.mask.causal = xattn::causal_mask::top_left;
    out[3].first = "causal bottom-right and key padding";
    out[3].second.mask.causal = xattn::causal_mask::bottom_right;
    out[3].second.mask.kv_lengths = out[1].second.mask.kv_lengths;
    out[4].first = "boolean";
    out[4].second.mask.allowed = allowed.cview();
    out[5].first = "bias";
    bias = tensor<T, 4>(bias_d.extents);
    for (std::size_t n = 0; n < bias.data.size(); ++n) bias.data[n] = static_cast<T>(bias_d.data[n]);
    out[5].second.mask.bias = bias.cview();
    return out;
  }
};

// Every kernel, every mask, a slice of queries and of keys: the same values as the whole call's
// rows and columns, against the long-double reference, which reads the window too.
TYPED_TEST(PositionWindow, SliceMatchesTheReference) {
  using T = TypeParam;
  const xattn::attention_shape whole = xattn_test::shape(2, 2, 9, 13, 5, 3);
  const masks mk(whole);
  tensor<T, 4> bias;
  for (const auto& kernel : xattn_test::all_kernels<T>())
    for (auto [name, opts] : mk.cases<T>(bias)) {
      // Queries [2, 7) of 9 against keys [4, 11) of 13.
      xattn_test::problem<T> p(xattn_test::shape(2, 2, 5, 7, 5, 3), 11);
      xattn::position_window w;
      w.query_offset = 2;
      w.query_len = 9;
      w.key_offset = 4;
      w.kv_len = 13;
      opts.mask.window = w;
      bool_mask allowed({1, 1, 5, 7});
      if (opts.mask.allowed) {  // the call's own [1, 1, 5, 7] part of the whole mask
        for (index_t i = 0; i < 5; ++i)
          for (index_t j = 0; j < 7; ++j)
            allowed.data.get()[i * 7 + j] = (*opts.mask.allowed)(0, 0, i + 2, j + 4);
        opts.mask.allowed = allowed.cview();
      }
      if (opts.mask.bias) opts.mask.bias = key_columns(*opts.mask.bias, 4, 7);
      SCOPED_TRACE(kernel.name + ", " + name);
      p.run_and_check(kernel.run, opts);
    }
}

// The reference itself, checked once against a whole call: a window at offset 0 covering
// everything is no window at all.
TYPED_TEST(PositionWindow, WholeWindowIsNoWindow) {
  using T = TypeParam;
  xattn_test::problem<T> p(xattn_test::shape(2, 1, 4, 6, 3, 2), 5);
  xattn::attention_options<T> opts;
  opts.mask.causal = xattn::causal_mask::bottom_right;
  tensor<T, 4> plain({2, 1, 4, 2});
  xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), plain.view(), opts);
  opts.mask.window = xattn::position_window{};
  xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts);
  EXPECT_EQ(plain.data, p.out.data);
}

/// Merges shard outputs [B, H, Lq, Dv] and log-sum-exps [B, H, Lq] in long double.
template <class T>
std::pair<std::vector<long double>, std::vector<long double>> merge(
    const std::vector<tensor<T, 4>>& outs, const std::vector<tensor<T, 3>>& lses) {
  const std::size_t rows = lses[0].data.size(), dv = outs[0].data.size() / std::max<std::size_t>(rows, 1);
  std::vector<long double> out(rows * dv, 0.0L), lse(rows);
  for (std::size_t r = 0; r < rows; ++r) {
    long double m = -std::numeric_limits<long double>::infinity();
    for (const auto& l : lses) m = std::max(m, (long double)l.data[r]);
    long double sum = 0;
    for (std::size_t s = 0; s < outs.size(); ++s) {
      const long double wgt = std::isinf(m) ? 0.0L : std::exp((long double)lses[s].data[r] - m);
      sum += wgt;
      for (std::size_t e = 0; e < dv; ++e) out[r * dv + e] += wgt * (long double)outs[s].data[r * dv + e];
    }
    for (std::size_t e = 0; e < dv; ++e) out[r * dv + e] = sum > 0 ? out[r * dv + e] / sum : 0.0L;
    lse[r] = sum > 0 ? m + std::log(sum) : m;
  }
  return {out, lse};
}

// Keys cut into uneven shards, one of them empty: each shard's output and log-sum-exp, merged,
// is the whole call's, for every mask (key padding and causal counted in whole positions,
// element masks cut per shard), GQA, Lq = 1 and Dk != Dv.
TYPED_TEST(PositionWindow, ShardsMergeToTheWholeResult) {
  using T = TypeParam;
  const std::vector<index_t> cuts = {0, 3, 3, 10, 17};  // shards of 3, 0, 7 and 7 keys
  for (const auto& whole : {xattn_test::shape(2, 4, 6, 17, 5, 3, 2), xattn_test::shape(2, 2, 1, 17, 4, 6)}) {
    const masks mk(whole);
    tensor<T, 4> bias;
    for (const auto& [name, opts] : mk.cases<T>(bias)) {
      SCOPED_TRACE(name + ", Lq = " + std::to_string(whole.q_len));
      xattn_test::problem<T> p(whole, 21);
      std::vector<tensor<T, 4>> outs;
      std::vector<tensor<T, 3>> lses;
      for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
        outs.emplace_back(p.out.extents, T(-7));
        lses.emplace_back(p.lse.extents, T(-7));
        auto o = shard_call_options(opts, cuts[c], cuts[c + 1], whole.kv_len);
        o.lse_out = lses.back().view();
        xattn::tile_options tiles;
        tiles.kv_tile = 2;
        xattn::tiled_attention<T>(p.q.cview(), key_rows(p.k.cview(), cuts[c], cuts[c + 1] - cuts[c]),
                                  key_rows(p.v.cview(), cuts[c], cuts[c + 1] - cuts[c]), outs.back().view(), o,
                                  tiles);
      }
      const auto [out, lse] = merge(outs, lses);
      const auto want = xattn_test::reference_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), opts);
      const double tol = xattn_test::attention_tol<T>(whole.head_dim, whole.kv_len, want.max_abs_score);
      EXPECT_TRUE(xattn_test::all_close(out, want.out, tol)) << "output";
      EXPECT_TRUE(xattn_test::all_close(lse, want.lse, tol)) << "log-sum-exp";
    }
  }
}

// The backward of a shard, given the whole forward's output and log-sum-exp: dk and dv of its
// keys are the whole backward's rows, and the shards' dq sum to the whole dq.
TYPED_TEST(PositionWindow, ShardBackwardsSumToTheWholeBackward) {
  using T = TypeParam;
  const std::vector<index_t> cuts = {0, 6, 6, 11};
  const xattn::attention_shape whole = xattn_test::shape(2, 4, 5, 11, 4, 3, 2);
  const masks mk(whole);
  tensor<T, 4> bias;
  for (const auto& [name, opts0] : mk.cases<T>(bias)) {
    SCOPED_TRACE(name);
    xattn_test::problem<T> p(whole, 31);
    auto opts = opts0;
    opts.lse_out = p.lse.view();
    xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts);
    const auto dout = xattn_test::random_tensor<T, 4>(p.out.extents, 41);
    tensor<T, 4> dq(p.q.extents), dk(p.k.extents), dv(p.v.extents);
    xattn::naive_attention_backward<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                       dout.cview(), {dq.view(), dk.view(), dv.view(), {}}, opts);

    std::vector<long double> dq_sum(dq.data.size(), 0.0L);
    const double tol = xattn_test::backward_tol<T>(
        whole, xattn_test::reference_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), opts0)
                   .max_abs_score);
    for (std::size_t c = 0; c + 1 < cuts.size(); ++c) {
      const index_t b0 = cuts[c], n = cuts[c + 1] - cuts[c];
      auto o = shard_call_options(opts, b0, cuts[c + 1], whole.kv_len);
      o.lse_out = p.lse.view();
      tensor<T, 4> sq(dq.extents), sk({2, 2, n, 4}), sv({2, 2, n, 3});
      xattn::tiled_attention_backward<T>(p.q.cview(), key_rows(p.k.cview(), b0, n),
                                         key_rows(p.v.cview(), b0, n), p.out.cview(),
                                         dout.cview(), {sq.view(), sk.view(), sv.view(), {}}, o);
      for (std::size_t e = 0; e < dq_sum.size(); ++e) dq_sum[e] += sq.data[e];
      const auto rows = [&](const tensor<T, 4>& g) {
        return xattn_test::elements(key_rows(g.cview(), b0, n));
      };
      EXPECT_TRUE(xattn_test::all_close(sk.data, rows(dk), tol)) << "dk of shard " << c;
      EXPECT_TRUE(xattn_test::all_close(sv.data, rows(dv), tol)) << "dv of shard " << c;
    }
    EXPECT_TRUE(xattn_test::all_close(dq_sum, dq.data, tol)) << "dq";
  }
}

TEST(PositionWindowErrors, BadWindowsAreValueErrorsAndNothingIsWritten) {
  xattn_test::problem<float> p(xattn_test::shape(1, 1, 3, 4, 2, 2), 3);
  const auto call = [&](const xattn::position_window& w, const index_t* len = nullptr) {
    xattn::attention_options<float> o;
    o.mask.window = w;
    if (len) o.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(len, {1});
    xattn::tiled_attention<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), o);
  };
  xattn::position_window w;
  w.key_offset = -1;
  EXPECT_TRUE(xattn_test::throws_with<xattn::value_error>(
      [&] { call(w); }, {"tiled_attention", "mask.window.key_offset is -1"}));
  w = {};
  w.query_offset = 2;
  w.query_len = 4;  // 2 + 3 queries do not fit in 4
  EXPECT_TRUE(xattn_test::throws_with<xattn::value_error>(
      [&] { call(w); }, {"mask.window.query_len is 4, expected >= 5"}));
  w = {};
  w.key_offset = 5;
  w.kv_len = 20;
  const index_t past = 21, fits = 20;
  EXPECT_TRUE(xattn_test::throws_with<xattn::value_error>(
      [&] { call(w, &past); }, {"mask.kv_lengths(0) is 21, expected a value in [0, 20]"}));
  EXPECT_TRUE(std::all_of(p.out.data.begin(), p.out.data.end(), [](float x) { return x == -7.0f; }));
  EXPECT_NO_THROW(call(w, &fits));  // a length past the call's own keys is fine in a window
}

TEST(PositionWindowErrors, ModuleRejectsKeyPaddingMaskInAKeyWindow) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 4;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<float> layer(cfg, xattn::random_weights<float>(cfg, 1));
  const auto query = xattn_test::random_tensor<float, 3>({1, 2, 4}, 1);
  const auto context = xattn_test::random_tensor<float, 3>({1, 3, 4}, 2);
  tensor<float, 3> out({1, 2, 4});
  bool pad[3] = {false, false, true};
  xattn::cross_attention_options<float> opts;
  opts.key_padding_mask = xattn::tensor_view<const bool, 2>(pad, {1, 3});
  xattn::position_window w;
  w.query_offset = 3;  // a slice of the queries against every key: the padding still fits
  opts.mask.window = w;
  EXPECT_NO_THROW(layer.forward(query.cview(), context.cview(), out.view(), opts));
  w.key_offset = 2;  // part of the keys: its kv_lengths would count other positions
  opts.mask.window = w;
  EXPECT_TRUE(xattn_test::throws_with<xattn::value_error>(
      [&] { layer.forward(query.cview(), context.cview(), out.view(), opts); },
      {"key_padding_mask cannot be combined with mask.window"}));
}

}  // namespace
