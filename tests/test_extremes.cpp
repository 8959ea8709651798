// SPDX-License-Identifier: MIT
// Extreme and non-finite values, and empty extents, for naive_attention and tiled_attention
// (several tile shapes, 1 to 4 threads): huge scores, rows of identical scores, -inf and +inf
// biases, NaN and Inf inputs (the policy in options.hpp), subnormal numbers, and zero sizes.
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"

#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::all_close;
using xattn_test::random_tensor;
using xattn_test::tensor;

template <class T>
class Extremes : public ::testing::Test {};
TYPED_TEST_SUITE(Extremes, xattn_test::element_types, );

template <class T>
constexpr T inf = std::numeric_limits<T>::infinity();
template <class T>
constexpr T nan = std::numeric_limits<T>::quiet_NaN();

// What a kernel wrote: output [B, H, Lq, Dv], weights [B, H, Lq, Lk], log-sum-exp [B, H, Lq].
template <class T>
struct outputs {
  tensor<T, 4> out, weights;
  tensor<T, 3> lse;
};

// Runs kernel k on q, k, v with opts, asking for every output (prefilled with a sentinel).
template <class T>
outputs<T> run(const xattn_test::kernel<T>& kern, const tensor<T, 4>& q, const tensor<T, 4>& k,
               const tensor<T, 4>& v, xattn::attention_options<T> opts = {}) {
  const index_t B = q.extents[0], H = q.extents[1], Lq = q.extents[2], Lk = k.extents[2];
  const index_t Dv = v.extents[3];
  outputs<T> r{tensor<T, 4>({B, H, Lq, Dv}, T(-7)), tensor<T, 4>({B, H, Lq, Lk}, T(-7)),
               tensor<T, 3>({B, H, Lq}, T(-7))};
  opts.weights_out = r.weights.view();
  opts.lse_out = r.lse.view();
  kern.run(q.cview(), k.cview(), v.cview(), r.out.view(), opts);
  return r;
}

// Checks all three outputs against the long-double reference with the usual tolerance.
template <class T>
void expect_matches_reference(const outputs<T>& got, const tensor<T, 4>& q, const tensor<T, 4>& k,
                              const tensor<T, 4>& v, const xattn::attention_options<T>& opts) {
  const auto want = xattn_test::reference_attention<T>(q.cview(), k.cview(), v.cview(), opts);
  const double tol = xattn_test::attention_tol<T>(q.extents[3], k.extents[2], want.max_abs_score);
  EXPECT_TRUE(all_close(got.out.data, want.out, tol)) << "output";
  EXPECT_TRUE(all_close(got.weights.data, want.weights, tol)) << "weights";
  EXPECT_TRUE(all_close(got.lse.data, want.lse, tol)) << "log-sum-exp";
}

template <class T>
bool all_finite(const std::vector<T>& xs) {
  for (T x : xs)
    if (!std::isfinite(x)) return false;
  return true;
}

// ---- large scores ------------------------------------------------------------------------------

TYPED_TEST(Extremes, ScoresOfOrder1e4MatchTheReference) {
  using T = TypeParam;
  // Large inputs (±60, scale 1) and a large scale (1e4, inputs in [-1, 1]).
  const auto q1 = random_tensor<T, 4>({2, 2, 5, 16}, 1, -60, 60);
  const auto k1 = random_tensor<T, 4>({2, 2, 9, 16}, 2, -60, 60);
  const auto q2 = random_tensor<T, 4>({2, 2, 5, 16}, 3), k2 = random_tensor<T, 4>({2, 2, 9, 16}, 4);
  const auto v = random_tensor<T, 4>({2, 2, 9, 3}, 5);
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.scale = 1.0;
    const auto a = run(kern, q1, k1, v, opts);
    EXPECT_TRUE(all_finite(a.out.data));
    expect_matches_reference(a, q1, k1, v, opts);
    opts.scale = 1e4;
    const auto b = run(kern, q2, k2, v, opts);
    EXPECT_TRUE(all_finite(b.out.data));
    expect_matches_reference(b, q2, k2, v, opts);
  }
}

TYPED_TEST(Extremes, HugeScoresPickTheBestKeyExactly) {
  using T = TypeParam;
  // Query 0 is +a·e0, query 1 is -a·e0, query 2 is 0; key j is a·c_j·e0 with distinct c_j in
  // (-1, 1), exact in binary. Scores are ±scale·a²·c_j: of magnitude up to 1e30, with gaps so
  // large that all the weight goes to one key, whose value row is then the output, bit for bit.
  // Query 2 scores every key 0: uniform weights.
  const index_t Lk = 11, Dv = 3;
  const double settings[][2] = {{1, 1e4}, {1, 1e6}, {1, 1e15}, {1, 1e30}, {1e15, 1}, {1e7, 1e16}};
  const auto v = random_tensor<T, 4>({1, 1, Lk, Dv}, 7);
  for (const auto& [a, scale] : settings) {
    tensor<T, 4> q({1, 1, 3, 2}), k({1, 1, Lk, 2});
    q.view()(0, 0, 0, 0) = T(a);
    q.view()(0, 0, 1, 0) = T(-a);
    const index_t best_up = 4, best_down = 9;  // keys with the largest and the smallest c_j
    for (index_t j = 0; j < Lk; ++j) {
      const double c = j == best_up ? 0.75 : j == best_down ? -0.75 : (double(j) - 5.0) / 16.0;
      k.view()(0, 0, j, 0) = T(a * c);
    }
    for (const auto& kern : xattn_test::all_kernels<T>()) {
      SCOPED_TRACE(::testing::Message() << kern.name << " a=" << a << " scale=" << scale);
      xattn::attention_options<T> opts;
      opts.scale = scale;
      const auto r = run(kern, q, k, v, opts);
      for (index_t e = 0; e < Dv; ++e) {
        EXPECT_EQ(r.out.view()(0, 0, 0, e), v.view()(0, 0, best_up, e));
        EXPECT_EQ(r.out.view()(0, 0, 1, e), v.view()(0, 0, best_down, e));
      }
      for (index_t j = 0; j < Lk; ++j) {
        EXPECT_EQ(r.weights.view()(0, 0, 0, j), T(j == best_up ? 1 : 0));
        EXPECT_EQ(r.weights.view()(0, 0, 1, j), T(j == best_down ? 1 : 0));
        EXPECT_EQ(r.weights.view()(0, 0, 2, j), T(1) / T(Lk));
      }
      const double top = scale * a * a * 0.75;
      EXPECT_NEAR(double(r.lse.view()(0, 0, 0)), top, 8 * std::numeric_limits<T>::epsilon() * top);
      EXPECT_NEAR(double(r.lse.view()(0, 0, 1)), top, 8 * std::numeric_limits<T>::epsilon() * top);
      EXPECT_TRUE(all_finite(r.out.data));
    }
  }
}

// ---- identical scores --------------------------------------------------------------------------

TYPED_TEST(Extremes, IdenticalScoresGiveExactlyUniformWeights) {
  using T = TypeParam;
  // Every key is the same vector, so each row's scores are identical, whatever the scale (up to
  // 1e30): each visible key weighs exactly 1/n and the output is the mean of the visible values.
  const index_t B = 2, H = 2, Lq = 4, Lk = 7, Dk = 5, Dv = 3;
  // Quarters of small integers: every dot product is exact, so the scores of a row are equal
  // bit for bit however a kernel orders its sums.
  auto q = random_tensor<T, 4>({B, H, Lq, Dk}, 11, -3, 3);
  for (T& x : q.data) x = std::round(x) / 4;
  const auto one_key = random_tensor<T, 4>({1, 1, 1, Dk}, 12, -3, 3);
  tensor<T, 4> k({B, H, Lk, Dk});
  for (std::size_t n = 0; n < k.data.size(); ++n)
    k.data[n] = std::round(one_key.data[n % std::size_t(Dk)]) / 4;
  const auto v = random_tensor<T, 4>({B, H, Lk, Dv}, 13);
  const index_t lengths[] = {7, 3};
  for (double scale : {1.0, 1e4, 1e30}) {
    for (const auto& kern : xattn_test::all_kernels<T>()) {
      SCOPED_TRACE(::testing::Message() << kern.name << " scale=" << scale);
      xattn::attention_options<T> opts;
      opts.scale = scale;
      opts.mask.kv_lengths = xattn::make_view(lengths, {B});
      const auto r = run(kern, q, k, v, opts);
      for (index_t b = 0; b < B; ++b)
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < Lq; ++i) {
            for (index_t j = 0; j < Lk; ++j)
              EXPECT_EQ(r.weights.view()(b, h, i, j), j < lengths[b] ? T(1) / T(lengths[b]) : T(0));
            for (index_t e = 0; e < Dv; ++e) {
              double mean = 0;
              for (index_t j = 0; j < lengths[b]; ++j) mean += double(v.view()(b, h, j, e));
              mean /= double(lengths[b]);
              EXPECT_NEAR(double(r.out.view()(b, h, i, e)), mean,
                          8 * std::numeric_limits<T>::epsilon());
            }
          }
    }
  }
}

// ---- infinite biases ---------------------------------------------------------------------------

TYPED_TEST(Extremes, MinusInfinityBiasMasksKeys) {
  using T = TypeParam;
  // Row 0: -inf everywhere but key 2 (all weight on key 2, output = v row 2 exactly).
  // Row 1: -inf everywhere (zeros, log-sum-exp -inf). Rows 2, 3: -inf on a scattering of keys.
  const index_t Lq = 4, Lk = 9;
  const auto q = random_tensor<T, 4>({2, 1, Lq, 4}, 21), k = random_tensor<T, 4>({2, 1, Lk, 4}, 22);
  const auto v = random_tensor<T, 4>({2, 1, Lk, 5}, 23);
  auto bias = random_tensor<T, 4>({1, 1, Lq, Lk}, 24, -2.0, 2.0);
  for (index_t j = 0; j < Lk; ++j) {
    if (j != 2) bias.view()(0, 0, 0, j) = -inf<T>;
    bias.view()(0, 0, 1, j) = -inf<T>;
    if (j % 3 == 1) bias.view()(0, 0, 2, j) = bias.view()(0, 0, 3, Lk - 1 - j) = -inf<T>;
  }
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.mask.bias = bias.cview();
    const auto r = run(kern, q, k, v, opts);
    expect_matches_reference(r, q, k, v, opts);
    for (index_t b = 0; b < 2; ++b) {
      for (index_t e = 0; e < 5; ++e) {
        EXPECT_EQ(r.out.view()(b, 0, 0, e), v.view()(b, 0, 2, e));
        EXPECT_EQ(r.out.view()(b, 0, 1, e), T(0));
      }
      EXPECT_EQ(r.lse.view()(b, 0, 1), -inf<T>);
      for (index_t j = 0; j < Lk; ++j) {
        if (j % 3 == 1) {
          EXPECT_EQ(r.weights.view()(b, 0, 2, j), T(0));
        }
        EXPECT_EQ(r.weights.view()(b, 0, 1, j), T(0));
      }
    }
  }
}

TYPED_TEST(Extremes, MinusInfinityInAKeyMasksIt) {
  using T = TypeParam;
  // A key of (-inf, 0, 0) scores -inf against queries with a positive first component.
  auto q = random_tensor<T, 4>({1, 1, 3, 3}, 31, 0.5, 1.0);
  auto k = random_tensor<T, 4>({1, 1, 6, 3}, 32);
  const auto v = random_tensor<T, 4>({1, 1, 6, 2}, 33);
  k.view()(0, 0, 4, 0) = -inf<T>;
  k.view()(0, 0, 4, 1) = k.view()(0, 0, 4, 2) = T(0);
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    const auto r = run(kern, q, k, v);
    for (index_t i = 0; i < 3; ++i) EXPECT_EQ(r.weights.view()(0, 0, i, 4), T(0));
    EXPECT_TRUE(all_finite(r.out.data));
    expect_matches_reference(r, q, k, v, {});
  }
}

// ---- NaN and Inf (the policy in options.hpp) ---------------------------------------------------

// Expects row (b, h, i) of r entirely NaN: output, weights and log-sum-exp.
template <class T>
void expect_nan_row(const outputs<T>& r, index_t b, index_t h, index_t i) {
  for (index_t e = 0; e < r.out.extents[3]; ++e) EXPECT_TRUE(std::isnan(r.out.view()(b, h, i, e)));
  for (index_t j = 0; j < r.weights.extents[3]; ++j)
    EXPECT_TRUE(std::isnan(r.weights.view()(b, h, i, j)));
  EXPECT_TRUE(std::isnan(r.lse.view()(b, h, i)));
}

// Expects row (b, h, i) of got equal to that of want within tol (output and log-sum-exp).
template <class T>
void expect_same_row(const outputs<T>& got, const outputs<T>& want, index_t b, index_t h, index_t i,
                     double tol) {
  for (index_t e = 0; e < got.out.extents[3]; ++e)
    EXPECT_NEAR(double(got.out.view()(b, h, i, e)), double(want.out.view()(b, h, i, e)), tol)
        << b << "," << h << "," << i << "," << e;
  EXPECT_NEAR(double(got.lse.view()(b, h, i)), double(want.lse.view()(b, h, i)), tol);
}

TYPED_TEST(Extremes, NaNInAQueryMakesOnlyItsRowNaN) {
  using T = TypeParam;
  const auto q = random_tensor<T, 4>({2, 2, 4, 5}, 41), k = random_tensor<T, 4>({2, 2, 6, 5}, 42);
  const auto v = random_tensor<T, 4>({2, 2, 6, 3}, 43);
  auto bad = q;
  bad.view()(1, 0, 2, 3) = nan<T>;
  const double tol = xattn_test::attention_tol<T>(5, 6, 3.0);
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    const auto clean = run(kern, q, k, v), r = run(kern, bad, k, v);
    for (index_t b = 0; b < 2; ++b)
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < 4; ++i)
          if (b == 1 && h == 0 && i == 2)
            expect_nan_row(r, b, h, i);
          else
            expect_same_row(r, clean, b, h, i, tol);
  }
}

TYPED_TEST(Extremes, NaNInAKeyMakesTheRowsThatSeeItNaN) {
  using T = TypeParam;
  // Causal (top-left): key 2 is seen by queries 2 and up only. Hkv = 1, so both heads read it.
  const auto q = random_tensor<T, 4>({2, 2, 5, 4}, 51), k = random_tensor<T, 4>({2, 1, 5, 4}, 52);
  const auto v = random_tensor<T, 4>({2, 1, 5, 3}, 53);
  auto bad = k;
  bad.view()(0, 0, 2, 1) = nan<T>;
  const double tol = xattn_test::attention_tol<T>(4, 5, 2.0);
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.mask.causal = xattn::causal_mask::top_left;
    const auto clean = run(kern, q, k, v, opts), r = run(kern, q, bad, v, opts);
    for (index_t b = 0; b < 2; ++b)
      for (index_t h = 0; h < 2; ++h)
        for (index_t i = 0; i < 5; ++i)
          if (b == 0 && i >= 2)
            expect_nan_row(r, b, h, i);
          else
            expect_same_row(r, clean, b, h, i, tol);
  }
}

TYPED_TEST(Extremes, PlusInfinityScoreMakesItsRowNaN) {
  using T = TypeParam;
  // A +inf bias, and a score that overflows the element type (2·sqrt(max) squared).
  const auto q = random_tensor<T, 4>({1, 1, 4, 1}, 61), k = random_tensor<T, 4>({1, 1, 6, 1}, 62);
  const auto v = random_tensor<T, 4>({1, 1, 6, 2}, 63);
  tensor<T, 4> bias({1, 1, 4, 6});
  bias.view()(0, 0, 1, 3) = inf<T>;
  auto big_q = q, big_k = k;
  big_q.view()(0, 0, 3, 0) = big_k.view()(0, 0, 5, 0) =
      2 * std::sqrt(std::numeric_limits<T>::max());
  const double tol = xattn_test::attention_tol<T>(1, 6, 2.0);
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.scale = 1.0;
    const auto clean = run(kern, q, k, v, opts);
    const auto overflow = run(kern, big_q, big_k, v, opts);
    expect_nan_row(overflow, 0, 0, 3);
    opts.mask.bias = bias.cview();
    const auto r = run(kern, q, k, v, opts);
    for (index_t i = 0; i < 4; ++i)
      if (i == 1)
        expect_nan_row(r, 0, 0, i);
      else
        expect_same_row(r, clean, 0, 0, i, tol);
  }
}

TYPED_TEST(Extremes, NaNOrInfInAValueReachesItsOutputColumn) {
  using T = TypeParam;
  const auto q = random_tensor<T, 4>({1, 2, 4, 3}, 71), k = random_tensor<T, 4>({1, 2, 6, 3}, 72);
  const auto v = random_tensor<T, 4>({1, 2, 6, 4}, 73);
  const double tol = xattn_test::attention_tol<T>(3, 6, 2.0);
  for (T poison : {nan<T>, inf<T>}) {
    auto bad = v;
    bad.view()(0, 1, 3, 2) = poison;
    for (const auto& kern : xattn_test::all_kernels<T>()) {
      SCOPED_TRACE(::testing::Message() << kern.name << " value " << poison);
      const auto clean = run(kern, q, k, v), r = run(kern, q, k, bad);
      for (index_t i = 0; i < 4; ++i)
        for (index_t e = 0; e < 4; ++e) {
          EXPECT_NEAR(double(r.out.view()(0, 0, i, e)), double(clean.out.view()(0, 0, i, e)), tol);
          const T got = r.out.view()(0, 1, i, e);
          if (e == 2) {
            EXPECT_TRUE(std::isnan(poison) ? std::isnan(got) : got == poison) << got;
          } else {
            EXPECT_NEAR(double(got), double(clean.out.view()(0, 1, i, e)), tol);
          }
        }
      EXPECT_TRUE(all_finite(r.weights.data));
      EXPECT_TRUE(all_finite(r.lse.data));
    }
  }
}

TYPED_TEST(Extremes, PaddingIsNeverRead) {
  using T = TypeParam;
  // Keys past kv_lengths(b) hold NaN and Inf in k and v: the results are those of clean inputs.
  const index_t lengths[] = {3, 6, 0};
  const auto q = random_tensor<T, 4>({3, 2, 5, 4}, 81);
  const auto k = random_tensor<T, 4>({3, 1, 6, 4}, 82), v = random_tensor<T, 4>({3, 1, 6, 3}, 83);
  auto bad_k = k, bad_v = v;
  for (index_t b = 0; b < 3; ++b)
    for (index_t j = lengths[b]; j < 6; ++j) {
      for (index_t d = 0; d < 4; ++d) bad_k.view()(b, 0, j, d) = j % 2 ? nan<T> : inf<T>;
      for (index_t e = 0; e < 3; ++e) bad_v.view()(b, 0, j, e) = j % 2 ? -inf<T> : nan<T>;
    }
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.mask.kv_lengths = xattn::make_view(lengths, {3});
    const auto r = run(kern, q, bad_k, bad_v, opts);
    EXPECT_TRUE(all_finite(r.out.data));
    EXPECT_TRUE(all_finite(r.weights.data));
    expect_matches_reference(r, q, k, v, opts);
  }
}

// ---- subnormal numbers -------------------------------------------------------------------------

TYPED_TEST(Extremes, SubnormalInputsAndScaleGiveFiniteExactResults) {
  using T = TypeParam;
  const T tiny = std::numeric_limits<T>::denorm_min() * T(64);
  ASSERT_GT(tiny, T(0));
  ASSERT_LT(tiny, std::numeric_limits<T>::min());  // subnormal
  const auto q = random_tensor<T, 4>({1, 2, 3, 4}, 91), k = random_tensor<T, 4>({1, 2, 7, 4}, 92);
  auto v = random_tensor<T, 4>({1, 2, 7, 3}, 93);
  auto tq = q, tk = k, tv = v;
  for (auto* t : {&tq, &tk, &tv})
    for (T& x : t->data) x *= tiny;  // subnormal inputs: scores underflow to 0
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    const auto r = run(kern, tq, tk, tv);
    EXPECT_TRUE(all_finite(r.out.data));
    expect_matches_reference(r, tq, tk, tv, {});
    for (T w : r.weights.data) EXPECT_EQ(w, T(1) / T(7));  // every score rounds to 0
    // A subnormal scale on ordinary inputs.
    xattn::attention_options<T> opts;
    opts.scale = double(std::numeric_limits<T>::denorm_min());
    const auto s = run(kern, q, k, v, opts);
    expect_matches_reference(s, q, k, v, opts);
  }
}

TYPED_TEST(Extremes, WeightsThatUnderflowBecomeZero) {
  using T = TypeParam;
  // Score gaps of 100 to 800: exp of the gap is subnormal or 0 in T. Such keys weigh 0 (or a
  // subnormal amount), never NaN, and the results match the reference.
  const auto q = random_tensor<T, 4>({1, 1, 3, 2}, 101), k = random_tensor<T, 4>({1, 1, 8, 2}, 102);
  const auto v = random_tensor<T, 4>({1, 1, 8, 2}, 103);
  tensor<T, 4> bias({1, 1, 1, 8});
  for (index_t j = 0; j < 8; ++j) bias.view()(0, 0, 0, j) = T(-100.0 * double(j));
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.mask.bias = bias.cview();
    const auto r = run(kern, q, k, v, opts);
    EXPECT_TRUE(all_finite(r.weights.data));
    expect_matches_reference(r, q, k, v, opts);
  }
}

// ---- empty extents -----------------------------------------------------------------------------

TYPED_TEST(Extremes, EmptyExtentsGiveEmptyOrZeroResults) {
  using T = TypeParam;
  struct sizes {
    index_t B, H, Lq, Lk, Dk, Dv, Hkv;
  };
  // Lq = 0: nothing to write. Lk = 0: zeros and a log-sum-exp of -inf. B = 0, H = 0 (with
  // Hkv = 0), Dv = 0: nothing to write. Dk = 0: every score is 0, so the output is the mean of v.
  const sizes cases[] = {{2, 2, 0, 5, 3, 4, 2}, {2, 2, 3, 0, 3, 4, 1}, {0, 2, 3, 5, 3, 4, 2},
                         {2, 0, 3, 5, 3, 4, 0}, {2, 2, 3, 5, 3, 0, 2}, {2, 2, 3, 5, 0, 4, 2}};
  for (const auto& c : cases) {
    const auto q = random_tensor<T, 4>({c.B, c.H, c.Lq, c.Dk}, 111);
    const auto k = random_tensor<T, 4>({c.B, c.Hkv, c.Lk, c.Dk}, 112);
    const auto v = random_tensor<T, 4>({c.B, c.Hkv, c.Lk, c.Dv}, 113);
    for (const auto& kern : xattn_test::all_kernels<T>()) {
      SCOPED_TRACE(::testing::Message()
                   << kern.name << " B=" << c.B << " H=" << c.H << " Lq=" << c.Lq << " Lk=" << c.Lk
                   << " Dk=" << c.Dk << " Dv=" << c.Dv << " Hkv=" << c.Hkv);
      const auto r = run(kern, q, k, v);
      xattn::attention_options<T> ref_opts;
      if (c.Dk == 0) ref_opts.scale = 1.0;  // the kernels' choice for Dk = 0 (1/sqrt(0) is inf)
      expect_matches_reference(r, q, k, v, ref_opts);
      if (c.Lk == 0) {
        for (T x : r.out.data) EXPECT_EQ(x, T(0));
        for (T x : r.lse.data) EXPECT_EQ(x, -inf<T>);
      }
      if (c.Dk == 0) {
        for (T w : r.weights.data) EXPECT_EQ(w, T(1) / T(c.Lk));
      }
    }
  }
}

// An empty view's strides are never checked, so they may be anything. A kernel must not take
// an offset from them: select used to, and UBSan caught the pointer overflowing (found by
// fuzz_attention_args; its input is in the corpus).
template <class V>
V with_wild_strides_if_empty(const V& v) {
  if (!v.empty()) return v;
  typename V::index_array wild;
  wild.fill(std::numeric_limits<index_t>::max() / 3);
  return V(v.data(), v.extents(), wild);
}

TYPED_TEST(Extremes, EmptyViewsWithWildStridesAreNeverOffset) {
  using T = TypeParam;
  struct sizes {
    index_t B, H, Lq, Lk, Dk, Dv, Hkv;
  };
  const sizes cases[] = {
      {3, 2, 0, 5, 3, 4, 2}, {3, 2, 3, 0, 3, 4, 1}, {3, 2, 3, 5, 3, 0, 2}, {3, 2, 3, 5, 0, 4, 2}};
  for (const auto& c : cases) {
    const auto q = random_tensor<T, 4>({c.B, c.H, c.Lq, c.Dk}, 131);
    const auto k = random_tensor<T, 4>({c.B, c.Hkv, c.Lk, c.Dk}, 132);
    const auto v = random_tensor<T, 4>({c.B, c.Hkv, c.Lk, c.Dv}, 133);
    for (const auto& kern : xattn_test::all_kernels<T>()) {
      SCOPED_TRACE(::testing::Message() << kern.name << " Lq=" << c.Lq << " Lk=" << c.Lk
                                        << " Dk=" << c.Dk << " Dv=" << c.Dv);
      // The second call writes the same buffers as the first: naive_attention's Eigen products
      // can round differently when its output lies at another address (Eigen's vector loops).
      outputs<T> got = run(kern, q, k, v);
      const outputs<T> want = got;
      for (auto* x : {&got.out.data, &got.weights.data}) std::fill(x->begin(), x->end(), T(-7));
      std::fill(got.lse.data.begin(), got.lse.data.end(), T(-7));
      xattn::attention_options<T> opts;
      opts.weights_out = with_wild_strides_if_empty(got.weights.view());
      opts.lse_out = with_wild_strides_if_empty(got.lse.view());
      kern.run(with_wild_strides_if_empty(q.cview()), with_wild_strides_if_empty(k.cview()),
               with_wild_strides_if_empty(v.cview()), with_wild_strides_if_empty(got.out.view()),
               opts);
      EXPECT_EQ(got.out.data, want.out.data);
      EXPECT_EQ(got.weights.data, want.weights.data);
      EXPECT_EQ(got.lse.data, want.lse.data);
    }
  }
}

TYPED_TEST(Extremes, EveryKeyPaddedGivesZeros) {
  using T = TypeParam;
  const index_t lengths[] = {0, 0};
  const auto q = random_tensor<T, 4>({2, 1, 3, 4}, 121), k = random_tensor<T, 4>({2, 1, 5, 4}, 122);
  const auto v = random_tensor<T, 4>({2, 1, 5, 2}, 123);
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.mask.kv_lengths = xattn::make_view(lengths, {2});
    const auto r = run(kern, q, k, v, opts);
    for (T x : r.out.data) EXPECT_EQ(x, T(0));
    for (T x : r.weights.data) EXPECT_EQ(x, T(0));
    for (T x : r.lse.data) EXPECT_EQ(x, -inf<T>);
  }
}

// ---- defects found from outside (each failed before its fix) ----------------------------------

TYPED_TEST(Extremes, ScaleMultipliesTheQueriesFirstInEveryKernel) {
  using T = TypeParam;
  // One query, two keys k and -k, Dk = 1. The policy (attention_options::scale): a score is
  // (scale · q) · k in T. Float's edges, moved into double's range for double.
  constexpr bool is_float = std::is_same_v<T, float>;
  const double big_scale = is_float ? 1e30 : 1e300, small_scale = 1.0 / big_scale;
  // Edge 1: scale · q overflows though the score does not (1e30 · 1e10 · 1e-20 = 1e20): every
  // kernel gives the row NaN, by the policy for a +inf score.
  tensor<T, 4> q({1, 1, 1, 1}, T(1e10)), k({1, 1, 2, 1}), v({1, 1, 2, 1});
  k.data = {T(is_float ? 1e-20 : 1e-200), T(is_float ? -1e-20 : -1e-200)};
  v.data = {T(1), T(2)};
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.scale = big_scale;
    expect_nan_row(run(kern, q, k, v, opts), 0, 0, 0);
  }
  // Edge 2: q · k overflows though the score does not (1e-30 · 1e30 · 1e30 = 1e30): every kernel
  // gives the first key all the weight.
  q.data = {T(is_float ? 1e30 : 1e300)};
  k.data = {T(is_float ? 1e30 : 1e300), T(is_float ? -1e30 : -1e300)};
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.scale = small_scale;
    const auto r = run(kern, q, k, v, opts);
    EXPECT_EQ(r.out.data, std::vector<T>{T(1)});
    EXPECT_EQ(r.weights.data, (std::vector<T>{T(1), T(0)}));
    const T scaled_q = T(small_scale) * q.data[0];  // rounded as the kernels round it
    EXPECT_EQ(r.lse.data, std::vector<T>{scaled_q * k.data[0]});
  }
}

TYPED_TEST(Extremes, NaNRowHasNaNWeightsPastKvLengthsInEveryKernel) {
  using T = TypeParam;
  // q = NaN, k = v = 1 for both keys, one real key: every weight of the row is NaN, the padded
  // key's too (naive_attention gave it 0).
  const tensor<T, 4> q({1, 1, 1, 1}, nan<T>), k({1, 1, 2, 1}, T(1)), v({1, 1, 2, 1}, T(1));
  const index_t lengths[] = {1};
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.mask.kv_lengths = xattn::make_view(lengths, {1});
    expect_nan_row(run(kern, q, k, v, opts), 0, 0, 0);
  }
  // Lq >= 16 takes the lanes path of tiled_attention: the same there, row by row.
  auto many = random_tensor<T, 4>({1, 1, 20, 1}, 5);
  many.view()(0, 0, 7, 0) = nan<T>;
  for (const auto& kern : xattn_test::all_kernels<T>()) {
    SCOPED_TRACE(kern.name);
    xattn::attention_options<T> opts;
    opts.mask.kv_lengths = xattn::make_view(lengths, {1});
    const auto r = run(kern, many, k, v, opts);
    expect_nan_row(r, 0, 0, 7);
    EXPECT_EQ(r.weights.view()(0, 0, 6, 1), T(0));
  }
}

}  // namespace
