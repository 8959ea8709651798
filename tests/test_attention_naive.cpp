// SPDX-License-Identifier: MIT
// naive_attention against hand-computed values, against the long-double quadruple loop in
// test_support.hpp on odd shapes and every mask kind, by the properties softmax attention must
// have, and for every argument error.
#include "xattn/attention_naive.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::all_close;
using xattn_test::random_tensor;
using xattn_test::tensor;
using xattn_test::throws_with;

template <class T>
class NaiveAttention : public ::testing::Test {};
TYPED_TEST_SUITE(NaiveAttention, xattn_test::element_types, );

// The reference kernel under test, in the form problem<T>::run_and_check takes.
template <class T>
struct naive {
  void operator()(xattn::tensor_view<const T, 4> q, xattn::tensor_view<const T, 4> k,
                  xattn::tensor_view<const T, 4> v, xattn::tensor_view<T, 4> out,
                  const xattn::attention_options<T>& opts) const {
    xattn::naive_attention<T>(q, k, v, out, opts);
  }
};

// Random q, k, v for one shape and the check of all three outputs against the reference.
template <class T>
struct problem : xattn_test::problem<T> {
  using xattn_test::problem<T>::problem;
  void run_and_check(const xattn::attention_options<T>& opts = {}) {
    xattn_test::problem<T>::run_and_check(naive<T>{}, opts);
  }
};

using xattn_test::shape;

// ---- hand-computed values ----------------------------------------------------------------------

TYPED_TEST(NaiveAttention, MatchesHandComputedSoftmaxOfTwoKeys) {
  using T = TypeParam;
  // scale 1, q = [1], keys [0] and [ln 3]: scores 0 and ln 3, weights 1/4 and 3/4,
  // values 4 and 8: output 0.25·4 + 0.75·8 = 7, log-sum-exp = ln(1 + 3) = ln 4.
  const T q[] = {1}, k[] = {0, static_cast<T>(std::log(3.0))}, v[] = {4, 8};
  T out[1] = {}, w[2] = {}, lse[1] = {};
  xattn::attention_options<T> opts;
  opts.scale = 1.0;
  opts.weights_out = xattn::make_view(w, {1, 1, 1, 2});
  opts.lse_out = xattn::make_view(lse, {1, 1, 1});
  xattn::naive_attention<T>(xattn::make_view(q, {1, 1, 1, 1}), xattn::make_view(k, {1, 1, 2, 1}),
                            xattn::make_view(v, {1, 1, 2, 1}), xattn::make_view(out, {1, 1, 1, 1}),
                            opts);
  const double eps = 4 * std::numeric_limits<T>::epsilon();
  EXPECT_NEAR(w[0], 0.25, eps);
  EXPECT_NEAR(w[1], 0.75, eps);
  EXPECT_NEAR(out[0], 7.0, 8 * eps);
  EXPECT_NEAR(lse[0], std::log(4.0), eps);
}

TYPED_TEST(NaiveAttention, MatchesHandComputedTwoQueriesThreeKeysDefaultScale) {
  using T = TypeParam;
  // Dk = 4, so the default scale is 1/2. q0 = (2,0,0,0) scores keys (1,0,0,0), (0,1,0,0),
  // (-1,0,0,0) as (1, 0, -1); q1 = 0 scores all three equally.
  const T q[] = {2, 0, 0, 0, 0, 0, 0, 0};
  const T k[] = {1, 0, 0, 0, 0, 1, 0, 0, -1, 0, 0, 0};
  const T v[] = {1, 0, 0, 1, 1, 1};  // Dv = 2, unrelated to Dk
  T out[4] = {};
  xattn::naive_attention<T>(xattn::make_view(q, {1, 1, 2, 4}), xattn::make_view(k, {1, 1, 3, 4}),
                            xattn::make_view(v, {1, 1, 3, 2}), xattn::make_view(out, {1, 1, 2, 2}));
  const double e = std::exp(1.0), z = e + 1 + 1 / e;
  const double eps = 8 * std::numeric_limits<T>::epsilon();
  EXPECT_NEAR(out[0], (e + 1 / e) / z, eps);
  EXPECT_NEAR(out[1], (1 + 1 / e) / z, eps);
  EXPECT_NEAR(out[2], 2.0 / 3.0, eps);
  EXPECT_NEAR(out[3], 2.0 / 3.0, eps);
}

// ---- against the reference on odd shapes -------------------------------------------------------

TYPED_TEST(NaiveAttention, MatchesReferenceOnOddShapes) {
  const xattn::attention_shape shapes[] = {
      shape(1, 1, 5, 9, 4, 4),      // Lq != Lk
      shape(2, 3, 1, 17, 8, 5),     // Lq = 1 (a decoder step), Dk != Dv
      shape(2, 2, 6, 1, 3, 7),      // Lk = 1: every weight is 1
      shape(3, 2, 13, 7, 16, 2),    // Lq > Lk
      shape(1, 4, 9, 33, 5, 6, 2),  // grouped-query: 2 query heads per key/value head
      shape(2, 3, 4, 10, 6, 6, 1),  // multi-query: one key/value head
      shape(1, 1, 64, 100, 64, 64),
  };
  unsigned seed = 10;
  for (const auto& s : shapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << s.batch << " H=" << s.num_heads << " Lq="
                                      << s.q_len << " Lk=" << s.kv_len << " Dk=" << s.head_dim
                                      << " Dv=" << s.value_dim << " Hkv=" << s.kv_heads());
    problem<TypeParam> p(s, seed += 3);
    p.run_and_check();
  }
}

TYPED_TEST(NaiveAttention, UsesTheScaleWhenSet) {
  for (double scale : {0.0, 0.125, 3.0, -1.5}) {
    SCOPED_TRACE(scale);
    problem<TypeParam> p(shape(2, 2, 5, 7, 8, 3), 77);
    xattn::attention_options<TypeParam> opts;
    opts.scale = scale;
    p.run_and_check(opts);
  }
}

TYPED_TEST(NaiveAttention, KeepsLargeScoresFiniteAndExact) {
  // Inputs of up to ±60 with Dk = 16 and scale 1 give scores of order 1e4: exp would overflow
  // without the max subtraction.
  problem<TypeParam> p(shape(1, 2, 6, 11, 16, 4), 5, 60.0);
  xattn::attention_options<TypeParam> opts;
  opts.scale = 1.0;
  p.run_and_check(opts);
  for (auto x : p.out.data) EXPECT_TRUE(std::isfinite(x));
  const auto ref =
      xattn_test::reference_attention<TypeParam>(p.q.view(), p.k.view(), p.v.view(), opts);
  EXPECT_GT(ref.max_abs_score, 5000.0);
}

// ---- masks -------------------------------------------------------------------------------------

TYPED_TEST(NaiveAttention, KeyPaddingMasksKeysPastEachLength) {
  using T = TypeParam;
  problem<T> p(shape(3, 2, 4, 9, 5, 3), 21);
  const index_t lengths[] = {9, 4, 1};
  xattn::attention_options<T> opts;
  opts.mask.kv_lengths = xattn::make_view(lengths, {3});
  p.run_and_check(opts);
  // Padding keys get exactly zero weight.
  for (index_t b = 0; b < 3; ++b)
    for (index_t h = 0; h < 2; ++h)
      for (index_t i = 0; i < 4; ++i)
        for (index_t j = lengths[b]; j < 9; ++j) EXPECT_EQ(p.weights.view()(b, h, i, j), T(0));
}

TYPED_TEST(NaiveAttention, BooleanMaskBroadcastsOverEveryDimension) {
  using T = TypeParam;
  const index_t B = 2, H = 3, Lq = 4, Lk = 6;
  const std::array<index_t, 4> mask_shapes[] = {{1, 1, Lq, Lk}, {B, 1, Lq, Lk}, {1, H, Lq, Lk},
                                                {B, H, Lq, Lk}, {B, 1, 1, Lk},  {1, 1, Lq, 1}};
  unsigned seed = 40;
  for (const auto& ms : mask_shapes) {
    SCOPED_TRACE(::testing::Message() << ms[0] << "x" << ms[1] << "x" << ms[2] << "x" << ms[3]);
    problem<T> p(shape(B, H, Lq, Lk, 4, 5), seed += 3);
    // bool storage: std::vector<bool> has no data(), so use a plain array.
    const auto draws = random_tensor<double, 4>(ms, seed);
    std::unique_ptr<bool[]> allowed(new bool[draws.data.size()]);
    for (std::size_t n = 0; n < draws.data.size(); ++n) allowed[n] = draws.data[n] > -0.4;
    xattn::attention_options<T> opts;
    opts.mask.allowed = xattn::tensor_view<const bool, 4>(allowed.get(), ms);
    p.run_and_check(opts);
  }
}

TYPED_TEST(NaiveAttention, AddsTheBiasAndTreatsMinusInfinityAsMasked) {
  using T = TypeParam;
  problem<T> p(shape(2, 2, 5, 8, 4, 4), 50);
  auto bias = random_tensor<T, 4>({1, 2, 5, 8}, 51, -3.0, 3.0);  // broadcast over batch
  bias.view()(0, 1, 2, 3) = -std::numeric_limits<T>::infinity();
  xattn::attention_options<T> opts;
  opts.mask.bias = bias.cview();
  p.run_and_check(opts);
  EXPECT_EQ(p.weights.view()(0, 1, 2, 3), T(0));
  EXPECT_EQ(p.weights.view()(1, 1, 2, 3), T(0));
}

TYPED_TEST(NaiveAttention, CausalTopLeftAndBottomRightAlignments) {
  using T = TypeParam;
  // Lq < Lk, Lq > Lk and Lq = Lk for each alignment.
  const std::array<index_t, 2> lens[] = {{3, 7}, {7, 3}, {5, 5}};
  for (auto causal : {xattn::causal_mask::top_left, xattn::causal_mask::bottom_right}) {
    for (const auto& l : lens) {
      SCOPED_TRACE(::testing::Message()
                   << "causal " << int(causal) << " Lq=" << l[0] << " Lk=" << l[1]);
      problem<T> p(shape(1, 2, l[0], l[1], 4, 3), 60);
      xattn::attention_options<T> opts;
      opts.mask.causal = causal;
      p.run_and_check(opts);
      const index_t shift = causal == xattn::causal_mask::bottom_right ? l[1] - l[0] : 0;
      for (index_t i = 0; i < l[0]; ++i)
        for (index_t j = 0; j < l[1]; ++j)
          if (j > i + shift) {
            EXPECT_EQ(p.weights.view()(0, 0, i, j), T(0)) << i << "," << j;
          }
    }
  }
}

TYPED_TEST(NaiveAttention, CombinesEveryMaskKind) {
  using T = TypeParam;
  problem<T> p(shape(2, 2, 6, 9, 4, 5), 70);
  const index_t lengths[] = {7, 9};
  const auto draws = random_tensor<double, 4>({1, 1, 6, 9}, 71);
  std::unique_ptr<bool[]> allowed(new bool[draws.data.size()]);
  for (std::size_t n = 0; n < draws.data.size(); ++n) allowed[n] = draws.data[n] > -0.6;
  const auto bias = random_tensor<T, 4>({2, 1, 1, 9}, 72);
  xattn::attention_options<T> opts;
  opts.mask.kv_lengths = xattn::make_view(lengths, {2});
  opts.mask.allowed = xattn::make_view(static_cast<const bool*>(allowed.get()), {1, 1, 6, 9});
  opts.mask.bias = bias.cview();
  opts.mask.causal = xattn::causal_mask::bottom_right;
  p.run_and_check(opts);
}

TYPED_TEST(NaiveAttention, FullyMaskedRowsGiveZerosNotNaN) {
  using T = TypeParam;
  problem<T> p(shape(2, 1, 4, 5, 3, 2), 80);
  // Batch item 1 has no keys (padding length 0); in item 0, row 2 has a bias of -inf on every key.
  const index_t lengths[] = {5, 0};
  auto bias = tensor<T, 4>({2, 1, 4, 5});
  for (index_t j = 0; j < 5; ++j) bias.view()(0, 0, 2, j) = -std::numeric_limits<T>::infinity();
  xattn::attention_options<T> opts;
  opts.mask.kv_lengths = xattn::make_view(lengths, {2});
  opts.mask.bias = bias.cview();
  p.run_and_check(opts);
  auto out = p.out.view();
  for (index_t e = 0; e < 2; ++e) {
    EXPECT_EQ(out(0, 0, 2, e), T(0));
    for (index_t i = 0; i < 4; ++i) EXPECT_EQ(out(1, 0, i, e), T(0));
  }
  EXPECT_EQ(p.lse.view()(0, 0, 2), -std::numeric_limits<T>::infinity());
  for (auto x : p.out.data) EXPECT_FALSE(std::isnan(x));
}

TYPED_TEST(NaiveAttention, CausalBottomRightWithMoreQueriesThanKeysMasksLeadingRows) {
  using T = TypeParam;
  // Lq = 6, Lk = 3: query i sees keys j <= i - 3, so rows 0..2 see nothing and are zero.
  problem<T> p(shape(1, 1, 6, 3, 2, 2), 90);
  xattn::attention_options<T> opts;
  opts.mask.causal = xattn::causal_mask::bottom_right;
  p.run_and_check(opts);
  for (index_t i = 0; i < 3; ++i)
    for (index_t e = 0; e < 2; ++e) EXPECT_EQ(p.out.view()(0, 0, i, e), T(0));
  EXPECT_NE(p.out.view()(0, 0, 3, 0), T(0));
}

// ---- properties --------------------------------------------------------------------------------

TYPED_TEST(NaiveAttention, WeightRowsSumToOne) {
  using T = TypeParam;
  problem<T> p(shape(2, 3, 7, 19, 8, 8), 100);
  p.run_and_check();
  const auto w = p.weights.view();
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 3; ++h)
      for (index_t i = 0; i < 7; ++i) {
        double sum = 0;
        for (index_t j = 0; j < 19; ++j) sum += double(w(b, h, i, j));
        EXPECT_NEAR(sum, 1.0, 19 * std::numeric_limits<T>::epsilon());
      }
}

TYPED_TEST(NaiveAttention, PermutingKeysAndValuesTogetherChangesNothing) {
  using T = TypeParam;
  problem<T> p(shape(1, 2, 5, 12, 6, 4), 110);
  p.run_and_check();
  // Reverse the key order in k and v (a permutation), then compare outputs.
  problem<T> r = p;
  for (index_t h = 0; h < 2; ++h)
    for (index_t j = 0; j < 12; ++j) {
      for (index_t d = 0; d < 6; ++d) r.k.view()(0, h, j, d) = p.k.view()(0, h, 11 - j, d);
      for (index_t d = 0; d < 4; ++d) r.v.view()(0, h, j, d) = p.v.view()(0, h, 11 - j, d);
    }
  xattn::naive_attention<T>(r.q.view(), r.k.view(), r.v.view(), r.out.view());
  EXPECT_TRUE(all_close(r.out.data, p.out.data, xattn_test::attention_tol<T>(6, 12, 3.0)));
}

TYPED_TEST(NaiveAttention, AConstantShiftOfAllScoresChangesNothing) {
  using T = TypeParam;
  problem<T> p(shape(1, 1, 4, 10, 5, 3), 120);
  p.run_and_check();
  const std::vector<T> plain = p.out.data;
  tensor<T, 4> shift({1, 1, 1, 1}, T(250));  // broadcast to every score
  xattn::attention_options<T> opts;
  opts.mask.bias = shift.cview();
  p.run_and_check(opts);
  EXPECT_TRUE(all_close(p.out.data, plain, xattn_test::attention_tol<T>(5, 10, 260.0)));
}

TYPED_TEST(NaiveAttention, MaskedKeysDoNotInfluenceTheOutput) {
  using T = TypeParam;
  problem<T> p(shape(1, 1, 3, 8, 4, 4), 130);
  const index_t len[] = {5};
  xattn::attention_options<T> opts;
  opts.mask.kv_lengths = xattn::make_view(len, {1});
  xattn::naive_attention<T>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), opts);
  const std::vector<T> before = p.out.data;
  for (index_t j = 5; j < 8; ++j)
    for (index_t d = 0; d < 4; ++d) {
      p.k.view()(0, 0, j, d) = T(1e3);
      p.v.view()(0, 0, j, d) = T(-1e3);
    }
  xattn::naive_attention<T>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), opts);
  EXPECT_EQ(p.out.data, before);
}

// ---- layouts -----------------------------------------------------------------------------------

TYPED_TEST(NaiveAttention, ReadsHeadsInPlaceFromAProjectionLayout) {
  using T = TypeParam;
  // Q, K, V as a projection leaves them: [B, L, H*D]; out written into [B, Lq, H*Dv].
  const index_t B = 2, H = 3, Lq = 5, Lk = 7, Dk = 4, Dv = 6;
  const auto qb = random_tensor<T, 3>({B, Lq, H * Dk}, 140);
  const auto kb = random_tensor<T, 3>({B, Lk, H * Dk}, 141);
  const auto vb = random_tensor<T, 3>({B, Lk, H * Dv}, 142);
  tensor<T, 3> ob({B, Lq, H * Dv});
  const auto q = xattn::split_heads(qb.cview(), H), k = xattn::split_heads(kb.cview(), H),
             v = xattn::split_heads(vb.cview(), H);
  xattn::naive_attention<T>(q, k, v, xattn::split_heads(ob.view(), H));
  const auto want = xattn_test::reference_attention<T>(q, k, v);
  EXPECT_TRUE(all_close(xattn_test::elements(xattn::split_heads(ob.cview(), H)), want.out,
                        xattn_test::attention_tol<T>(Dk, Lk, want.max_abs_score)));
}

TYPED_TEST(NaiveAttention, ReadsAndWritesViewsWithNonUnitInnerStrides) {
  using T = TypeParam;
  // Every view here has its last dimension strided (D-major storage), so the kernel takes its
  // copy path for inputs and its scatter path for the output and the weights.
  const index_t B = 1, H = 2, Lq = 4, Lk = 6, Dk = 3, Dv = 5;
  const auto qs = random_tensor<T, 4>({B, H, Dk, Lq}, 150);
  const auto ks = random_tensor<T, 4>({B, H, Dk, Lk}, 151);
  const auto vs = random_tensor<T, 4>({B, H, Dv, Lk}, 152);
  tensor<T, 4> os({B, H, Dv, Lq}), ws({B, H, Lk, Lq});
  const auto q = xattn::permute(qs.cview(), {0, 1, 3, 2});
  const auto k = xattn::permute(ks.cview(), {0, 1, 3, 2});
  const auto v = xattn::permute(vs.cview(), {0, 1, 3, 2});
  xattn::attention_options<T> opts;
  opts.weights_out = xattn::permute(ws.view(), {0, 1, 3, 2});
  xattn::naive_attention<T>(q, k, v, xattn::permute(os.view(), {0, 1, 3, 2}), opts);
  const auto want = xattn_test::reference_attention<T>(q, k, v);
  const double tol = xattn_test::attention_tol<T>(Dk, Lk, want.max_abs_score);
  EXPECT_TRUE(
      all_close(xattn_test::elements(xattn::permute(os.cview(), {0, 1, 3, 2})), want.out, tol));
  EXPECT_TRUE(
      all_close(xattn_test::elements(xattn::permute(ws.cview(), {0, 1, 3, 2})), want.weights, tol));
}

// ---- empty extents -----------------------------------------------------------------------------

TYPED_TEST(NaiveAttention, NoQueriesIsANoOp) {
  problem<TypeParam> p(shape(2, 2, 0, 5, 3, 3), 160);
  p.run_and_check();
  EXPECT_TRUE(p.out.data.empty());
}

TYPED_TEST(NaiveAttention, NoKeysGivesZeros) {
  using T = TypeParam;
  problem<T> p(shape(2, 2, 3, 0, 3, 4), 170);
  p.run_and_check();
  for (auto x : p.out.data) EXPECT_EQ(x, T(0));
  for (auto x : p.lse.data) EXPECT_EQ(x, -std::numeric_limits<T>::infinity());
}

// ---- argument errors ---------------------------------------------------------------------------

class NaiveAttentionErrors : public ::testing::Test {
 protected:
  // A valid call: B = 2, H = 4, Lq = 3, Lk = 5, Dk = 6, Dv = 7, Hkv = 2.
  problem<float> p{shape(2, 4, 3, 5, 6, 7, 2)};

  template <class E = xattn::shape_error>
  ::testing::AssertionResult fails(const xattn::tensor_view<const float, 4>& q,
                                   const xattn::tensor_view<const float, 4>& k,
                                   const xattn::tensor_view<const float, 4>& v,
                                   const xattn::tensor_view<float, 4>& out,
                                   const xattn::attention_options<float>& opts,
                                   std::initializer_list<const char*> fragments) {
    const std::vector<float> before = p.out.data;
    auto result =
        throws_with<E>([&] { xattn::naive_attention<float>(q, k, v, out, opts); }, fragments);
    if (result && p.out.data != before) return ::testing::AssertionFailure() << "out was written";
    return result;
  }
  template <class E = xattn::shape_error>
  ::testing::AssertionResult fails(const xattn::attention_options<float>& opts,
                                   std::initializer_list<const char*> fragments) {
    return fails<E>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), opts, fragments);
  }
};

TEST_F(NaiveAttentionErrors, NamesTheMismatchedExtent) {
  const auto kv = [](float* d, index_t b, index_t h, index_t l, index_t w) {
    return xattn::make_view(static_cast<const float*>(d), {b, h, l, w});
  };
  std::vector<float> buf(4096);
  float* d = buf.data();
  const auto q = p.q.view(), k = p.k.view(), v = p.v.view();
  const auto out = p.out.view();
  EXPECT_TRUE(
      fails(q, kv(d, 3, 2, 5, 6), v, out, {}, {"naive_attention: k.extent(0) is 3, expected 2"}));
  EXPECT_TRUE(fails(q, kv(d, 2, 3, 5, 6), kv(d, 2, 3, 5, 7), out, {},
                    {"naive_attention: k.extent(1) is 3, expected a divisor of q.extent(1) = 4"}));
  EXPECT_TRUE(
      fails(q, kv(d, 2, 2, 5, 8), v, out, {}, {"naive_attention: k.extent(3) is 8, expected 6"}));
  EXPECT_TRUE(
      fails(q, k, kv(d, 1, 2, 5, 7), out, {}, {"naive_attention: v.extent(0) is 1, expected 2"}));
  EXPECT_TRUE(
      fails(q, k, kv(d, 2, 4, 5, 7), out, {}, {"naive_attention: v.extent(1) is 4, expected 2"}));
  EXPECT_TRUE(
      fails(q, k, kv(d, 2, 2, 9, 7), out, {}, {"naive_attention: v.extent(2) is 9, expected 5"}));
  const auto o = [&](index_t b, index_t h, index_t l, index_t w) {
    return xattn::make_view(d, {b, h, l, w});
  };
  EXPECT_TRUE(
      fails(q, k, v, o(1, 4, 3, 7), {}, {"naive_attention: out.extent(0) is 1, expected 2"}));
  EXPECT_TRUE(
      fails(q, k, v, o(2, 2, 3, 7), {}, {"naive_attention: out.extent(1) is 2, expected 4"}));
  EXPECT_TRUE(
      fails(q, k, v, o(2, 4, 4, 7), {}, {"naive_attention: out.extent(2) is 4, expected 3"}));
  EXPECT_TRUE(
      fails(q, k, v, o(2, 4, 3, 6), {}, {"naive_attention: out.extent(3) is 6, expected 7"}));
}

TEST_F(NaiveAttentionErrors, NamesTheBadOption) {
  xattn::attention_options<float> opts;
  opts.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(
      fails<xattn::value_error>(opts, {"naive_attention: scale is nan, expected a finite number"}));

  const index_t three[] = {5, 5, 5}, bad[] = {5, 6};
  opts = {};
  opts.mask.kv_lengths = xattn::make_view(three, {3});
  EXPECT_TRUE(fails(opts, {"naive_attention: mask.kv_lengths.extent(0) is 3, expected 2"}));
  opts.mask.kv_lengths = xattn::make_view(bad, {2});
  EXPECT_TRUE(fails<xattn::value_error>(
      opts, {"naive_attention: mask.kv_lengths(1) is 6, expected a value in [0, 5]"}));

  bool allowed[64] = {};
  opts = {};
  opts.mask.allowed = xattn::make_view(static_cast<const bool*>(allowed), {1, 3, 3, 5});
  EXPECT_TRUE(fails(opts, {"naive_attention: mask.allowed.extent(1) is 3, expected 1 or 4"}));
  float bias[64] = {};
  opts = {};
  opts.mask.bias = xattn::make_view(static_cast<const float*>(bias), {2, 1, 3, 4});
  EXPECT_TRUE(fails(opts, {"naive_attention: mask.bias.extent(3) is 4, expected 1 or 5"}));

  float w[256] = {};
  opts = {};
  opts.weights_out = xattn::make_view(w, {2, 4, 3, 6});
  EXPECT_TRUE(fails(opts, {"naive_attention: weights_out.extent(3) is 6, expected 5"}));
  opts = {};
  opts.lse_out = xattn::make_view(w, {2, 4, 2});
  EXPECT_TRUE(fails(opts, {"naive_attention: lse_out.extent(2) is 2, expected 3"}));
}

TEST(NaiveAttentionScratch, CountsOneScoreMatrixAndRejectsOverflow) {
  xattn::attention_shape s = shape(4, 8, 100, 300, 64, 64);
  EXPECT_EQ(xattn::naive_attention_scratch_bytes<float>(s), 100 * 300 * 4);
  EXPECT_EQ(xattn::naive_attention_scratch_bytes<double>(s), 100 * 300 * 8);
  s.q_len = s.kv_len = index_t(1) << 40;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { (void)xattn::naive_attention_scratch_bytes<float>(s); }, {"overflows"}));
}

}  // namespace
