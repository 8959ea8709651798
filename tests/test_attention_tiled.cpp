// SPDX-License-Identifier: MIT
// tiled_attention against the long-double reference in test_support.hpp: odd shapes, tiles that
// do not divide (or exceed) the lengths, both inner paths (a tile of queries in SIMD lanes, and
// single rows for fewer queries than a packet holds), every mask kind, fully masked rows and
// tiles, large scores, strided views, grouped-query heads, key splitting for decoding, thread
// counts 1 to 4 with bit-identical results, scratch that depends on neither length, and every
// argument error.
#include "xattn/attention_tiled.hpp"

#include "xattn/attention_naive.hpp"

#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::all_close;
using xattn_test::random_tensor;
using xattn_test::tensor;
using xattn_test::throws_with;

template <class T>
class TiledAttention : public ::testing::Test {};
TYPED_TEST_SUITE(TiledAttention, xattn_test::element_types, );

using xattn_test::shape;
using xattn_test::tiles;

// The thread counts a test may ask for: 1 to 4 with OpenMP, where the kernel really starts
// that many threads; without OpenMP every count runs serially, and is still accepted.
const int thread_counts[] = {1, 2, 3, 4};

using xattn_test::bool_mask;

// Random q, k, v for one shape, and the check of tiled_attention's outputs (with the given
// tiles) against the reference.
template <class T>
struct problem : xattn_test::problem<T> {
  using xattn_test::problem<T>::problem;
  void run_and_check(const xattn::attention_options<T>& opts, const xattn::tile_options& t,
                     bool with_weights = true) {
    xattn_test::problem<T>::run_and_check(
        [&t](auto q_in, auto k_in, auto v_in, auto out_view, const auto& o) {
          xattn::tiled_attention<T>(q_in, k_in, v_in, out_view, o, t);
        },
        opts, with_weights);
  }
};

// Shapes that reach every edge: Lq != Lk, Lq = 1 (row path), Lk = 1, Dk != Dv, lengths that no
// tile divides, a query tile wider than one packet, grouped-query heads.
const xattn::attention_shape odd_shapes[] = {
    shape(1, 1, 1, 1, 1, 1),        shape(1, 1, 1, 37, 8, 5),     shape(2, 3, 3, 50, 16, 24),
    shape(1, 2, 37, 1, 12, 7),      shape(2, 2, 29, 61, 19, 33),  shape(1, 1, 130, 300, 64, 64),
    shape(2, 4, 70, 90, 40, 24, 2), shape(1, 6, 20, 45, 8, 8, 1), shape(1, 1, 17, 257, 3, 70),
};

// Tiles that divide nothing, tiles of one, and tiles larger than every length.
const xattn::tile_options odd_tiles[] = {tiles(0, 0),  tiles(1, 1),  tiles(5, 7),
                                         tiles(16, 3), tiles(3, 64), tiles(1000, 1000)};

TYPED_TEST(TiledAttention, MatchesReferenceOnOddShapesAndTiles) {
  using T = TypeParam;
  for (const auto& s : odd_shapes)
    for (const auto& t : odd_tiles) {
      SCOPED_TRACE(::testing::Message()
                   << "Lq " << s.q_len << " Lk " << s.kv_len << " Dk " << s.head_dim << " Dv "
                   << s.value_dim << " q_tile " << t.q_tile.value_or(0) << " kv_tile "
                   << t.kv_tile.value_or(0));
      problem<T>(s).run_and_check({}, t);
    }
}

TYPED_TEST(TiledAttention, UsesTheScaleWhenSet) {
  using T = TypeParam;
  xattn::attention_options<T> opts;
  opts.scale = 0.3;
  problem<T>(shape(1, 2, 33, 40, 16, 16)).run_and_check(opts, tiles(8, 16));
  problem<T>(shape(1, 2, 2, 40, 16, 16)).run_and_check(opts, tiles(0, 16));
}

TYPED_TEST(TiledAttention, KeepsLargeScoresFiniteAndExact) {
  using T = TypeParam;
  // |q|, |k| up to 30 over Dk = 16: scores reach about 1e4 after the scale.
  for (index_t lq : {2, 40}) {
    problem<T> p(shape(1, 2, lq, 70, 16, 8), 3, 30.0);
    p.run_and_check({}, tiles(16, 32));
    for (T x : p.out.data) EXPECT_TRUE(std::isfinite(x));
  }
}

TYPED_TEST(TiledAttention, EveryMaskKindAloneAndCombined) {
  using T = TypeParam;
  for (index_t lq : {3, 45}) {  // the row path and the lanes path
    const auto s = shape(2, 3, lq, 53, 8, 6);
    SCOPED_TRACE(::testing::Message() << "Lq " << lq);
    const std::vector<index_t> lengths = {17, 53};
    bool_mask allowed({1, 3, lq, 53}, true);
    for (index_t n = 0; n < allowed.size(); ++n) allowed.data[std::size_t(n)] = (n * 7 % 5) != 0;
    auto bias = random_tensor<T, 4>({2, 1, 1, 53}, 9, -2.0, 2.0);
    bias.data[4] = -std::numeric_limits<T>::infinity();
    const xattn::tensor_view<const index_t, 1> len = xattn::make_view(lengths.data(), {2});

    for (int kind = 0; kind < 6; ++kind) {
      xattn::attention_options<T> opts;
      if (kind == 0 || kind == 5) opts.mask.kv_lengths = len;
      if (kind == 1 || kind == 5) opts.mask.allowed = allowed.cview();
      if (kind == 2 || kind == 5) opts.mask.bias = bias.cview();
      if (kind == 3) opts.mask.causal = xattn::causal_mask::top_left;
      if (kind == 4 || kind == 5) opts.mask.causal = xattn::causal_mask::bottom_right;
      SCOPED_TRACE(::testing::Message() << "mask kind " << kind);
      problem<T>(s, unsigned(kind + 1)).run_and_check(opts, tiles(16, 10));
      problem<T>(s, unsigned(kind + 1)).run_and_check(opts, tiles(0, 0));
    }
  }
}

TYPED_TEST(TiledAttention, FullyMaskedRowsAndTilesGiveZerosAndMinusInfinity) {
  using T = TypeParam;
  for (index_t lq : {2, 40}) {
    const auto s = shape(2, 1, lq, 90, 8, 8);
    problem<T> p(s);
    const std::vector<index_t> lengths = {0, 20};  // batch item 0: no keys at all
    bool_mask allowed({1, 1, lq, 90}, true);
    for (index_t j = 0; j < 90; ++j) allowed.data[std::size_t(j)] = false;  // query 0: none
    xattn::attention_options<T> opts;
    opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
    opts.mask.allowed = allowed.cview();
    p.run_and_check(opts, tiles(8, 16));  // keys 20..89 of item 1 are whole masked tiles
    const auto out = p.out.cview();
    const auto w = p.weights.cview();
    for (index_t i = 0; i < lq; ++i) {
      EXPECT_EQ(p.lse.view()(0, 0, i), -std::numeric_limits<T>::infinity());
      for (index_t e = 0; e < 8; ++e) EXPECT_EQ(out(0, 0, i, e), T(0));
      for (index_t j = 0; j < 90; ++j) EXPECT_EQ(w(0, 0, i, j), T(0));
      for (index_t j = 20; j < 90; ++j) EXPECT_EQ(w(1, 0, i, j), T(0));  // exactly, not tiny
    }
    for (index_t e = 0; e < 8; ++e) EXPECT_EQ(out(1, 0, 0, e), T(0));
  }
}

TYPED_TEST(TiledAttention, NeverUsesKeysPastTheKeyPadding) {
  using T = TypeParam;
  // Keys and values past each length are NaN: a kernel that used them would return NaN.
  for (index_t lq : {1, 3, 64}) {  // the row path (with and without key splitting), the lanes path
    SCOPED_TRACE(::testing::Message() << "Lq " << lq);
    const auto s = shape(2, 2, lq, 600, 16, 16);
    problem<T> p(s);
    const std::vector<index_t> lengths = {31, 300};
    for (index_t b = 0; b < 2; ++b)
      for (index_t h = 0; h < 2; ++h)
        for (index_t j = lengths[std::size_t(b)]; j < 600; ++j)
          for (index_t e = 0; e < 16; ++e) {
            p.k.view()(b, h, j, e) = std::numeric_limits<T>::quiet_NaN();
            p.v.view()(b, h, j, e) = std::numeric_limits<T>::quiet_NaN();
          }
    xattn::attention_options<T> opts;
    opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
    for (const auto& t : {tiles(16, 32), tiles(0, 0)}) {
      xattn::tiled_attention<T>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), opts, t);
      for (T x : p.out.data) ASSERT_TRUE(std::isfinite(x));
    }
  }
}

TYPED_TEST(TiledAttention, ReadsHeadsInPlaceFromAProjectionLayout) {
  using T = TypeParam;
  // q_proj [B, Lq, H*Dk] and friends, split into [B, H, L, D] views without copying.
  const index_t B = 2, H = 4, Hkv = 2, Lq = 33, Lk = 41, Dk = 8, Dv = 12;
  for (index_t lq : {index_t(2), Lq}) {
    auto qp = random_tensor<T, 3>({B, lq, H * Dk}, 1);
    auto kp = random_tensor<T, 3>({B, Lk, Hkv * Dk}, 2);
    auto vp = random_tensor<T, 3>({B, Lk, Hkv * Dv}, 3);
    tensor<T, 3> op({B, lq, H * Dv}, T(-7));
    const auto q = xattn::split_heads(qp.cview(), H);
    const auto k = xattn::split_heads(kp.cview(), Hkv);
    const auto v = xattn::split_heads(vp.cview(), Hkv);
    xattn::tiled_attention<T>(q, k, v, xattn::split_heads(op.view(), H), {}, tiles(16, 16));
    const auto want = xattn_test::reference_attention<T>(q, k, v);
    EXPECT_TRUE(all_close(xattn_test::elements(xattn::split_heads(op.cview(), H)), want.out,
                          xattn_test::attention_tol<T>(Dk, Lk, want.max_abs_score)));
  }
}

TYPED_TEST(TiledAttention, ReadsAndWritesViewsWithNonUnitInnerStrides) {
  using T = TypeParam;
  // Every tensor's last dimension has stride 2 (the odd elements belong to someone else):
  // the kernel copies such K and V tiles, and writes such outputs element by element.
  for (index_t lq : {3, 35}) {
    const index_t Lk = 29, Dk = 6, Dv = 5;
    auto qb = random_tensor<T, 4>({1, 2, lq, 2 * Dk}, 4);
    auto kb = random_tensor<T, 4>({1, 2, Lk, 2 * Dk}, 5);
    auto vb = random_tensor<T, 4>({1, 2, Lk, 2 * Dv}, 6);
    tensor<T, 4> ob({1, 2, lq, 2 * Dv}, T(-7));
    auto strided = [](auto& t, index_t d) {
      const auto& e = t.extents;
      return xattn::tensor_view<typename std::remove_reference_t<decltype(t.data[0])>, 4>(
          t.data.data(), {e[0], e[1], e[2], d}, {e[1] * e[2] * e[3], e[2] * e[3], e[3], 2});
    };
    const xattn::tensor_view<const T, 4> q = strided(qb, Dk), k = strided(kb, Dk),
                                         v = strided(vb, Dv);
    const auto out = strided(ob, Dv);
    xattn::tiled_attention<T>(q, k, v, out, {}, tiles(8, 8));
    const auto want = xattn_test::reference_attention<T>(q, k, v);
    EXPECT_TRUE(all_close(xattn_test::elements(out), want.out,
                          xattn_test::attention_tol<T>(Dk, Lk, want.max_abs_score)));
    for (std::size_t n = 1; n < ob.data.size(); n += 2) EXPECT_EQ(ob.data[n], T(-7));
  }
}

TYPED_TEST(TiledAttention, SplitsTheKeysOfADecoderStepAndMergesThemExactly) {
  using T = TypeParam;
  // One query over 20000 keys (a decoder step over a long context): too few query tiles to
  // share, so the keys are split into ranges and merged through their log-sum-exp.
  for (const auto& s : {shape(1, 1, 1, 20000, 64, 64), shape(2, 2, 3, 3000, 16, 24, 1)}) {
    ASSERT_GT(xattn::detail::make_tiled_plan<T>(s, {}, false).splits, 1);
    xattn::attention_options<T> opts;
    const std::vector<index_t> lengths = {3000, 1333};
    if (s.batch == 2) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
    problem<T>(s).run_and_check(opts, tiles(0, 0), /*with_weights=*/false);
    problem<T>(s).run_and_check(opts, tiles(0, 50), /*with_weights=*/false);
  }
}

TYPED_TEST(TiledAttention, GivesBitIdenticalResultsForOneToFourThreads) {
  using T = TypeParam;
  const std::vector<index_t> lengths = {500, 1200};
  for (const auto& s : {shape(2, 3, 100, 130, 16, 8), shape(1, 1, 1, 1500, 64, 64),
                        shape(2, 2, 2, 1200, 32, 32, 1)}) {
    problem<T> p(s);
    xattn::attention_options<T> opts;
    if (s.batch == 2 && s.kv_len >= 1200)
      opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
    opts.lse_out = p.lse.view();
    std::vector<T> first_out, first_lse;
    for (int threads : thread_counts) {
      std::fill(p.out.data.begin(), p.out.data.end(), T(-7));
      xattn::tiled_attention<T>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), opts,
                                tiles(0, 0, threads));
      if (threads == 1) {
        first_out = p.out.data;
        first_lse = p.lse.data;
        continue;
      }
      EXPECT_EQ(0, std::memcmp(first_out.data(), p.out.data.data(), first_out.size() * sizeof(T)))
          << "output with " << threads << " threads, Lq " << s.q_len;
      EXPECT_EQ(0, std::memcmp(first_lse.data(), p.lse.data.data(), first_lse.size() * sizeof(T)))
          << "log-sum-exp with " << threads << " threads, Lq " << s.q_len;
    }
  }
}

TYPED_TEST(TiledAttention, AgreesWithTheNaiveKernel) {
  using T = TypeParam;
  problem<T> p(shape(2, 2, 50, 70, 24, 24));
  tensor<T, 4> naive_out(p.out.extents);
  xattn::naive_attention<T>(p.q.view(), p.k.view(), p.v.view(), naive_out.view());
  xattn::tiled_attention<T>(p.q.view(), p.k.view(), p.v.view(), p.out.view());
  EXPECT_TRUE(all_close(p.out.data, naive_out.data, 2 * xattn_test::attention_tol<T>(24, 70, 5.0)));
}

TYPED_TEST(TiledAttention, NoQueriesIsANoOpAndNoKeysGivesZeros) {
  using T = TypeParam;
  problem<T> none(shape(1, 2, 0, 10, 4, 4));
  xattn::tiled_attention<T>(none.q.view(), none.k.view(), none.v.view(), none.out.view());
  for (index_t lq : {2, 20}) {
    problem<T> p(shape(1, 2, lq, 0, 4, 3));
    xattn::attention_options<T> opts;
    opts.lse_out = p.lse.view();
    xattn::tiled_attention<T>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), opts);
    for (T x : p.out.data) EXPECT_EQ(x, T(0));
    for (T x : p.lse.data) EXPECT_EQ(x, -std::numeric_limits<T>::infinity());
  }
}

TYPED_TEST(TiledAttention, VectorisedExpIsAccurateAndFlushesBelowTheSmallestNormal) {
  using T = TypeParam;
  const T eps = std::numeric_limits<T>::epsilon(), tiny = std::numeric_limits<T>::min();
  const double lo = std::log(double(tiny)), hi = std::log(double(std::numeric_limits<T>::max()));
  std::vector<T> x;
  for (double t = lo - 30; t < hi + 30; t += 0.0137) x.push_back(T(t));
  for (T special :
       {T(0), -std::numeric_limits<T>::infinity(), std::numeric_limits<T>::infinity(),
        std::numeric_limits<T>::quiet_NaN(), T(lo + 1e-3), T(hi - 1e-3), T(-1e30), T(1e30)})
    x.push_back(special);
  while (x.size() % 16 != 0) x.push_back(T(0));  // whole packets on every path
  // Every path this machine runs (dispatch.hpp), each with its own exp.
  for (const xattn::detail::cpu_level level : xattn::detail::built_levels) {
    if (!xattn::detail::level_available(level)) continue;
    SCOPED_TRACE(xattn::detail::level_name(level));
    std::vector<T> got(x.size());
    xattn::detail::kernels_for<T>(level).exp_flushed(x.data(), index_t(x.size()), got.data());
    for (std::size_t n = 0; n < x.size(); ++n) {
      const T want = std::exp(x[n]), g = got[n];
      SCOPED_TRACE(::testing::Message() << "exp(" << x[n] << ")");
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(g));
      } else if (std::isinf(want)) {
        EXPECT_EQ(g, want);
      } else if (level == xattn::detail::cpu_level::eigen && std::is_same_v<T, float> &&
                 x[n] > T(88.37)) {
        // the eigen level's documented limit (detail/simd.hpp): Eigen's exp may overflow early
        // here, but what it returns is inf or accurate
        EXPECT_TRUE(std::isinf(g) || std::abs(g - want) <= 4 * eps * want);
      } else if (want < tiny * T(0.999)) {
        EXPECT_EQ(g, T(0));
      } else if (want > tiny * T(1.001)) {
        EXPECT_LE(std::abs(g - want), 4 * eps * want);
      }
    }
  }
}

TEST(TiledAttentionScratch, DependsOnTheTilesNotOnTheLengths) {
  const auto at = [](index_t lq, index_t lk) {
    return xattn::tiled_attention_scratch_bytes<float>(shape(1, 8, lq, lk, 64, 64), tiles(0, 0, 2));
  };
  EXPECT_GT(at(4096, 4096), 0);
  EXPECT_EQ(at(4096, 4096), at(65536, 65536));
  EXPECT_EQ(at(4096, 4096), at(8192, 1 << 20));
  EXPECT_LT(at(65536, 65536), 1 << 20);  // under 1 MiB at Lq = Lk = 65536
  // A decoder step splits its keys: bounded partial results, whatever Lk.
  EXPECT_EQ(xattn::tiled_attention_scratch_bytes<float>(shape(1, 1, 1, 1 << 16, 64, 64)),
            xattn::tiled_attention_scratch_bytes<float>(shape(1, 1, 1, 1 << 22, 64, 64)));
}

TEST(TiledAttentionScratch, RepeatedCallsAllocateNothing) {
  problem<float> p(shape(1, 2, 70, 300, 32, 32));
  const xattn::tile_options serial = tiles(0, 0, 1);
  xattn::tiled_attention<float>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), {}, serial);
  const auto& team = xattn::detail::calling_thread_scratch<float>();
  ASSERT_GE(team.threads.size(), 1u);
  const index_t bytes = team.threads[0].bytes();
  const float* qt = team.threads[0].qt.data();
  xattn::tiled_attention<float>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), {}, serial);
  EXPECT_EQ(bytes, team.threads[0].bytes());
  EXPECT_EQ(qt, team.threads[0].qt.data());
}

TEST(TiledAttentionErrors, NamesTheBadTileOption) {
  problem<float> p(shape(1, 1, 4, 4, 2, 2));
  auto run = [&](const xattn::tile_options& t) {
    return [&p, t] {
      xattn::tiled_attention<float>(p.q.view(), p.k.view(), p.v.view(), p.out.view(), {}, t);
    };
  };
  xattn::tile_options t;
  t.q_tile = 0;
  EXPECT_TRUE(throws_with<xattn::value_error>(run(t), {"tiled_attention", "tiles.q_tile", "0"}));
  t = {};
  t.kv_tile = -3;
  EXPECT_TRUE(throws_with<xattn::value_error>(run(t), {"tiles.kv_tile is -3"}));
  t = {};
  t.num_threads = 0;
  EXPECT_TRUE(throws_with<xattn::value_error>(run(t), {"tiles.num_threads is 0"}));
  t.num_threads = 5000;
  EXPECT_TRUE(throws_with<xattn::value_error>(run(t), {"tiles.num_threads is 5000"}));
  for (float x : p.out.data) EXPECT_EQ(x, -7.0f);  // nothing written
}

TEST(TiledAttentionErrors, NamesTheMismatchedExtent) {
  problem<float> p(shape(1, 2, 4, 5, 3, 2));
  tensor<float, 4> bad_v({1, 2, 5, 3});
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { xattn::tiled_attention<float>(p.q.view(), p.k.view(), bad_v.cview(), p.out.view()); },
      {"tiled_attention", "out.extent(3) is 2, expected 3"}));
  tensor<float, 4> bad_k({1, 2, 6, 3});
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { xattn::tiled_attention<float>(p.q.view(), bad_k.cview(), p.v.view(), p.out.view()); },
      {"tiled_attention: v.extent(2) is 5, expected 6"}));
}

TEST(TiledAttentionThreads, SmallCallsDoNotFork) {
  // Beside another library's spinning thread pool, each fork of a 6 µs decoder step cost
  // milliseconds. Unless a thread count is asked for, a call starts a thread per
  // min_flops_per_thread of work only.
  const auto plan = [](const xattn::attention_shape& s, const xattn::tile_options& t) {
    return xattn::detail::make_tiled_plan<float>(s, t, false);
  };
  xattn::tile_options automatic, asked;
  asked.num_threads = 4;
  automatic.num_threads.reset();
  const auto decoder_step = shape(1, 1, 1, 1500, 64, 64);  // 0.38 MFLOP
  EXPECT_EQ(plan(decoder_step, automatic).threads, 1);
  // Nor are its keys split into ranges: one unit, even when 4 threads are asked for.
  EXPECT_EQ(plan(decoder_step, asked).splits, 1);
  EXPECT_EQ(plan(decoder_step, asked).threads, 1);
  const auto long_decoder_step = shape(1, 1, 1, 32768, 64, 64);  // 8.4 MFLOP: 8 ranges
  EXPECT_EQ(plan(long_decoder_step, asked).splits, 8);
  EXPECT_EQ(plan(long_decoder_step, asked).threads, 4);  // asked for: obeyed
  const auto long_step = shape(1, 8, 1, 32768, 64, 64);  // 67 MFLOP: every thread is worth it
  EXPECT_EQ(plan(long_step, automatic).threads,
            std::min(xattn::detail::default_threads(), int(plan(long_step, automatic).units())));
  // 2.4 · min_flops_per_thread of work: at most two threads.
  const auto medium = shape(1, 1, 16, 600, 64, 64);
  const double flops = 2.0 * 16 * 600 * 128;
  ASSERT_NEAR(flops / xattn::detail::min_flops_per_thread, 2.34, 0.01);
  EXPECT_EQ(plan(medium, automatic).threads, std::min(2, xattn::detail::default_threads()));
}

}  // namespace
