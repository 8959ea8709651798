// SPDX-License-Identifier: MIT
// The layer in half precision: linear<T> and multi_head_cross_attention<T> for T = Eigen::half
// and Eigen::bfloat16, their context cache, and weights read from safetensors without widening
// (F16/BF16 bit for bit, other dtypes rounded once). The projections are held to their exact
// values within one rounding plus float's error; the module to the half-precision accuracy rule
// (as the kernels in test_half.cpp) against the double module on the same half weights and
// inputs, with a plain half computation as the yardstick; the real checkpoint layouts load into
// a half module and obey the same rule.

#include "xattn/checkpoints.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/half.hpp"
#include "xattn/projection.hpp"
#include "xattn/safetensors.hpp"

#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>
#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#  include <omp.h>
#endif

namespace {

using xattn::index_t;
using xattn_test::each_path;
using xattn_test::random_tensor;
using xattn_test::tensor;
using xattn_test::throws_with;
using ld = long double;

template <class T>
class HalfModule : public ::testing::Test {};
using half_types = ::testing::Types<Eigen::half, Eigen::bfloat16>;
TYPED_TEST_SUITE(HalfModule, half_types, );

template <class T>
std::uint16_t bits(T x) {
  return Eigen::numext::bit_cast<std::uint16_t>(x);
}

template <class T>
double eps() {
  return xattn_test::epsilon<T>();
}

// A linear<T> with random weights (and bias when asked) of the scale PyTorch initialises.
template <class T>
xattn::linear<T> random_linear(index_t out, index_t in, bool bias, unsigned seed) {
  xattn::linear<T> l(out, in, bias);
  const double a = 1.0 / std::sqrt(double(std::max<index_t>(in, 1)));
  const auto w = random_tensor<T, 2>({out, in}, seed, -a, a);
  const auto b = random_tensor<T, 2>({1, out}, seed + 1, -a, a);
  for (index_t n = 0; n < l.weight.size(); ++n) l.weight.data()[n] = w.data[std::size_t(n)];
  for (index_t n = 0; n < l.bias.size(); ++n) l.bias.data()[n] = b.data[std::size_t(n)];
  return l;
}

// Every y(b, l, o) of linear<T>::forward against Σ x·w + b in long double: within half a unit
// in the last place of the exact value (the one rounding) plus float's error in a dot product of
// `in` terms (and the bias), itself possibly moving the rounding by as much.
template <class T>
::testing::AssertionResult matches_exact(const xattn::linear<T>& l,
                                         const xattn::tensor_view<const T, 3>& x,
                                         const xattn::tensor_view<const T, 3>& y) {
  const double f = double(std::numeric_limits<float>::epsilon());
  const double tiny = double(std::numeric_limits<T>::denorm_min());
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t r = 0; r < x.extent(1); ++r)
      for (index_t o = 0; o < l.out_features(); ++o) {
        ld exact = l.has_bias() ? xattn_test::to_ld(l.bias(o)) : 0.0L, mag = std::abs(exact);
        for (index_t i = 0; i < l.in_features(); ++i) {
          const ld t = xattn_test::to_ld(x(b, r, i)) * xattn_test::to_ld(l.weight(o, i));
          exact += t;
          mag += std::abs(t);
        }
        const double delta = double(l.in_features() + 2) * f * double(mag);
        const double tol = 0.5 * eps<T>() * (std::abs(double(exact)) + delta) + delta + tiny;
        const double err = std::abs(double(xattn_test::to_ld(y(b, r, o)) - exact));
        if (!(err <= tol))
          return ::testing::AssertionFailure()
                 << "y(" << b << ", " << r << ", " << o << ") = " << double(y(b, r, o))
                 << ", exact " << double(exact) << ": error " << err << " > " << tol;
      }
  return ::testing::AssertionSuccess();
}

TYPED_TEST(HalfModule, LinearIsTheExactProductRoundedOnceOnEveryPathAndShape) {
  using T = TypeParam;
  each_path()([&](std::string_view) {
    // Up to 4 rows: the half weight read in place; more: float GEMM on widened panels, in
    // blocks of 256 rows (600 rows: two full blocks and a partial one).
    for (index_t rows : {1, 3, 5, 300, 600})
      for (bool bias : {true, false}) {
        SCOPED_TRACE("rows " + std::to_string(rows) + (bias ? " with bias" : " no bias"));
        const auto l = random_linear<T>(19, 37, bias, unsigned(rows));
        const auto x = random_tensor<T, 3>({2, rows, 37}, 7);
        tensor<T, 3> y({2, rows, 19}, T(-7));
        xattn::row_matrix<float> scratch;
        l.forward(x.cview(), y.view(), scratch);
        EXPECT_TRUE(matches_exact<T>(l, x.cview(), y.cview()));
        // Scratch kept: a second call into it gives the same bits.
        tensor<T, 3> again({2, rows, 19}, T(-7));
        l.forward(x.cview(), again.view(), scratch);
        for (std::size_t n = 0; n < y.data.size(); ++n)
          ASSERT_EQ(bits(y.data[n]), bits(again.data[n]));
      }
  });
}

// The blocks of rows do not depend on the thread count, nor does any output's sum.
TYPED_TEST(HalfModule, LinearGivesTheSameBitsOnEveryThreadCount) {
  using T = TypeParam;
  const auto l = random_linear<T>(96, 160, true, 9);
  const auto x = random_tensor<T, 3>({3, 700, 160}, 5);
  std::vector<std::vector<T>> results;
  [[maybe_unused]] const int most = xattn_test::max_threads();
  for (int threads : xattn_test::thread_counts()) {
#ifdef _OPENMP
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    tensor<T, 3> y({3, 700, 96}, T(-7));
    l.forward(x.cview(), y.view());
    results.push_back(y.data);
  }
#ifdef _OPENMP
  omp_set_num_threads(most);
#endif
  for (const auto& r : results)
    for (std::size_t n = 0; n < r.size(); ++n) ASSERT_EQ(bits(r[n]), bits(results[0][n])) << n;
}

TYPED_TEST(HalfModule, LinearReadsAndWritesStridedViewsAndEigenMatrices) {
  using T = TypeParam;
  const auto l = random_linear<T>(6, 10, true, 3);
  // x: every other feature of a [2, 9, 20] tensor; y: a column slice [.., 1:7] of [2, 9, 8].
  const auto big_x = random_tensor<T, 3>({2, 9, 20}, 11);
  const xattn::tensor_view<const T, 3> x(big_x.data.data(), {2, 9, 10}, {180, 20, 2});
  tensor<T, 3> big_y({2, 9, 8}, T(-7));
  const xattn::tensor_view<T, 3> y(big_y.data.data() + 1, {2, 9, 6}, {72, 8, 1});
  l.forward(x, y);
  EXPECT_TRUE(matches_exact<T>(l, x, y));
  for (index_t b = 0; b < 2; ++b)
    for (index_t r = 0; r < 9; ++r) {
      EXPECT_EQ(float(big_y.data[std::size_t(b * 72 + r * 8)]), -7.0f);  // untouched
      EXPECT_EQ(float(big_y.data[std::size_t(b * 72 + r * 8 + 7)]), -7.0f);
    }
  // Inner stride 2 on the output too.
  tensor<T, 3> wide({2, 9, 12}, T(-7));
  const xattn::tensor_view<T, 3> y2(wide.data.data(), {2, 9, 6}, {108, 12, 2});
  l.forward(x, y2);
  EXPECT_TRUE(matches_exact<T>(l, x, y2));
  // The Eigen call computes the same float products.
  xattn::row_matrix<T> X(9, 10);
  for (index_t r = 0; r < 9; ++r)
    for (index_t i = 0; i < 10; ++i) X(r, i) = x(0, r, i);
  const xattn::row_matrix<T> Y = l(X);
  const xattn::tensor_view<const T, 3> yv(Y.data(), {1, 9, 6});
  EXPECT_TRUE(matches_exact<T>(l, xattn::tensor_view<const T, 3>(X.data(), {1, 9, 10}), yv));
}

TYPED_TEST(HalfModule, LinearArgumentErrorsWriteNothing) {
  using T = TypeParam;
  const auto l = random_linear<T>(6, 10, true, 3);
  const auto x = random_tensor<T, 3>({1, 4, 10}, 1);
  tensor<T, 3> y({1, 4, 5}, T(-7));
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { l.forward(x.cview(), y.view()); },
                                              {"linear::forward", "y"}));
  for (const T& e : y.data) EXPECT_EQ(float(e), -7.0f);
}

// The double module on the half weights and inputs (exact for the test's purpose), and a plain
// half computation where PyTorch's half module rounds: each projection's output, the scores and
// weights of the attention (plain_half_attention), and the output.
template <class T>
struct module_case {
  xattn::cross_attention_config cfg;
  xattn::cross_attention_weights<T> w;
  tensor<T, 3> query, context;

  static xattn::linear<double> widened(const xattn::linear<T>& l) {
    xattn::linear<double> d;
    d.weight = l.weight.template cast<float>().template cast<double>();
    d.bias = l.bias.template cast<float>().template cast<double>();
    return d;
  }
  static tensor<double, 3> widened(const tensor<T, 3>& t) {
    tensor<double, 3> d(t.extents);
    for (std::size_t n = 0; n < t.data.size(); ++n) d.data[n] = double(float(t.data[n]));
    return d;
  }
  static tensor<T, 3> rounded(const tensor<double, 3>& t) {
    tensor<T, 3> r(t.extents);
    for (std::size_t n = 0; n < t.data.size(); ++n)
      r.data[n] = static_cast<T>(static_cast<float>(t.data[n]));
    return r;
  }
  // linear<double> on a half tensor, rounded to T: the plain half projection.
  static tensor<T, 3> project(const xattn::linear<T>& l, const tensor<T, 3>& x) {
    const auto xd = widened(x);
    tensor<double, 3> y({x.extents[0], x.extents[1], l.out_features()});
    widened(l).forward(xd.cview(), y.view());
    return rounded(y);
  }

  std::vector<double> exact() const {
    const auto c = cfg.resolved();
    xattn::cross_attention_weights<double> wd{widened(w.q_proj), widened(w.k_proj),
                                              widened(w.v_proj), widened(w.out_proj)};
    xattn::multi_head_cross_attention<double> m(c, wd);
    const auto qd = widened(query), cd = widened(context);
    tensor<double, 3> out({query.extents[0], query.extents[1], c.model_dim});
    xattn::cross_attention_options<double> o;
    o.kernel = xattn::attention_kernel::naive;
    m.forward(qd.cview(), cd.cview(), out.view(), o);
    return out.data;
  }

  std::vector<T> plain() const {
    const auto c = cfg.resolved();
    const index_t B = query.extents[0], Lq = query.extents[1], H = c.num_heads;
    const auto q = project(w.q_proj, query), k = project(w.k_proj, context),
               v = project(w.v_proj, context);
    xattn::attention_options<T> ao;
    ao.scale = c.scale;
    const std::vector<T> heads = xattn_test::plain_half_attention<T>(
        xattn::split_heads(q.cview(), H), xattn::split_heads(k.cview(), c.num_kv_heads),
        xattn::split_heads(v.cview(), c.num_kv_heads), ao);
    tensor<T, 3> o({B, Lq, H * c.head_dim});  // [B, H, Lq, Dk] back to [B, Lq, H·Dk]
    for (index_t b = 0, n = 0; b < B; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < Lq; ++i)
          for (index_t e = 0; e < c.head_dim; ++e, ++n)
            o.data[std::size_t((b * Lq + i) * H * c.head_dim + h * c.head_dim + e)] =
                heads[std::size_t(n)];
    return project(w.out_proj, o).data;
  }

  // The accuracy rule of test_half.cpp for the whole layer: the error of `got` against the
  // exact output at most twice that of a yardstick computed in T (the plain half result, or
  // PyTorch's own), plus half a unit in the last place of the largest output.
  ::testing::AssertionResult rule(const std::vector<T>& got) const {
    return rule_against(got, plain(), "plain");
  }
  ::testing::AssertionResult rule_against(const std::vector<T>& got, const std::vector<T>& yard,
                                          const char* yard_name) const {
    return xattn_test::half_rule_holds(got, yard, exact(), yard_name);
  }
};

template <class T>
module_case<T> make_case(const xattn::cross_attention_config& cfg, index_t B, index_t Lq,
                         index_t Lk, unsigned seed) {
  const auto c = cfg.resolved();
  return {c, xattn::random_weights<T>(c, seed), random_tensor<T, 3>({B, Lq, c.model_dim}, seed + 1),
          random_tensor<T, 3>({B, Lk, c.context_dim}, seed + 2)};
}

xattn::cross_attention_config config(index_t dm, index_t dc, index_t h, index_t hkv,
                                     index_t dk = 0) {
  xattn::cross_attention_config c;
  c.model_dim = dm;
  c.context_dim = dc;
  c.num_heads = h;
  c.num_kv_heads = hkv;
  c.head_dim = dk;
  return c;
}

TYPED_TEST(HalfModule, ForwardObeysTheAccuracyRuleWithBothKernelsOnEveryPath) {
  using T = TypeParam;
  struct shape_case {
    xattn::cross_attention_config cfg;
    index_t B, Lq, Lk;
  };
  const shape_case cases[] = {
      {config(32, 24, 4, 4), 2, 5, 7},        // Dc != Dm
      {config(24, 24, 6, 2), 1, 1, 300},      // GQA, a decoder step over many keys
      {config(40, 16, 2, 1, 12), 2, 260, 1},  // MQA, head_dim given, one key, a GEMM block+
  };
  each_path{true}([&](std::string_view) {
    for (const shape_case& sc : cases) {
      const auto mc = make_case<T>(sc.cfg, sc.B, sc.Lq, sc.Lk, 5);
      xattn::multi_head_cross_attention<T> m(mc.cfg, mc.w);
      for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
        tensor<T, 3> out({sc.B, sc.Lq, mc.cfg.model_dim}, T(-7));
        xattn::cross_attention_options<T> o;
        o.kernel = kernel;
        m.forward(mc.query.cview(), mc.context.cview(), out.view(), o);
        EXPECT_TRUE(mc.rule(out.data))
            << "Lq " << sc.Lq << " Lk " << sc.Lk
            << (kernel == xattn::attention_kernel::naive ? " naive" : " tiled");
      }
    }
  });
}

// The module is its projections around the kernel, with the caller's masks and scale: the
// same bits as linear<T> and tiled_attention<T> called by hand; the weights come out in float.
TYPED_TEST(HalfModule, ForwardIsItsProjectionsAroundTheHalfKernelWithMasksAndWeights) {
  using T = TypeParam;
  const auto mc = make_case<T>(config(32, 20, 4, 2), 2, 6, 9, 21);
  const auto& c = mc.cfg;
  xattn::multi_head_cross_attention<T> m(c, mc.w);
  xattn_test::bool_mask pad_allowed({2, 1, 1, 9}, true);
  const bool pad[2 * 9] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0};  // not a suffix
  const auto bias = random_tensor<T, 4>({1, 4, 6, 9}, 3, -2.0, 2.0);
  xattn::cross_attention_options<T> o;
  o.key_padding_mask = xattn::tensor_view<const bool, 2>(pad, {2, 9});
  o.mask.bias = bias.cview();
  o.scale = 0.3;
  tensor<float, 4> wts({2, 4, 6, 9}, -7.0f);
  tensor<float, 3> avg({2, 6, 9}, -7.0f);
  o.weights_out = wts.view();
  o.average_weights_out = avg.view();
  tensor<T, 3> out({2, 6, 32}, T(-7));
  m.forward(mc.query.cview(), mc.context.cview(), out.view(), o);

  // By hand.
  const index_t W = c.num_heads * c.head_dim, Wkv = c.num_kv_heads * c.head_dim;
  tensor<T, 3> q({2, 6, W}), k({2, 9, Wkv}), v({2, 9, Wkv}), heads({2, 6, W}), want({2, 6, 32});
  mc.w.q_proj.forward(mc.query.cview(), q.view());
  mc.w.k_proj.forward(mc.context.cview(), k.view());
  mc.w.v_proj.forward(mc.context.cview(), v.view());
  for (index_t b = 0; b < 2; ++b)
    for (index_t j = 0; j < 9; ++j) pad_allowed.data[std::size_t(b * 9 + j)] = !pad[b * 9 + j];
  xattn::attention_options<T> ao;
  ao.scale = 0.3;
  ao.mask.allowed = pad_allowed.cview();
  ao.mask.bias = bias.cview();
  tensor<float, 4> want_wts({2, 4, 6, 9}, -7.0f);
  ao.weights_out = want_wts.view();
  xattn::tiled_attention<T>(xattn::split_heads(q.cview(), 4), xattn::split_heads(k.cview(), 2),
                            xattn::split_heads(v.cview(), 2), xattn::split_heads(heads.view(), 4),
                            ao);
  mc.w.out_proj.forward(heads.cview(), want.view());
  for (std::size_t n = 0; n < out.data.size(); ++n)
    ASSERT_EQ(bits(out.data[n]), bits(want.data[n]));
  for (std::size_t n = 0; n < wts.data.size(); ++n) ASSERT_EQ(wts.data[n], want_wts.data[n]);
  for (index_t b = 0; b < 2; ++b)
    for (index_t i = 0; i < 6; ++i)
      for (index_t j = 0; j < 9; ++j) {
        float sum = 0;
        for (index_t h = 0; h < 4; ++h) sum += wts.data[std::size_t(((b * 4 + h) * 6 + i) * 9 + j)];
        EXPECT_FLOAT_EQ(avg.data[std::size_t((b * 6 + i) * 9 + j)], sum / 4.0f);
        if (pad[b * 9 + j]) {
          EXPECT_EQ(avg.data[std::size_t((b * 6 + i) * 9 + j)], 0.0f);
        }
      }
}

TYPED_TEST(HalfModule, CacheHoldsTheHalfProjectionsInHalfTheBytesOfFloat) {
  using T = TypeParam;
  const auto mc = make_case<T>(config(24, 16, 4, 2), 2, 3, 11, 31);
  xattn::multi_head_cross_attention<T> m(mc.cfg, mc.w);
  const xattn::context_cache<T> cache = m.encode_context(mc.context.cview());
  EXPECT_EQ(cache.bytes(), 2 * 2 * 11 * 2 * 6 * 2);  // K and V, B·Lk·Hkv·Dk elements of 2 bytes
  tensor<T, 3> k({2, 11, 12});
  mc.w.k_proj.forward(mc.context.cview(), k.view());
  for (index_t b = 0; b < 2; ++b)
    for (index_t j = 0; j < 11; ++j)
      for (index_t e = 0; e < 12; ++e)
        ASSERT_EQ(bits(cache.keys()(b, e / 6, j, e % 6)),
                  bits(k.data[std::size_t((b * 11 + j) * 12 + e)]));
  tensor<T, 3> a({2, 3, 24}, T(-7)), b({2, 3, 24}, T(-7));
  m.forward(mc.query.cview(), cache, a.view());
  m.forward(mc.query.cview(), mc.context.cview(), b.view());
  for (std::size_t n = 0; n < a.data.size(); ++n) ASSERT_EQ(bits(a.data[n]), bits(b.data[n]));
  // Repeated calls of the same shapes allocate nothing more.
  const index_t grown = m.workspace_allocations();
  m.forward(mc.query.cview(), mc.context.cview(), b.view());
  EXPECT_EQ(m.workspace_allocations(), grown);
}

TYPED_TEST(HalfModule, OverlappingOutputIsAShapeErrorAndWritesNothing) {
  using T = TypeParam;
  const auto mc = make_case<T>(config(8, 8, 2, 2), 1, 4, 4, 41);
  xattn::multi_head_cross_attention<T> m(mc.cfg, mc.w);
  tensor<T, 3> query = mc.query;
  const std::vector<T> before = query.data;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { m.forward(query.cview(), mc.context.cview(), query.view()); }, {"out", "query"}));
  for (std::size_t n = 0; n < before.size(); ++n) ASSERT_EQ(bits(query.data[n]), bits(before[n]));
}

// ---- reading half weights -----------------------------------------------------------------------

xattn::safetensors_file from_bytes(const xattn::safetensors_writer& w) {
  return xattn::safetensors_file(w.bytes(), "test");
}

TYPED_TEST(HalfModule, SafetensorsKeepsItsOwnDtypeAndRoundsOthersOnce) {
  using T = TypeParam;
  const bool fp16 = std::is_same_v<T, Eigen::half>;
  const auto own = fp16 ? xattn::safetensors_dtype::f16 : xattn::safetensors_dtype::bf16;
  const int p = fp16 ? 11 : 8;  // significant bits
  // Every bit pattern of the own dtype comes back as it is (NaN payloads included).
  std::vector<float> all;
  for (std::uint32_t u = 0; u < 65536; ++u)
    if (!(Eigen::numext::isnan)(Eigen::numext::bit_cast<T>(std::uint16_t(u))))
      all.push_back(float(Eigen::numext::bit_cast<T>(std::uint16_t(u))));
  // 1 + half an ulp + a tiny bit: correctly rounded up; rounding through float to nearest would
  // first make it the exact tie and then round it down to 1.
  const double above_tie = 1.0 + std::ldexp(1.0, -p) + std::ldexp(1.0, -40);
  const float f32[] = {1.0f + std::ldexp(1.0f, -p), 1.0f + 3.0f * std::ldexp(1.0f, -p), 0.1f};
  xattn::safetensors_writer w;
  w.add("own", {index_t(all.size())}, all.data(), own);
  w.add("f64", {1}, &above_tie, xattn::safetensors_dtype::f64);
  w.add("f32", {3}, f32, xattn::safetensors_dtype::f32);
  const auto f = from_bytes(w);
  const auto got = f.read<T>("own").values;
  ASSERT_EQ(got.size(), all.size());
  for (std::size_t n = 0; n < all.size(); ++n)
    ASSERT_EQ(bits(got[n]), bits(static_cast<T>(all[n]))) << n;
  EXPECT_EQ(float(f.read<T>("f64").values[0]), float(1.0 + std::ldexp(1.0, -p + 1)));
  const auto r = f.read<T>("f32").values;
  EXPECT_EQ(float(r[0]), 1.0f);                             // a tie: to even
  EXPECT_EQ(float(r[1]), 1.0f + std::ldexp(1.0f, -p + 2));  // a tie: to even, upward
  EXPECT_EQ(bits(r[2]), bits(static_cast<T>(0.1f)));        // Eigen's rounding
  // A finite value past the type's range is an error naming it, not an infinity.
  if (fp16) {
    const float big = 70000.0f;
    xattn::safetensors_writer w2;
    w2.add("big", {1}, &big, xattn::safetensors_dtype::f32);
    EXPECT_TRUE(throws_with<xattn::format_error>([&] { (void)from_bytes(w2).read<T>("big"); },
                                                 {"'big'", "element 0", "range"}));
  }
}

TYPED_TEST(HalfModule, CheckpointLayoutsLoadWithoutWideningAndObeyTheRule) {
  using T = TypeParam;
  for (const char* name : {"layout_hf_whisper", "layout_hf_bart", "layout_diffusers_fp16",
                           "layout_openai_whisper", "layout_t5", "layout_torch_decoder_layer"}) {
    SCOPED_TRACE(name);
    const auto f = xattn::safetensors_file::load(std::string(XATTN_TEST_FIXTURES_DIR) + "/" + name +
                                                 ".safetensors");
    const std::string prefix = f.metadata().at("prefix");
    const index_t heads = std::stoll(f.metadata().at("num_heads"));
    const auto m = xattn::load_cross_attention<T>(f, prefix, {heads});
    const auto mf = xattn::load_cross_attention<float>(f, prefix, {heads});
    // Each weight is the file's value rounded once (bit for bit when the file holds T).
    const auto& a = m.weights().out_proj.weight;
    const auto& b = mf.weights().out_proj.weight;
    for (index_t n = 0; n < a.size(); ++n)
      ASSERT_EQ(bits(a.data()[n]), bits(static_cast<T>(b.data()[n])));
    const auto q = f.read<T>("query"), ctx = f.read<T>("context");
    module_case<T> mc{m.config(), m.weights(), tensor<T, 3>({q.shape[0], q.shape[1], q.shape[2]}),
                      tensor<T, 3>({ctx.shape[0], ctx.shape[1], ctx.shape[2]})};
    mc.query.data = q.values;
    mc.context.data = ctx.values;
    auto mm = m;
    tensor<T, 3> out({q.shape[0], q.shape[1], m.config().model_dim}, T(-7));
    mm.forward(mc.query.cview(), mc.context.cview(), out.view());
    EXPECT_TRUE(mc.rule(out.data));
  }
}

// PyTorch's own bf16 run of a Hugging Face Whisper cross-attention layer (every linear, product
// and softmax rounded to bf16; make_fixtures.py --half) as the yardstick of the rule.
TEST(HalfModuleFixtures, AWhisperLayerInBf16AgainstPyTorchsOwnBf16Run) {
  using T = Eigen::bfloat16;
  const auto f = xattn::safetensors_file::load(std::string(XATTN_TEST_FIXTURES_DIR) +
                                               "/half_module_hf_whisper.safetensors");
  const auto m = xattn::load_cross_attention<T>(f, f.metadata().at("prefix"),
                                                {std::stoll(f.metadata().at("num_heads"))});
  const auto q = f.read<T>("query"), ctx = f.read<T>("context"), torch_out = f.read<T>("output");
  module_case<T> mc{m.config(), m.weights(), tensor<T, 3>({q.shape[0], q.shape[1], q.shape[2]}),
                    tensor<T, 3>({ctx.shape[0], ctx.shape[1], ctx.shape[2]})};
  mc.query.data = q.values;
  mc.context.data = ctx.values;
  // The fixture is the layer xattn loads: PyTorch's result is itself within two bf16 epsilons
  // of the largest exact output (0.64 of one here).
  const std::vector<double> exact = mc.exact();
  double largest = 0.0, torch_err = 0.0;
  for (std::size_t n = 0; n < exact.size(); ++n) {
    largest = std::max(largest, std::abs(exact[n]));
    torch_err = std::max(torch_err, std::abs(double(float(torch_out.values[n])) - exact[n]));
  }
  EXPECT_LE(torch_err, 2.0 * eps<T>() * largest);
  EXPECT_GT(largest, 0.1);
  auto mm = m;
  for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
    tensor<T, 3> out({q.shape[0], q.shape[1], m.config().model_dim}, T(-7));
    xattn::cross_attention_options<T> o;
    o.kernel = kernel;
    mm.forward(mc.query.cview(), mc.context.cview(), out.view(), o);
    EXPECT_TRUE(mc.rule_against(out.data, torch_out.values, "PyTorch"))
        << (kernel == xattn::attention_kernel::naive ? "naive" : "tiled");
  }
}

}  // namespace
