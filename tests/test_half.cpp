// SPDX-License-Identifier: MIT
// half.hpp: naive_attention and tiled_attention on Eigen::half and Eigen::bfloat16, and
// tiled_attention's mixed call (float queries, half keys and values). Each result is held to
// the half-precision accuracy rule (check_half_rule, test_support.hpp) against the long-double
// reference on the same half inputs, on odd shapes, every mask kind and every CPU path this
// machine runs; and, bit for bit, to the float call on the widened inputs rounded once, which
// is what half.hpp promises.

#include "xattn/half.hpp"

#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/dispatch.hpp"

#include "emulated_levels.hpp"
#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::check_half_rule;
using xattn_test::each_path;
using xattn_test::problem;
using xattn_test::random_tensor;
using xattn_test::shape;
using xattn_test::tensor;
using xattn_test::throws_with;
using xattn_test::tiles;

template <class T>
class Half : public ::testing::Test {};
using half_types = ::testing::Types<Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(Half, half_types, );

template <class T, std::size_t R>
tensor<float, R> widened(const tensor<T, R>& x) {
  tensor<float, R> w(x.extents);
  for (std::size_t n = 0; n < x.data.size(); ++n) w.data[n] = static_cast<float>(x.data[n]);
  return w;
}

template <class T>
std::vector<T> rounded(const std::vector<float>& x) {
  std::vector<T> r;
  for (float f : x) r.push_back(static_cast<T>(f));
  return r;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Whether a half (or mixed) call on `path` must equal the float call bit for bit. The float and
// half loops are the same source; but where the build's own target has FMA (-march=native), the
// compiler may fuse a multiply and an add of the sse2 path differently around a float and a half
// load, and there the two agree to float's rounding instead.
bool bitwise_path(std::string_view path) {
#ifdef __FMA__
  return path != "sse2" && path != "eigen";
#else
  (void)path;
  return true;
#endif
}

// got == want bit for bit on a bitwise_path, else within tol.
template <class G, class W>
::testing::AssertionResult matches(const std::vector<G>& got, const std::vector<W>& want,
                                   std::string_view path, double tol) {
  if (bitwise_path(path))
    return same_bits(got, want) ? ::testing::AssertionSuccess()
                                : ::testing::AssertionFailure() << "the bits differ";
  return xattn_test::all_close(got, want, tol);
}

// The kernels under test, called like naive_attention on T.
template <class T>
std::vector<xattn_test::kernel<T>> half_kernels() {
  std::vector<xattn_test::kernel<T>> ks = {xattn_test::naive_kernel<T>(),
                                           xattn_test::tiled_kernel<T>({})};
  for (const auto& [qt, kt] : {std::pair<index_t, index_t>{1, 1}, {3, 5}, {64, 128}, {13, 7}})
    for (int t : xattn_test::thread_counts(2))
      ks.push_back(xattn_test::tiled_kernel<T>(tiles(qt, kt, t)));
  return ks;
}

// Runs every kernel on p with opts (asking for the statistics too) and checks the output by the
// accuracy rule and the statistics, in float, against the reference.
template <class T>
void check_all_kernels(problem<T>& p, xattn::attention_options<T> opts) {
  opts.weights_out = p.weights.view();
  opts.lse_out = p.lse.view();
  const auto exact =
      xattn_test::reference_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), opts);
  const double stat_tol =
      xattn_test::attention_tol<float>(p.s.head_dim, p.s.kv_len, exact.max_abs_score);
  for (const auto& kern : half_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    std::fill(p.out.data.begin(), p.out.data.end(), T(-7.0f));
    std::fill(p.lse.data.begin(), p.lse.data.end(), -7.0f);
    std::fill(p.weights.data.begin(), p.weights.data.end(), -7.0f);
    kern.run(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts);
    EXPECT_TRUE(check_half_rule<T>(p.out.data, p.q.cview(), p.k.cview(), p.v.cview(), opts));
    EXPECT_TRUE(xattn_test::all_close(p.lse.data, exact.lse, stat_tol)) << "log-sum-exp";
    EXPECT_TRUE(xattn_test::all_close(p.weights.data, exact.weights, stat_tol)) << "weights";
  }
}

TYPED_TEST(Half, EveryKernelAndPathHoldsTheAccuracyRuleOnOddShapes) {
  using T = TypeParam;
  each_path{true}([](std::string_view) {
    // Lq != Lk, Lq = 1, Lk = 1, Dk != Dv, lengths no tile or packet divides, GQA and MQA, query
    // counts on both sides of each path's packet width (the row and the lanes path).
    for (const auto& s :
         {shape(1, 1, 1, 1, 1, 1), shape(2, 4, 1, 77, 40, 24, 2), shape(1, 2, 3, 129, 7, 9),
          shape(1, 2, 5, 31, 64, 64), shape(2, 2, 9, 150, 33, 17, 1), shape(1, 3, 17, 1, 8, 8),
          shape(1, 1, 70, 130, 64, 40)}) {
      SCOPED_TRACE(::testing::Message() << "Lq " << s.q_len << " Lk " << s.kv_len << " Dk "
                                        << s.head_dim << " Dv " << s.value_dim);
      problem<T> p(s, 11);
      check_all_kernels<T>(p, {});
    }
  });
}

TYPED_TEST(Half, EveryKernelAppliesEveryMaskKind) {
  using T = TypeParam;
  each_path{true}([](std::string_view) {
    for (index_t lq : {1, 3, 20}) {
      const index_t lk = 53;
      const auto s = shape(2, 2, lq, lk, 8, 6);
      SCOPED_TRACE(::testing::Message() << "Lq " << lq);
      const std::vector<index_t> lengths = {17, lk};
      xattn_test::bool_mask allowed({1, 2, lq, lk});
      for (index_t n = 0; n < allowed.size(); ++n) allowed.data[std::size_t(n)] = (n * 7 % 5) != 0;
      auto bias = random_tensor<T, 4>({2, 1, 1, lk}, 9, -2.0, 2.0);
      bias.data[4] = T(-std::numeric_limits<float>::infinity());
      for (int kind = 0; kind < 7; ++kind) {
        xattn::attention_options<T> opts;
        if (kind == 0 || kind == 5) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
        if (kind == 1 || kind == 5) opts.mask.allowed = allowed.cview();
        if (kind == 2 || kind == 5) opts.mask.bias = bias.cview();
        if (kind == 3) opts.mask.causal = xattn::causal_mask::top_left;
        if (kind == 4 || kind == 5) opts.mask.causal = xattn::causal_mask::bottom_right;
        if (kind == 6) {  // a slice of longer sequences, causal over the whole
          opts.mask.causal = xattn::causal_mask::bottom_right;
          opts.mask.window = xattn::position_window{4, lq + 10, 30, lk + 40};
        }
        SCOPED_TRACE(::testing::Message() << "mask kind " << kind);
        problem<T> p(s, unsigned(kind + 1));
        check_all_kernels<T>(p, opts);
      }
    }
  });
}

TYPED_TEST(Half, TheResultIsTheFloatCallOnTheWidenedInputsRoundedOnce) {
  // half.hpp's promise, bit for bit: the same float arithmetic as the float call with the same
  // tiles, then one rounding. Also the statistics, which are float.
  using T = TypeParam;
  each_path()([](std::string_view path) {
    if (xattn::cpu_path_for<T>().find("dpbf16") != std::string::npos)
      return;  // bf16 products: another arithmetic, held to the rule by the tests above
    for (const auto& s : {shape(2, 4, 1, 300, 40, 24, 2), shape(1, 2, 70, 130, 64, 40)}) {
      problem<T> p(s, 3);
      auto bias = random_tensor<T, 4>({1, 1, s.q_len, s.kv_len}, 4, -1.0, 1.0);
      const tensor<float, 4> q = widened(p.q), k = widened(p.k), v = widened(p.v),
                             fbias = widened(bias);
      for (const auto& t : {tiles(0, 0), tiles(0, 100), tiles(13, 7, 2)}) {
        xattn::attention_options<T> opts;
        opts.mask.bias = bias.cview();
        opts.lse_out = p.lse.view();
        tensor<float, 3> flse(p.lse.extents);
        tensor<float, 4> fout(p.out.extents);
        xattn::attention_options<float> fopts;
        fopts.mask.bias = fbias.cview();
        fopts.lse_out = flse.view();
        xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts, t);
        xattn::tiled_attention<float>(q.cview(), k.cview(), v.cview(), fout.view(), fopts, t);
        const double eps = double(Eigen::NumTraits<T>::epsilon());
        EXPECT_TRUE(matches(p.out.data, rounded<T>(fout.data), path, eps)) << "tiled";
        EXPECT_TRUE(matches(p.lse.data, flse.data, path, 1e-5)) << "tiled log-sum-exp";
      }
      // naive_attention too, to one rounding: its Eigen products may order a sum differently
      // for differently aligned operands (its half inputs are widened into aligned copies).
      xattn::attention_options<T> opts;
      xattn::naive_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts);
      tensor<float, 4> fout(p.out.extents);
      xattn::naive_attention<float>(q.cview(), k.cview(), v.cview(), fout.view());
      EXPECT_TRUE(
          xattn_test::all_close(p.out.data, fout.data, double(Eigen::NumTraits<T>::epsilon())))
          << "naive";
    }
  });
}

// The backward kernels on half inputs: the float backward on the widened inputs (the forward's
// float log-sum-exp, the bias widened), each gradient rounded once, bit for bit, with every
// mask kind (a bias and its gradient, key lengths, an allowed mask, both causal masks, a
// position window), GQA, Lq = 1 and Lk = 1.
TYPED_TEST(Half, BackwardIsTheFloatBackwardOnTheWidenedInputsRoundedOnce) {
  using T = TypeParam;
  const auto bits_equal = [](const std::vector<T>& got, const std::vector<float>& want) {
    const std::vector<T> r = rounded<T>(want);
    for (std::size_t n = 0; n < got.size(); ++n)
      if (Eigen::numext::bit_cast<std::uint16_t>(got[n]) !=
          Eigen::numext::bit_cast<std::uint16_t>(r[n]))
        return ::testing::AssertionFailure()
               << "element " << n << ": " << float(got[n]) << " vs " << float(r[n]);
    return ::testing::AssertionSuccess();
  };
  each_path()([&](std::string_view) {
    for (const auto& s :
         {shape(2, 4, 5, 37, 24, 16, 2), shape(1, 2, 1, 70, 40, 40), shape(1, 1, 33, 1, 8, 12)}) {
      for (int set : {0, 1}) {
        // 0: a bias (and its gradient) and a bottom-right causal mask; 1: key lengths, an
        // allowed mask and a top-left causal mask in a position window.
        SCOPED_TRACE(::testing::Message()
                     << "Lq " << s.q_len << " Lk " << s.kv_len << " mask set " << set);
        problem<T> p(s, 5);
        const auto bias = random_tensor<T, 4>({1, s.num_heads, s.q_len, s.kv_len}, 6, -1.0, 1.0);
        const auto dout = random_tensor<T, 4>(p.out.extents, 7);
        xattn_test::bool_mask allowed({1, 1, s.q_len, s.kv_len});
        for (index_t n = 0; n < allowed.size(); ++n) allowed.data[std::size_t(n)] = n % 3 != 1;
        const std::vector<index_t> lengths{3 + s.kv_len, 3 + s.kv_len / 2};  // window positions
        xattn::attention_options<T> opts;
        if (set == 0) {
          opts.mask.bias = bias.cview();
          opts.mask.causal = xattn::causal_mask::bottom_right;
        } else {
          opts.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {s.batch});
          opts.mask.allowed = allowed.cview();
          opts.mask.causal = xattn::causal_mask::top_left;
          opts.mask.window = xattn::position_window{s.kv_len, s.kv_len + s.q_len, 3, 3 + s.kv_len};
        }
        opts.lse_out = p.lse.view();
        xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts);

        const tensor<float, 4> q = widened(p.q), k = widened(p.k), v = widened(p.v),
                               out = widened(p.out), fdout = widened(dout), fbias = widened(bias);
        xattn::attention_options<float> fopts;
        fopts.mask.kv_lengths = opts.mask.kv_lengths;
        fopts.mask.allowed = opts.mask.allowed;
        fopts.mask.causal = opts.mask.causal;
        fopts.mask.window = opts.mask.window;
        if (set == 0) fopts.mask.bias = fbias.cview();
        tensor<float, 3> flse = p.lse;
        fopts.lse_out = flse.view();
        for (bool naive : {false, true}) {
          SCOPED_TRACE(naive ? "naive" : "tiled");
          tensor<T, 4> dq(p.q.extents, T(-7)), dk(p.k.extents, T(-7)), dv(p.v.extents, T(-7)),
              db(bias.extents, T(-7));
          tensor<float, 4> fdq(p.q.extents), fdk(p.k.extents), fdv(p.v.extents),
              fdb(bias.extents, -7.0f);
          xattn::attention_grads<T> g{dq.view(), dk.view(), dv.view(), {}};
          xattn::attention_grads<float> fg{fdq.view(), fdk.view(), fdv.view(), {}};
          if (set == 0) {
            g.dbias = db.view();
            fg.dbias = fdb.view();
          }
          if (naive) {
            xattn::naive_attention_backward<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                               dout.cview(), g, opts);
            xattn::naive_attention_backward<float>(q.cview(), k.cview(), v.cview(), out.cview(),
                                                   fdout.cview(), fg, fopts);
          } else {
            xattn::tiled_attention_backward<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                               dout.cview(), g, opts, tiles(3, 16, 2));
            xattn::tiled_attention_backward<float>(q.cview(), k.cview(), v.cview(), out.cview(),
                                                   fdout.cview(), fg, fopts, tiles(3, 16, 2));
          }
          EXPECT_TRUE(bits_equal(dq.data, fdq.data)) << "dq";
          EXPECT_TRUE(bits_equal(dk.data, fdk.data)) << "dk";
          EXPECT_TRUE(bits_equal(dv.data, fdv.data)) << "dv";
          EXPECT_TRUE(bits_equal(db.data, fdb.data)) << "dbias (-7 where not asked for)";
          double largest = 0;  // a test that sees only zeros proves nothing (dq is 0 for Lk = 1)
          for (const T& x : dv.data) largest = std::max(largest, std::abs(double(float(x))));
          EXPECT_GT(largest, 1e-3);
        }
      }
    }
  });
}

TYPED_TEST(Half, BackwardArgumentErrorsAreNamedAndWriteNothing) {
  using T = TypeParam;
  problem<T> p(shape(1, 2, 4, 6, 8, 8), 9);
  xattn::attention_options<T> opts;  // no lse_out: the tiled backward needs it
  tensor<T, 4> dout(p.out.extents, T(0.5f)), dq(p.q.extents, T(-7)), dk(p.k.extents, T(-7)),
      dv(p.v.extents, T(-7)), small({1, 2, 4, 7}, T(-7));
  const auto untouched = [&] {
    for (const auto* t : {&dq, &dk, &dv, &small})
      for (const T& x : t->data)
        if (float(x) != -7.0f) return false;
    return true;
  };
  EXPECT_TRUE(throws_with<xattn::value_error>(
      [&] {
        xattn::tiled_attention_backward<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                           dout.cview(), {dq.view(), dk.view(), dv.view(), {}},
                                           opts);
      },
      {"tiled_attention_backward", "opts.lse_out"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        xattn::naive_attention_backward<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.cview(),
                                           dout.cview(), {small.view(), dk.view(), dv.view(), {}},
                                           opts);
      },
      {"naive_attention_backward", "grads.dq"}));
  EXPECT_TRUE(untouched());
}

TYPED_TEST(Half, MixedFloatQueriesReadHalfKeysAndValues) {
  // A decoder's float activations against a cache kept in half: exactly the float call with the
  // same tiles on the widened keys and values, on every path, and within float's tolerance of
  // the reference.
  using T = TypeParam;
  each_path()([](std::string_view path) {
    for (const auto& s : {shape(1, 8, 1, 1500, 64, 64), shape(2, 4, 3, 77, 40, 24, 2),
                          shape(1, 2, 40, 129, 33, 17), shape(1, 1, 1, 1, 1, 1)}) {
      SCOPED_TRACE(::testing::Message() << "Lq " << s.q_len << " Lk " << s.kv_len);
      const auto q = random_tensor<float, 4>({s.batch, s.num_heads, s.q_len, s.head_dim}, 7);
      const auto k = random_tensor<T, 4>({s.batch, s.kv_heads(), s.kv_len, s.head_dim}, 8);
      const auto v = random_tensor<T, 4>({s.batch, s.kv_heads(), s.kv_len, s.value_dim}, 9);
      const tensor<float, 4> kw = widened(k), vw = widened(v);
      const std::vector<index_t> lengths(std::size_t(s.batch), std::max<index_t>(1, s.kv_len - 5));
      for (bool masked : {false, true}) {
        xattn::attention_options<float> opts;
        if (masked) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {s.batch});
        tensor<float, 3> lse({s.batch, s.num_heads, s.q_len}, -7.0f), lse_f = lse;
        opts.lse_out = lse.view();
        for (const auto& t : {tiles(0, 0), tiles(5, 64, 2)}) {
          tensor<float, 4> out({s.batch, s.num_heads, s.q_len, s.value_dim}, -7.0f), want = out;
          xattn::tiled_attention<float>(q.cview(), k.cview(), v.cview(), out.view(), opts, t);
          xattn::attention_options<float> fopts = opts;
          fopts.lse_out = lse_f.view();
          xattn::tiled_attention<float>(q.cview(), kw.cview(), vw.cview(), want.view(), fopts, t);
          EXPECT_TRUE(matches(out.data, want.data, path, 1e-5));
          EXPECT_TRUE(matches(lse.data, lse_f.data, path, 1e-5));
          // naive_attention to float's rounding (its Eigen products depend on alignment)
          xattn::naive_attention<float>(q.cview(), k.cview(), v.cview(), out.view(), opts);
          xattn::naive_attention<float>(q.cview(), kw.cview(), vw.cview(), want.view(), fopts);
          EXPECT_TRUE(xattn_test::all_close(
              out.data, want.data, xattn_test::attention_tol<float>(s.head_dim, s.kv_len, 1.0)))
              << "naive";
          const auto exact =
              xattn_test::reference_attention<float>(q.cview(), kw.cview(), vw.cview(), opts);
          EXPECT_TRUE(xattn_test::all_close(
              out.data, exact.out,
              xattn_test::attention_tol<float>(s.head_dim, s.kv_len, exact.max_abs_score)));
        }
      }
    }
  });
}

TYPED_TEST(Half, FullyMaskedRowsGiveZerosAndNaNFollowsThePolicy) {
  using T = TypeParam;
  problem<T> p(shape(1, 1, 4, 40, 8, 8), 5);
  xattn_test::bool_mask allowed({1, 1, 4, 40}, true);
  for (index_t j = 0; j < 40; ++j)
    allowed.data[std::size_t(1 * 40 + j)] = false;  // row 1 sees nothing
  p.q.data[std::size_t(2 * 8 + 3)] = T(std::numeric_limits<float>::quiet_NaN());  // row 2 is NaN
  xattn::attention_options<T> opts;
  opts.mask.allowed = allowed.cview();
  opts.lse_out = p.lse.view();
  each_path{true}([&](std::string_view) {
    for (const auto& kern : half_kernels<T>()) {
      SCOPED_TRACE(kern.name);
      kern.run(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts);
      for (index_t e = 0; e < 8; ++e) {
        EXPECT_EQ(float(p.out.data[std::size_t(1 * 8 + e)]), 0.0f);
        EXPECT_TRUE(std::isnan(float(p.out.data[std::size_t(2 * 8 + e)])));
        EXPECT_TRUE(std::isfinite(float(p.out.data[std::size_t(0 * 8 + e)])));
      }
      EXPECT_EQ(p.lse.data[1], -std::numeric_limits<float>::infinity());
      EXPECT_TRUE(std::isnan(p.lse.data[2]));
    }
  });
}

TYPED_TEST(Half, StridedViewsGiveThePackedResult) {
  // q, k, v stored [B, L, H, D] (as projections write them) and out written into every other
  // column of a wider buffer: the same bits as packed views.
  using T = TypeParam;
  const index_t B = 2, H = 3, Lq = 9, Lk = 40, D = 16;
  problem<T> p(shape(B, H, Lq, Lk, D, D), 8);
  const auto relayout = [](const tensor<T, 4>& x) {  // [B, H, L, D] -> storage [B, L, H, D]
    const auto& e = x.extents;
    std::vector<T> s(x.data.size());
    for (index_t b = 0; b < e[0]; ++b)
      for (index_t h = 0; h < e[1]; ++h)
        for (index_t l = 0; l < e[2]; ++l)
          for (index_t d = 0; d < e[3]; ++d)
            s[std::size_t(((b * e[2] + l) * e[1] + h) * e[3] + d)] = x.view()(b, h, l, d);
    return s;
  };
  const std::vector<T> qs = relayout(p.q), ks = relayout(p.k), vs = relayout(p.v);
  const auto view = [](const std::vector<T>& s, index_t h, index_t l, index_t d, index_t b) {
    return xattn::tensor_view<const T, 4>(s.data(), {b, h, l, d}, {l * h * d, d, h * d, 1});
  };
  each_path{true}([&](std::string_view) {
    for (const auto& kern : half_kernels<T>()) {
      SCOPED_TRACE(kern.name);
      kern.run(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), {});
      std::vector<T> wide(std::size_t(B * H * Lq * D * 2), T(-7.0f));
      const xattn::tensor_view<T, 4> out(wide.data(), {B, H, Lq, D},
                                         {H * Lq * D * 2, Lq * D * 2, D * 2, 2});
      kern.run(view(qs, H, Lq, D, B), view(ks, H, Lk, D, B), view(vs, H, Lk, D, B), out, {});
      EXPECT_TRUE(same_bits(xattn_test::elements(xattn::tensor_view<const T, 4>(out)), p.out.data));
    }
  });
}

TYPED_TEST(Half, BitwiseDeterministicAcrossThreadCounts) {
  using T = TypeParam;
  each_path{true}([](std::string_view) {
    for (const auto& s : {shape(1, 1, 1, 9000, 64, 64), shape(2, 3, 50, 200, 24, 16)}) {
      problem<T> p(s, 5);
      std::vector<T> first;
      for (int threads = 1; threads <= 4; ++threads) {
        xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), {},
                                  tiles(0, 0, threads));
        if (threads == 1)
          first = p.out.data;
        else
          EXPECT_TRUE(same_bits(first, p.out.data)) << threads << " threads";
      }
    }
  });
}

TYPED_TEST(Half, BadArgumentsAreNamedErrorsAndWriteNothing) {
  using T = TypeParam;
  problem<T> p(shape(1, 2, 3, 10, 8, 8), 2);
  const std::vector<T> sentinel = p.out.data;
  tensor<T, 4> short_k({1, 2, 9, 8});
  tensor<float, 3> bad_lse({1, 2, 4});
  for (const auto& kern : half_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    EXPECT_TRUE(throws_with<xattn::shape_error>(
        [&] { kern.run(p.q.cview(), short_k.cview(), p.v.cview(), p.out.view(), {}); },
        {"v", "extent(2)"}));
    xattn::attention_options<T> opts;
    opts.lse_out = bad_lse.view();
    EXPECT_TRUE(throws_with<xattn::shape_error>(
        [&] { kern.run(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), opts); }, {"lse_out"}));
    xattn::attention_options<T> big;
    big.scale = 1e300;  // beyond float, the compute type
    EXPECT_TRUE(throws_with<xattn::value_error>(
        [&] { kern.run(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), big); }, {"scale"}));
    EXPECT_TRUE(throws_with<xattn::shape_error>(
        [&] {
          kern.run(p.q.cview(), p.k.cview(), p.v.cview(),
                   xattn::tensor_view<T, 4>(p.k.data.data(), {1, 2, 3, 8}), {});
        },
        {"out overlaps k"}));
    EXPECT_TRUE(same_bits(p.out.data, sentinel));
  }
  // The mixed call checks the same way.
  const auto q = random_tensor<float, 4>({1, 2, 3, 8}, 1);
  tensor<float, 4> out({1, 2, 3, 8}, -7.0f);
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { xattn::tiled_attention<float>(q.cview(), short_k.cview(), p.v.cview(), out.view()); },
      {"tiled_attention", "v", "extent(2)"}));
  xattn::tile_options zero;
  zero.kv_tile = 0;
  EXPECT_TRUE(throws_with<xattn::value_error>(
      [&] {
        xattn::tiled_attention<float>(q.cview(), p.k.cview(), p.v.cview(), out.view(), {}, zero);
      },
      {"kv_tile"}));
  for (float x : out.data) EXPECT_EQ(x, -7.0f);
}

TYPED_TEST(Half, EveryPathWidensEveryValueExactly) {
  // Each path's conversion loop against Eigen's scalar conversion on all 65536 bit patterns
  // (NaNs stay NaN), at lengths that leave a scalar tail.
  using T = TypeParam;
  std::vector<T> all(65536 + 5);
  for (std::size_t n = 0; n < all.size(); ++n) {
    // every pattern, in a scrambled order
    all[n] = Eigen::numext::bit_cast<T>(std::uint16_t(n * 40503u));
  }
  for (xattn::detail::cpu_level l : xattn::detail::built_levels) {
    if (!xattn::detail::level_available(l)) continue;
    SCOPED_TRACE(xattn::detail::level_name(l));
    const auto& loops = xattn::detail::kernels_for<float>(l);
    std::vector<float> got(all.size(), -1.0f);
    if constexpr (std::is_same_v<T, Eigen::half>)
      loops.widen_fp16(all.data(), index_t(all.size()), got.data());
    else
      loops.widen_bf16(all.data(), index_t(all.size()), got.data());
    std::size_t wrong = 0;
    for (std::size_t n = 0; n < all.size(); ++n) {
      const float want = static_cast<float>(all[n]);
      if (std::isnan(want) ? !std::isnan(got[n]) : std::memcmp(&want, &got[n], sizeof want) != 0)
        ++wrong;
    }
    EXPECT_EQ(wrong, 0u);
  }
}

TYPED_TEST(Half, EveryPathRoundsLikeEigen) {
  // Each path's rounding loop (the outputs' one rounding) against Eigen's scalar round to
  // nearest even: every 4099th float bit pattern (all exponents, subnormals, infinities, NaNs)
  // and, for every half value, the floats just below, at and just above the midpoint to the
  // next one (the ties that round to even).
  using T = TypeParam;
  std::vector<float> x;
  for (std::uint64_t bits = 0; bits <= 0xffffffffu; bits += 4099)
    x.push_back(Eigen::numext::bit_cast<float>(std::uint32_t(bits)));
  for (std::uint32_t h = 0; h < 0xffff; ++h) {
    const float a = static_cast<float>(Eigen::numext::bit_cast<T>(std::uint16_t(h)));
    const float b = static_cast<float>(Eigen::numext::bit_cast<T>(std::uint16_t(h + 1)));
    if (!std::isfinite(a) || !std::isfinite(b)) continue;
    const float mid = float((double(a) + double(b)) / 2);  // exact: one more bit than T has
    x.insert(x.end(), {mid, std::nextafter(mid, a), std::nextafter(mid, b)});
  }
  x.resize(x.size() / 16 * 16 + 5);  // a scalar tail on every path
  for (xattn::detail::cpu_level l : xattn::detail::built_levels) {
    if (!xattn::detail::level_available(l)) continue;
    SCOPED_TRACE(xattn::detail::level_name(l));
    const auto& loops = xattn::detail::kernels_for<float>(l);
    std::vector<T> got(x.size());
    if constexpr (std::is_same_v<T, Eigen::half>)
      loops.narrow_fp16(x.data(), index_t(x.size()), got.data());
    else
      loops.narrow_bf16(x.data(), index_t(x.size()), got.data());
    std::size_t wrong = 0, first = 0;
    for (std::size_t n = 0; n < x.size(); ++n) {
      const T want = static_cast<T>(x[n]);
      const bool ok = std::isnan(x[n]) ? bool(Eigen::numext::isnan(got[n]))
                                       : Eigen::numext::bit_cast<std::uint16_t>(want) ==
                                             Eigen::numext::bit_cast<std::uint16_t>(got[n]);
      if (!ok && wrong++ == 0) first = n;
    }
    EXPECT_EQ(wrong, 0u) << "first at " << x[first] << " (bits "
                         << Eigen::numext::bit_cast<std::uint32_t>(x[first]) << ")";
  }
}

TYPED_TEST(Half, AContextCacheInHalfHoldsTheRoundedProjectionsAndHalvesItsBytes) {
  // A float module encoding into a half cache: the keys and values are the float cache's
  // rounded once, the cache takes half the bytes, and forward against it is the module's
  // projections around the kernels' mixed call, bit for bit (tiled and naive).
  using S = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 48;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.context_dim = 40;
  const auto w = xattn::random_weights<float>(cfg, 3);
  xattn::multi_head_cross_attention<float> mha(cfg, w);
  const index_t B = 2, Lq = 3, Lk = 300;  // Lk spans two of the encoder's 256-row chunks
  const auto query = random_tensor<float, 3>({B, Lq, 48}, 1);
  tensor<float, 3> context({B, Lk + 1, 40});  // rows strided by one extra row's worth
  const auto fill = random_tensor<float, 3>({B, Lk + 1, 40}, 2);
  context.data = fill.data;
  const xattn::tensor_view<const float, 3> ctx(context.data.data(), {B, Lk, 40},
                                               {(Lk + 1) * 40, 40, 1});
  const auto full = mha.encode_context(ctx);
  const auto half = mha.template encode_context<S>(ctx);
  EXPECT_EQ(half.bytes() * 2, full.bytes());
  EXPECT_EQ(full.bytes(), index_t(2 * B * Lk * 2 * 16 * sizeof(float)));
  const std::vector<float> fk = xattn_test::elements(full.keys()),
                           fv = xattn_test::elements(full.values());
  EXPECT_TRUE(same_bits(xattn_test::elements(half.keys()), rounded<S>(fk)));
  EXPECT_TRUE(same_bits(xattn_test::elements(half.values()), rounded<S>(fv)));

  for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
    xattn::cross_attention_options<float> opts;
    opts.kernel = kernel;
    tensor<float, 3> out({B, Lq, 48}, -7.0f);
    mha.forward(query.cview(), half, out.view(), opts);
    // The same by hand: Q projected, the mixed kernel, the output projection.
    tensor<float, 3> qp({B, Lq, 64}), o({B, Lq, 64}), want({B, Lq, 48});
    w.q_proj.forward(query.cview(), qp.view());
    const auto qh = xattn::split_heads(qp.cview(), 4);
    const auto oh = xattn::split_heads(o.view(), 4);
    if (kernel == xattn::attention_kernel::naive)
      xattn::naive_attention<float>(qh, half.keys(), half.values(), oh);
    else
      xattn::tiled_attention<float>(qh, half.keys(), half.values(), oh, {}, opts.tiles);
    w.out_proj.forward(o.cview(), want.view());
    EXPECT_TRUE(same_bits(out.data, want.data));
    // and within the rounding of K and V of the float cache's result
    tensor<float, 3> ref({B, Lq, 48});
    mha.forward(query.cview(), full, ref.view(), opts);
    EXPECT_TRUE(
        xattn_test::all_close(out.data, ref.data, 8.0 * double(Eigen::NumTraits<S>::epsilon())));
  }

  // A bad context leaves the cache as it was.
  auto kept = half;
  const auto narrow = random_tensor<float, 3>({B, Lk, 39}, 4);
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { mha.encode_context(narrow.cview(), narrow.cview(), kept); }, {"context"}));
  EXPECT_TRUE(same_bits(xattn_test::elements(kept.keys()), xattn_test::elements(half.keys())));
  EXPECT_EQ(kept.kv_len(), Lk);
}

TEST(HalfCache, AWhisperBaseContextInBf16IsHalfTheFloatOne) {
  // Whisper base: Dm = 512, 8 heads of 64, 1500 audio frames, 6 decoder layers, each with its
  // own cross-attention cache.
  xattn::cross_attention_config cfg;
  cfg.model_dim = 512;
  cfg.num_heads = 8;
  const auto w = xattn::random_weights<float>(cfg, 1);
  xattn::multi_head_cross_attention<float> mha(cfg, w);
  const auto audio = random_tensor<float, 3>({1, 1500, 512}, 2);
  const index_t f = mha.encode_context(audio.cview()).bytes();
  const index_t b = mha.encode_context<Eigen::bfloat16>(audio.cview()).bytes();
  EXPECT_EQ(f, index_t(2 * 1500 * 512 * 4));  // 6,144,000 bytes a layer in float
  EXPECT_EQ(6 * b * 2, 6 * f);                // 36.9 MB for 6 layers in float, 18.4 MB in bf16
}

TEST(HalfPaths, ThePathNamesSayHowValuesAreConverted) {
  each_path{true}([](std::string_view path) {
    if (path == "avx2+dpbf16-emulated" || path == "avx512bf16-emulated") {
      EXPECT_EQ(xattn::cpu_path_for<float>(), "avx2");
      EXPECT_EQ(xattn::cpu_path_for<Eigen::half>(), "avx2+f16c");
      EXPECT_EQ(xattn::cpu_path_for<Eigen::bfloat16>(), "avx2+dpbf16-emulated");
      return;
    }
    if (path == "avx512-emulated") {  // the avx2 path's name, with the emulated loops
      EXPECT_EQ(xattn::cpu_path_for<Eigen::bfloat16>(), "avx2+shift");
      return;
    }
    const std::string p(path);
    EXPECT_EQ(xattn::cpu_path_for<float>(), p);
    const bool f16c = path == "avx2" || path == "avx512" || path == "avx512bf16";
    EXPECT_EQ(xattn::cpu_path_for<Eigen::half>(), p + (f16c ? "+f16c" : "+scalar"));
    EXPECT_EQ(xattn::cpu_path_for<Eigen::bfloat16>(), p + (path == "eigen"        ? "+scalar"
                                                           : path == "avx512bf16" ? "+dpbf16"
                                                                                  : "+shift"));
  });
}

TEST(HalfTraits, TheComputeAndStatisticTypes) {
  static_assert(std::is_same_v<xattn::compute_t<Eigen::half>, float>);
  static_assert(std::is_same_v<xattn::compute_t<Eigen::bfloat16>, float>);
  static_assert(std::is_same_v<xattn::compute_t<double>, double>);
  static_assert(std::is_same_v<xattn::statistic_t<Eigen::bfloat16>, float>);
  static_assert(xattn::is_element_v<Eigen::half> && !xattn::is_element_v<int>);
  EXPECT_STREQ(xattn::element_name<Eigen::bfloat16>(), "bf16");
  EXPECT_STREQ(xattn::element_name<Eigen::half>(), "fp16");
}

}  // namespace

TEST(HalfPaths, Bf16ProductsRoundTheProbabilitiesToBf16) {
  // Two keys with scores 0 and -2^-10 weigh values +1 and -1: the probabilities are 1 and
  // e^(-2^-10) = 1 - 2^-10 + ..., which bf16 rounds to 1. The bf16-product paths (P rounded, as
  // GPU FlashAttention does) give exactly 0; the widening paths (P in float) give
  // (1 - e^(-2^-10)) / (1 + e^(-2^-10)) = 4.880e-4, rounded to bf16. 32 queries: the lanes path
  // on every path, where the products run.
  using B = Eigen::bfloat16;
  const index_t Lq = 32;
  tensor<B, 4> q({1, 1, Lq, 1}, B(1.0f)), k({1, 1, 2, 1}), v({1, 1, 2, 1}), out({1, 1, Lq, 1});
  k.data = {B(0.0f), B(-std::ldexp(1.0f, -10))};
  v.data = {B(1.0f), B(-1.0f)};
  xattn::attention_options<B> opts;
  opts.scale = 1.0;
  const double e = std::exp(-std::ldexp(1.0, -10));
  const float widened = float(B(float((1 - e) / (1 + e))));
  each_path{true}([&](std::string_view) {
    const bool products = xattn::cpu_path_for<B>().find("dpbf16") != std::string::npos;
    std::fill(out.data.begin(), out.data.end(), B(-7.0f));
    xattn::tiled_attention<B>(q.cview(), k.cview(), v.cview(), out.view(), opts);
    for (const B& o : out.data) EXPECT_EQ(float(o), products ? 0.0f : widened);
  });
}

TEST(HalfPaths, Bf16ProductsTreatSubnormalInputsAsZeroAsTheInstructionDoes) {
  // vdpbf16ps counts subnormal inputs as zeros (whatever MXCSR says), and so does the emulated
  // avx512bf16 level: 32 queries over 4 keys of equal score whose values are the subnormal
  // 2^-130 give 0 on the bf16-product paths, and 2^-130 (exactly: every weight is 1/4) on the
  // widening paths. The avx2 test hook's emulation models products, not this flushing.
  using B = Eigen::bfloat16;
  const float tiny = std::ldexp(1.0f, -130);
  tensor<B, 4> q({1, 1, 32, 1}, B(1.0f)), k({1, 1, 4, 1}, B(0.0f)), v({1, 1, 4, 1}, B(tiny)),
      out({1, 1, 32, 1});
  ASSERT_EQ(float(B(tiny)), tiny);
  each_path{true}([&](std::string_view path) {
    if (path == "avx2+dpbf16-emulated") return;
    const bool products = xattn::cpu_path_for<B>().find("dpbf16") != std::string::npos;
    std::fill(out.data.begin(), out.data.end(), B(-7.0f));
    xattn::tiled_attention<B>(q.cview(), k.cview(), v.cview(), out.view());
    for (const B& o : out.data) EXPECT_EQ(float(o), products ? 0.0f : tiny);
  });
}

TEST(HalfPaths, Bf16ProductsReserveTheirPairsAndNoFloatCopies) {
  // The product loops read bf16 keys in place or copy them into their own pairs, so a call
  // reserves no float tiles of K or V, and tiled_attention_scratch_bytes counts what it reserves.
  // Run on a fresh thread, whose scratch starts empty.
  using B = Eigen::bfloat16;
  each_path::products_pass([](std::string_view) {
    const auto s = shape(1, 2, 40, 130, 33, 17);
    const xattn::tile_options one = tiles(0, 0, 1);
    const index_t estimate = xattn::tiled_attention_scratch_bytes<B>(s, one);
    std::thread([&] {
      problem<B> p(s, 4);
      xattn::tiled_attention<B>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), {}, one);
      const auto& ws = xattn::detail::calling_thread_scratch<float>().threads.at(0);
      EXPECT_EQ(ws.k_copy.capacity(), 0u);
      EXPECT_EQ(ws.v_copy.capacity(), 0u);
      EXPECT_GT(ws.pairs.size(), 0u);
      EXPECT_LE(ws.bytes(), estimate);
    }).join();
  });
}
