// SPDX-License-Identifier: MIT
// naive_attention_backward and tiled_attention_backward: central finite differences in double
// for every mask kind, grouped-query heads, strided views and odd tiles; the tiled kernel against
// the naive one in float; the same bits on 1 to 4 threads; zero gradients for masked rows and
// keys past the key padding; and every argument error.
#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"

#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::random_tensor;
using xattn_test::shape;
using xattn_test::tensor;
using xattn_test::throws_with;

using xattn_test::bool_mask;

xattn::tile_options tiles(index_t q, index_t kv, int threads = 0) {
  xattn::tile_options t;
  if (q > 0) t.q_tile = q;
  if (kv > 0) t.kv_tile = kv;
  if (threads > 0) t.num_threads = threads;
  return t;
}

// A backward kernel under test, called as tiled_attention_backward is.
template <class T>
struct backward_kernel {
  std::string name;
  std::function<void(xattn::tensor_view<const T, 4>, xattn::tensor_view<const T, 4>,
                     xattn::tensor_view<const T, 4>, xattn::tensor_view<const T, 4>,
                     xattn::tensor_view<const T, 4>, const xattn::attention_grads<T>&,
                     const xattn::attention_options<T>&)>
      run;
};

template <class T>
std::vector<backward_kernel<T>> backward_kernels() {
  std::vector<backward_kernel<T>> ks;
  ks.push_back(
      {"naive", [](auto q, auto k, auto v, auto o, auto d, const auto& g, const auto& opts) {
         xattn::naive_attention_backward<T>(q, k, v, o, d, g, opts);
       }});
  for (const auto& t : {tiles(0, 0), tiles(3, 5), tiles(1, 1), tiles(4, 2, 2)})
    ks.push_back({"tiled " + xattn_test::describe(t),
                  [t](auto q, auto k, auto v, auto o, auto d, const auto& g, const auto& opts) {
                    xattn::tiled_attention_backward<T>(q, k, v, o, d, g, opts, t);
                  }});
  return ks;
}

// One backward problem: inputs, the forward's output and lse (from naive_attention in T), an
// upstream gradient, and gradient buffers pre-filled with a sentinel.
template <class T>
struct grad_problem {
  xattn::attention_shape s;
  tensor<T, 4> q, k, v, out, dout, dq, dk, dv;
  tensor<T, 3> lse;
  std::optional<tensor<T, 4>> bias, dbias;

  explicit grad_problem(const xattn::attention_shape& shape, unsigned seed = 1)
      : s(shape),
        q(random_tensor<T, 4>({s.batch, s.num_heads, s.q_len, s.head_dim}, seed)),
        k(random_tensor<T, 4>({s.batch, s.kv_heads(), s.kv_len, s.head_dim}, seed + 1)),
        v(random_tensor<T, 4>({s.batch, s.kv_heads(), s.kv_len, s.value_dim}, seed + 2)),
        out({s.batch, s.num_heads, s.q_len, s.value_dim}),
        dout(random_tensor<T, 4>({s.batch, s.num_heads, s.q_len, s.value_dim}, seed + 3)),
        dq({s.batch, s.num_heads, s.q_len, s.head_dim}, T(-7)),
        dk({s.batch, s.kv_heads(), s.kv_len, s.head_dim}, T(-7)),
        dv({s.batch, s.kv_heads(), s.kv_len, s.value_dim}, T(-7)),
        lse({s.batch, s.num_heads, s.q_len}) {}

  void add_bias(const std::array<index_t, 4>& e, unsigned seed) {
    bias = random_tensor<T, 4>(e, seed, -2.0, 2.0);
    dbias = tensor<T, 4>(e, T(-7));
  }

  // The options with the bias, dbias-less, and lse_out pointing at lse.
  xattn::attention_options<T> with_lse(xattn::attention_options<T> opts) {
    if (bias) opts.mask.bias = bias->cview();
    opts.lse_out = lse.view();
    return opts;
  }

  void forward(const xattn::attention_options<T>& opts) {
    xattn::naive_attention<T>(q.cview(), k.cview(), v.cview(), out.view(), with_lse(opts));
  }

  xattn::attention_grads<T> grads() {
    xattn::attention_grads<T> g{dq.view(), dk.view(), dv.view(), std::nullopt};
    if (dbias) g.dbias = dbias->view();
    return g;
  }

  void backward(const backward_kernel<T>& kern, const xattn::attention_options<T>& opts) {
    forward(opts);
    kern.run(q.cview(), k.cview(), v.cview(), out.cview(), dout.cview(), grads(), with_lse(opts));
  }
};

// L = Σ dout ∘ attention(q, k, v): dL/dx by central differences for every element x of `x`.
// The forward is naive_attention<double>.
std::vector<double> finite_differences(grad_problem<double>& p, std::vector<double>& x,
                                       const xattn::attention_options<double>& opts) {
  const double h = 1e-5;
  tensor<double, 4> o(p.out.extents);
  const auto loss = [&] {
    auto o_opts = opts;
    if (p.bias) o_opts.mask.bias = p.bias->cview();
    xattn::naive_attention<double>(p.q.cview(), p.k.cview(), p.v.cview(), o.view(), o_opts);
    double l = 0;
    for (std::size_t n = 0; n < o.data.size(); ++n) l += o.data[n] * p.dout.data[n];
    return l;
  };
  std::vector<double> g(x.size());
  for (std::size_t n = 0; n < x.size(); ++n) {
    const double keep = x[n];
    x[n] = keep + h;
    const double up = loss();
    x[n] = keep - h;
    const double down = loss();
    x[n] = keep;
    g[n] = (up - down) / (2 * h);
  }
  return g;
}

// max |got - want| / max |want|: the error relative to the gradient's size. A gradient that is
// zero in exact arithmetic (a bias broadcast over all keys: the softmax ignores a shift) is
// measured against 0.01 instead, so rounding noise is not divided by rounding noise.
double relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double diff = 0, size = 0;
  for (std::size_t n = 0; n < got.size(); ++n) {
    diff = std::max(diff, std::isnan(got[n]) ? HUGE_VAL : std::abs(got[n] - want[n]));
    size = std::max(size, std::abs(want[n]));
  }
  return diff / std::max(size, 0.01);
}

// The worst error a test saw, printed at its end for the record.
double worst_fd_error = 0;
struct print_worst_error {
  ~print_worst_error() {
    std::printf("worst finite-difference relative error: %.3g\n", worst_fd_error);
    worst_fd_error = 0;
  }
};

// Checks every gradient of every backward kernel against central differences.
void expect_matches_finite_differences(const xattn::attention_shape& s,
                                       const xattn::attention_options<double>& opts,
                                       const std::optional<std::array<index_t, 4>>& bias_extents,
                                       unsigned seed = 1) {
  for (const auto& kern : backward_kernels<double>()) {
    SCOPED_TRACE(kern.name);
    grad_problem<double> p(s, seed);
    if (bias_extents) p.add_bias(*bias_extents, seed + 7);
    p.backward(kern, opts);
    const std::pair<const char*, std::pair<std::vector<double>*, std::vector<double>*>> pairs[] = {
        {"dq", {&p.q.data, &p.dq.data}},
        {"dk", {&p.k.data, &p.dk.data}},
        {"dv", {&p.v.data, &p.dv.data}},
        {"dbias", {p.bias ? &p.bias->data : nullptr, p.dbias ? &p.dbias->data : nullptr}}};
    for (const auto& [name, xs] : pairs) {
      if (!xs.first) continue;
      const std::vector<double> fd = finite_differences(p, *xs.first, opts);
      const double err = relative_error(*xs.second, fd);
      worst_fd_error = std::max(worst_fd_error, err);
      EXPECT_LE(err, 1e-6) << name;
    }
  }
}

TEST(AttentionBackward, MatchesFiniteDifferencesWithoutMasks) {
  const print_worst_error report;
  // Lq != Lk, Dk != Dv, Lq = 1, Lk = 1, grouped-query and multi-query heads.
  for (const auto& s :
       {shape(2, 2, 5, 7, 3, 4), shape(1, 1, 1, 6, 4, 2), shape(1, 2, 4, 1, 2, 3),
        shape(1, 4, 3, 5, 2, 2, 2), shape(2, 3, 2, 4, 3, 2, 1), shape(1, 1, 9, 11, 3, 3)}) {
    SCOPED_TRACE(::testing::Message() << "H " << s.num_heads << " Hkv " << s.kv_heads() << " Lq "
                                      << s.q_len << " Lk " << s.kv_len);
    expect_matches_finite_differences(s, {}, std::nullopt);
  }
}

TEST(AttentionBackward, MatchesFiniteDifferencesWithEveryMaskKind) {
  const print_worst_error report;
  const auto s = shape(2, 2, 6, 7, 3, 2, 1);
  const std::vector<index_t> lengths = {4, 7};
  bool_mask allowed({1, 2, 6, 7}, true);
  for (index_t n = 0; n < allowed.size(); ++n) allowed.data[std::size_t(n)] = (n * 7 % 5) != 0;
  for (index_t j = 0; j < 7; ++j) allowed.view()(0, 1, 2, j) = false;  // a fully masked row
  for (int kind = 0; kind < 6; ++kind) {
    SCOPED_TRACE(::testing::Message() << "mask kind " << kind);
    xattn::attention_options<double> opts;
    if (kind == 0 || kind == 5) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
    if (kind == 1 || kind == 5) opts.mask.allowed = allowed.cview();
    if (kind == 2) opts.mask.causal = xattn::causal_mask::top_left;
    if (kind == 3 || kind == 5) opts.mask.causal = xattn::causal_mask::bottom_right;
    if (kind == 4) opts.scale = 0.7;
    expect_matches_finite_differences(s, opts, std::nullopt, unsigned(kind + 3));
  }
}

TEST(AttentionBackward, MatchesFiniteDifferencesForTheBiasAndItsBroadcasts) {
  const print_worst_error report;
  const auto s = shape(2, 2, 5, 6, 3, 2);
  const std::vector<index_t> lengths = {6, 3};
  for (const auto& e : {std::array<index_t, 4>{2, 2, 5, 6}, std::array<index_t, 4>{1, 1, 5, 6},
                        std::array<index_t, 4>{2, 1, 1, 6}, std::array<index_t, 4>{1, 2, 5, 1},
                        std::array<index_t, 4>{1, 1, 1, 1}}) {
    SCOPED_TRACE(::testing::Message()
                 << "bias [" << e[0] << ", " << e[1] << ", " << e[2] << ", " << e[3] << "]");
    xattn::attention_options<double> opts;
    expect_matches_finite_differences(s, opts, e);
    opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
    opts.mask.causal = xattn::causal_mask::bottom_right;
    expect_matches_finite_differences(s, opts, e, 5);
  }
}

TEST(AttentionBackward, MatchesFiniteDifferencesOnStridedViews) {
  const print_worst_error report;
  // q, k, v, dout and every gradient read and written through permuted, strided views:
  // [B, L, H, D] buffers seen as [B, H, L, D], and k with its feature axis strided.
  const index_t B = 2, H = 2, Lq = 4, Lk = 5, Dk = 3, Dv = 2;
  auto q = random_tensor<double, 4>({B, Lq, H, Dk}, 11);
  auto k = random_tensor<double, 4>({B, Lk, H, 2 * Dk}, 12);
  auto v = random_tensor<double, 4>({B, Lk, H, Dv}, 13);
  auto dout = random_tensor<double, 4>({B, Lq, H, Dv}, 14);
  tensor<double, 4> out({B, Lq, H, Dv}), dq({B, Lq, H, Dk}), dk({B, Lk, H, 2 * Dk}),
      dv({B, Lk, H, Dv});
  tensor<double, 3> lse({B, H, Lq});
  const auto heads = [](auto view) { return xattn::permute(view, {0, 2, 1, 3}); };
  const auto every_other = [](auto view) {  // [B, Lk, H, 2 Dk] -> [B, H, Lk, Dk], stride 2
    return decltype(view)(view.data(), {view.extent(0), view.extent(2), view.extent(1), Dk},
                          {view.stride(0), view.stride(2), view.stride(1), 2});
  };
  xattn::attention_options<double> opts;
  opts.lse_out = lse.view();
  xattn::naive_attention<double>(heads(q.cview()), every_other(k.cview()), heads(v.cview()),
                                 heads(out.view()), opts);
  for (const auto& kern : backward_kernels<double>()) {
    SCOPED_TRACE(kern.name);
    const xattn::attention_grads<double> g{heads(dq.view()), every_other(dk.view()),
                                           heads(dv.view()), std::nullopt};
    kern.run(heads(q.cview()), every_other(k.cview()), heads(v.cview()), heads(out.cview()),
             heads(dout.cview()), g, opts);
    // The same problem packed, through the finite differences.
    grad_problem<double> p(shape(B, H, Lq, Lk, Dk, Dv));
    p.q.data = xattn_test::elements(heads(q.cview()));
    p.k.data = xattn_test::elements(every_other(k.cview()));
    p.v.data = xattn_test::elements(heads(v.cview()));
    p.dout.data = xattn_test::elements(heads(dout.cview()));
    const std::vector<double> errors = {
        relative_error(xattn_test::elements(heads(dq.cview())),
                       finite_differences(p, p.q.data, {})),
        relative_error(xattn_test::elements(every_other(dk.cview())),
                       finite_differences(p, p.k.data, {})),
        relative_error(xattn_test::elements(heads(dv.cview())),
                       finite_differences(p, p.v.data, {}))};
    for (double err : errors) {
      worst_fd_error = std::max(worst_fd_error, err);
      EXPECT_LE(err, 1e-6);
    }
  }
}

using xattn_test::backward_tol;

TEST(AttentionBackward, TiledMatchesNaiveInFloat) {
  for (const auto& s : {shape(2, 4, 70, 90, 40, 24, 2), shape(1, 2, 1, 300, 64, 64),
                        shape(1, 1, 130, 257, 64, 32), shape(2, 3, 33, 1, 8, 5)}) {
    SCOPED_TRACE(::testing::Message() << "Lq " << s.q_len << " Lk " << s.kv_len);
    const std::vector<index_t> lengths = {s.kv_len, s.kv_len / 2};
    for (int kind = 0; kind < 3; ++kind) {
      xattn::attention_options<float> opts;
      if (kind == 1) opts.mask.causal = xattn::causal_mask::bottom_right;
      if (kind == 2 && s.batch == 2) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
      // The exact gradients: the naive backward in double on the same inputs.
      grad_problem<double> want(s);
      grad_problem<float> got(s);
      auto to_double = [](const xattn::attention_options<float>& o) {
        xattn::attention_options<double> d;
        d.mask.kv_lengths = o.mask.kv_lengths;
        d.mask.causal = o.mask.causal;
        return d;
      };
      want.backward(backward_kernels<double>()[0], to_double(opts));
      got.backward(backward_kernels<float>()[1], opts);
      double max_score = 0;
      for (double x : want.lse.data) max_score = std::max(max_score, std::abs(x));
      const double tol = backward_tol<float>(s, std::isfinite(max_score) ? max_score : 0.0);
      EXPECT_TRUE(xattn_test::all_close(got.dq.data, want.dq.data, tol)) << "dq";
      EXPECT_TRUE(xattn_test::all_close(got.dk.data, want.dk.data, tol)) << "dk";
      EXPECT_TRUE(xattn_test::all_close(got.dv.data, want.dv.data, tol)) << "dv";
    }
  }
}

TEST(AttentionBackward, TiledGivesTheSameBitsOnEveryThreadCount) {
  const auto s = shape(2, 4, 75, 97, 16, 8, 2);
  grad_problem<float> p(s);
  p.add_bias({1, 4, 75, 97}, 3);
  const std::vector<index_t> lengths = {97, 41};
  xattn::attention_options<float> opts;
  opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
  p.forward(opts);
  std::vector<std::vector<float>> first;
  for (int t : {1, 2, 3, 4}) {
    SCOPED_TRACE(::testing::Message() << t << " threads");
    xattn::tiled_attention_backward<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                           p.dout.cview(), p.grads(), p.with_lse(opts),
                                           tiles(16, 8, t));
    const std::vector<std::vector<float>> now = {p.dq.data, p.dk.data, p.dv.data, p.dbias->data};
    if (first.empty()) first = now;
    for (std::size_t n = 0; n < now.size(); ++n)
      EXPECT_EQ(std::memcmp(now[n].data(), first[n].data(), now[n].size() * sizeof(float)), 0)
          << "gradient " << n;
  }
}

TEST(AttentionBackward, FullyMaskedRowsGiveZeroGradients) {
  const auto s = shape(2, 2, 6, 9, 4, 3);
  const std::vector<index_t> lengths = {0, 5};  // batch item 0: no keys at all
  bool_mask allowed({1, 1, 6, 9}, true);
  for (index_t j = 0; j < 9; ++j) allowed.view()(0, 0, 3, j) = false;  // query 3: none
  xattn::attention_options<float> opts;
  opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
  opts.mask.allowed = allowed.cview();
  for (const auto& kern : backward_kernels<float>()) {
    SCOPED_TRACE(kern.name);
    grad_problem<float> p(s);
    p.backward(kern, opts);
    for (const auto* g : {&p.dq.data, &p.dk.data, &p.dv.data})
      for (float x : *g) ASSERT_TRUE(std::isfinite(x));
    for (index_t h = 0; h < 2; ++h) {
      for (index_t i = 0; i < 6; ++i)
        for (index_t d = 0; d < 4; ++d) {
          EXPECT_EQ(p.dq.view()(0, h, i, d), 0.0f);
          EXPECT_EQ(p.dq.view()(1, h, 3, d), 0.0f);
        }
      for (index_t j = 0; j < 9; ++j)
        for (index_t d = 0; d < 4; ++d) EXPECT_EQ(p.dk.view()(0, h, j, d), 0.0f);
    }
  }
}

TEST(AttentionBackward, AKeyEveryQueryMasksPassesNoGradientEvenWithNaNInDout) {
  // Key 4 is masked for every query by `allowed`, query 2 sees no key at all, and dout holds
  // NaN in rows 1 and 2: dK and dV of key 4 stay 0 (dV += Pᵀ dO used to make 0 · NaN of them),
  // while the keys the NaN rows weigh do get NaN.
  const auto s = shape(1, 2, 5, 8, 4, 3);
  bool_mask allowed({1, 1, 5, 8}, true);
  for (index_t i = 0; i < 5; ++i) allowed.view()(0, 0, i, 4) = false;
  for (index_t j = 0; j < 8; ++j) allowed.view()(0, 0, 2, j) = false;
  xattn::attention_options<float> opts;
  opts.mask.allowed = allowed.cview();
  for (const auto& kern : backward_kernels<float>()) {
    SCOPED_TRACE(kern.name);
    grad_problem<float> p(s);
    for (index_t h = 0; h < 2; ++h)
      for (index_t e = 0; e < 3; ++e) {
        p.dout.view()(0, h, 1, e) = std::numeric_limits<float>::quiet_NaN();
        p.dout.view()(0, h, 2, e) = std::numeric_limits<float>::quiet_NaN();
      }
    p.backward(kern, opts);
    for (index_t d = 0; d < 4; ++d) EXPECT_EQ(p.dk.view()(0, 0, 4, d), 0.0f) << "dk " << d;
    for (index_t e = 0; e < 3; ++e) EXPECT_EQ(p.dv.view()(0, 0, 4, e), 0.0f) << "dv " << e;
    EXPECT_TRUE(std::isnan(p.dv.view()(0, 0, 3, 0)));  // a key row 1 weighs
  }
}

TEST(AttentionBackward, NeverReadsKeysPastTheKeyPadding) {
  // NaN in k and v past each length: it must not leak, and those keys get zero gradients.
  for (index_t lq : {1, 40}) {
    const auto s = shape(2, 2, lq, 70, 8, 8);
    const std::vector<index_t> lengths = {13, 50};
    xattn::attention_options<float> opts;
    opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
    for (const auto& kern : backward_kernels<float>()) {
      SCOPED_TRACE(kern.name);
      grad_problem<float> p(s);
      p.forward(opts);
      for (index_t b = 0; b < 2; ++b)
        for (index_t h = 0; h < 2; ++h)
          for (index_t j = lengths[std::size_t(b)]; j < 70; ++j)
            for (index_t e = 0; e < 8; ++e) {
              p.k.view()(b, h, j, e) = std::numeric_limits<float>::quiet_NaN();
              p.v.view()(b, h, j, e) = std::numeric_limits<float>::quiet_NaN();
            }
      kern.run(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(), p.dout.cview(), p.grads(),
               p.with_lse(opts));
      for (const auto* g : {&p.dq.data, &p.dk.data, &p.dv.data})
        for (float x : *g) ASSERT_TRUE(std::isfinite(x));
      for (index_t b = 0; b < 2; ++b)
        for (index_t j = lengths[std::size_t(b)]; j < 70; ++j)
          for (index_t e = 0; e < 8; ++e) {
            EXPECT_EQ(p.dk.view()(b, 1, j, e), 0.0f);
            EXPECT_EQ(p.dv.view()(b, 1, j, e), 0.0f);
          }
    }
  }
}

TEST(AttentionBackward, EmptyLengthsGiveZeroGradients) {
  for (const auto& s :
       {shape(2, 2, 0, 5, 3, 4), shape(2, 2, 4, 0, 3, 4), shape(0, 2, 4, 5, 3, 4)}) {
    for (const auto& kern : backward_kernels<float>()) {
      SCOPED_TRACE(kern.name);
      grad_problem<float> p(s);
      p.backward(kern, {});
      for (const auto* g : {&p.dq.data, &p.dk.data, &p.dv.data})
        for (float x : *g) EXPECT_EQ(x, 0.0f);
    }
  }
}

TEST(AttentionBackward, ScratchDoesNotGrowWithTheLengths) {
  const auto t = tiles(0, 0, 2);
  const index_t small =
      xattn::tiled_attention_backward_scratch_bytes<float>(shape(1, 8, 1024, 1024, 64, 64), t);
  const index_t large =
      xattn::tiled_attention_backward_scratch_bytes<float>(shape(1, 8, 65536, 65536, 64, 64), t);
  EXPECT_EQ(small, large);
  EXPECT_LT(large, index_t(1) << 20);
  std::printf("tiled_attention_backward scratch at Dk = Dv = 64, 2 threads: %td bytes\n", large);
  EXPECT_GT(xattn::naive_attention_backward_scratch_bytes<float>(shape(1, 8, 1024, 1024, 64, 64)),
            small);
}

// ---- argument errors: each is named, and nothing is written ---------------------------------

class BackwardErrors : public ::testing::Test {
 protected:
  grad_problem<float> p{shape(2, 4, 5, 6, 3, 2, 2)};
  xattn::attention_options<float> opts;

  void SetUp() override {
    p.add_bias({1, 4, 5, 6}, 3);
    p.forward({});
    p.dq.data.assign(p.dq.data.size(), -7.0f);
    opts = p.with_lse({});
  }
  // Runs both kernels with the given arguments; each must throw E naming the fragment, with
  // every gradient untouched.
  template <class E>
  void expect_error(const xattn::tensor_view<const float, 4>& out,
                    const xattn::tensor_view<const float, 4>& dout,
                    const xattn::attention_grads<float>& g,
                    const xattn::attention_options<float>& o, const char* fragment,
                    bool naive_too = true, const xattn::tile_options& t = {}) {
    if (naive_too) {
      EXPECT_TRUE(throws_with<E>(
          [&] {
            xattn::naive_attention_backward<float>(p.q.cview(), p.k.cview(), p.v.cview(), out, dout,
                                                   g, o);
          },
          {"naive_attention_backward", fragment}));
    }
    EXPECT_TRUE(throws_with<E>(
        [&] {
          xattn::tiled_attention_backward<float>(p.q.cview(), p.k.cview(), p.v.cview(), out, dout,
                                                 g, o, t);
        },
        {"tiled_attention_backward", fragment}));
    for (const auto* x : {&p.dq.data, &p.dk.data, &p.dv.data, &p.dbias->data})
      for (float y : *x) ASSERT_EQ(y, -7.0f);
  }
};

TEST_F(BackwardErrors, BadExtentsAreShapeErrors) {
  tensor<float, 4> wrong({2, 4, 5, 3});  // Dv + 1 (and Dk)
  tensor<float, 4> wrong_dq({2, 4, 5, 4});
  tensor<float, 4> wrong_k({2, 2, 7, 3});
  auto g = p.grads();
  expect_error<xattn::shape_error>(wrong.cview(), p.dout.cview(), g, opts, "out.extent(3)");
  expect_error<xattn::shape_error>(p.out.cview(), wrong.cview(), g, opts, "dout.extent(3)");
  g.dq = wrong_dq.view();
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts, "grads.dq.extent(3)");
  g = p.grads();
  g.dk = wrong_k.view();
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts, "grads.dk.extent(2)");
  g = p.grads();
  g.dv = wrong_k.view();
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts, "grads.dv.extent(2)");
  g = p.grads();
  tensor<float, 4> wrong_db({2, 4, 5, 6});
  g.dbias = wrong_db.view();
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts, "grads.dbias.extent(0)");
  tensor<float, 3> wrong_lse({2, 4, 4});
  auto o = opts;
  o.lse_out = wrong_lse.view();
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), p.grads(), o,
                                   "opts.lse_out.extent(2)");
}

TEST_F(BackwardErrors, BadValuesAreValueErrors) {
  auto o = opts;
  o.lse_out.reset();
  expect_error<xattn::value_error>(p.out.cview(), p.dout.cview(), p.grads(), o, "opts.lse_out",
                                   false);
  o = opts;
  o.mask.bias.reset();
  expect_error<xattn::value_error>(p.out.cview(), p.dout.cview(), p.grads(), o, "grads.dbias");
  o = opts;
  o.scale = std::nan("");
  expect_error<xattn::value_error>(p.out.cview(), p.dout.cview(), p.grads(), o, "scale");
  const std::vector<index_t> lengths = {3, 7};
  o = opts;
  o.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
  expect_error<xattn::value_error>(p.out.cview(), p.dout.cview(), p.grads(), o,
                                   "mask.kv_lengths(1)");
  xattn::tile_options bad;
  bad.q_tile = -1;
  expect_error<xattn::value_error>(p.out.cview(), p.dout.cview(), p.grads(), opts, "tiles.q_tile",
                                   false, bad);
  expect_error<xattn::value_error>(p.out.cview(), p.dout.cview(), p.grads(), opts,
                                   "tiles.num_threads", false, tiles(0, 0, 5000));
}

TEST_F(BackwardErrors, OverlappingGradientsAreShapeErrors) {
  auto g = p.grads();
  g.dq = xattn::tensor_view<float, 4>(const_cast<float*>(p.q.data.data()), p.q.extents);
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts, "grads.dq overlaps q");
  g = p.grads();
  g.dv = xattn::tensor_view<float, 4>(p.dk.data.data(), p.dv.extents);
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts,
                                   "grads.dv overlaps grads.dk");
  g = p.grads();
  g.dk = xattn::tensor_view<float, 4>(p.dk.data.data(), p.dk.extents, {0, 0, 0, 1});
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts, "grads.dk.stride");
  g = p.grads();
  g.dbias = xattn::tensor_view<float, 4>(p.bias->data.data(), p.bias->extents);
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, opts,
                                   "grads.dbias overlaps mask.bias");
  g = p.grads();
  // dq starts where dout does, in a buffer of its own that holds both (dq is the larger, and
  // must not reach into another input's memory).
  std::vector<float> shared(p.dq.data.size());
  std::copy(p.dout.data.begin(), p.dout.data.end(), shared.begin());
  g.dq = xattn::tensor_view<float, 4>(shared.data(), p.dq.extents);
  expect_error<xattn::shape_error>(
      p.out.cview(), xattn::tensor_view<const float, 4>(shared.data(), p.dout.extents), g, opts,
      "grads.dq overlaps dout");
  g = p.grads();
  auto o = opts;
  o.lse_out = xattn::tensor_view<float, 3>(p.dq.data.data(), p.lse.extents);
  expect_error<xattn::shape_error>(p.out.cview(), p.dout.cview(), g, o,
                                   "grads.dq overlaps opts.lse_out");
}

}  // namespace
