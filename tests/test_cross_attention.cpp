// SPDX-License-Identifier: MIT
// multi_head_cross_attention against an independent composition (projections by definition in
// long double, then the long-double reference attention of test_support.hpp), for context widths
// different from the model width, grouped-query and multi-query heads, both kernels, PyTorch's
// key padding mask, attention weights, the context cache, workspace reuse and every error.
#include "xattn/cross_attention.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::all_close;
using xattn_test::random_tensor;
using xattn_test::tensor;
using xattn_test::throws_with;
using ld = long double;

template <class T>
class CrossAttention : public ::testing::Test {};
TYPED_TEST_SUITE(CrossAttention, xattn_test::element_types, );

// y = x Wᵀ + b by definition, in long double: x [B, L, in] -> [B, L, out].
template <class T>
tensor<ld, 3> project(const xattn::linear<T>& l, const xattn::tensor_view<const T, 3>& x) {
  tensor<ld, 3> y({x.extent(0), x.extent(1), l.out_features()});
  auto yv = y.view();
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t r = 0; r < x.extent(1); ++r)
      for (index_t o = 0; o < l.out_features(); ++o) {
        ld acc = l.has_bias() ? ld(l.bias(o)) : 0.0L;
        for (index_t i = 0; i < l.in_features(); ++i) acc += ld(x(b, r, i)) * ld(l.weight(o, i));
        yv(b, r, o) = acc;
      }
  return y;
}

// The module's computation rebuilt from independent parts; the masks are in xattn's convention.
template <class T>
struct composition {
  std::vector<ld> out;      // [B, Lq, Dm]
  std::vector<ld> weights;  // [B, H, Lq, Lk]
  double max_abs_score = 0;
};

template <class T>
composition<T> compose(const xattn::cross_attention_config& cfg,
                       const xattn::cross_attention_weights<T>& w,
                       const xattn::tensor_view<const T, 3>& query,
                       const xattn::tensor_view<const T, 3>& context,
                       const xattn::tensor_view<const T, 3>& values,
                       const xattn::attention_mask<ld>& mask = {}) {
  const auto c = cfg.resolved();
  auto q = project(w.q_proj, query);
  auto k = project(w.k_proj, context);
  auto v = project(w.v_proj, values);
  xattn::attention_options<ld> opts;
  opts.mask = mask;
  const auto r = xattn_test::reference_attention<ld>(
      xattn::split_heads(q.cview(), c.num_heads), xattn::split_heads(k.cview(), c.num_kv_heads),
      xattn::split_heads(v.cview(), c.num_kv_heads), opts);
  // r.out is [B, H, Lq, Dk]; concatenate the heads back to [B, Lq, H·Dk].
  const index_t B = query.extent(0), Lq = query.extent(1), H = c.num_heads, D = c.head_dim;
  tensor<ld, 3> o({B, Lq, H * D});
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Lq; ++i)
        for (index_t d = 0; d < D; ++d)
          o.view()(b, i, h * D + d) = r.out[std::size_t(((b * H + h) * Lq + i) * D + d)];
  xattn::linear<ld> out_proj(c.model_dim, H * D, w.out_proj.has_bias());
  out_proj.weight = w.out_proj.weight.template cast<ld>();
  out_proj.bias = w.out_proj.bias.template cast<ld>();
  const auto out = project(out_proj, o.cview());
  return {out.data, r.weights, r.max_abs_score};
}

using xattn_test::module_tol;

template <class T>
struct inputs {
  tensor<T, 3> query, context, values, out;
  inputs(const xattn::cross_attention_config& cfg, index_t B, index_t Lq, index_t Lk, unsigned seed)
      : query(random_tensor<T, 3>({B, Lq, cfg.resolved().model_dim}, seed)),
        context(random_tensor<T, 3>({B, Lk, cfg.resolved().context_dim}, seed + 1)),
        values(random_tensor<T, 3>({B, Lk, cfg.resolved().value_context_dim}, seed + 2)),
        out({B, Lq, cfg.resolved().model_dim}, T(-7)) {}
};

template <class T>
void check_against_composition(const xattn::cross_attention_config& cfg, index_t B, index_t Lq,
                               index_t Lk, xattn::attention_kernel kernel, unsigned seed) {
  xattn::multi_head_cross_attention<T> mha(cfg, xattn::random_weights<T>(cfg, seed));
  inputs<T> in(cfg, B, Lq, Lk, seed + 10);
  xattn::cross_attention_options<T> opts;
  opts.kernel = kernel;
  mha.forward(in.query.cview(), in.context.cview(), in.values.cview(), in.out.view(), opts);
  const auto want =
      compose<T>(cfg, mha.weights(), in.query.cview(), in.context.cview(), in.values.cview());
  EXPECT_TRUE(all_close(in.out.data, want.out, module_tol<T>(cfg, Lk, want.max_abs_score)));
}

TYPED_TEST(CrossAttention, ContextWidthsDifferFromModelWidth) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 32;
  cfg.context_dim = 48;        // PyTorch kdim
  cfg.value_context_dim = 20;  // PyTorch vdim
  cfg.num_heads = 4;
  for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive})
    check_against_composition<TypeParam>(cfg, 2, 5, 9, kernel, 1);
}

TYPED_TEST(CrossAttention, WithoutBiasAndWithExplicitHeadDim) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 24;
  cfg.context_dim = 16;
  cfg.num_heads = 3;
  cfg.head_dim = 10;  // H·Dk = 30 != Dm
  cfg.bias = false;
  check_against_composition<TypeParam>(cfg, 2, 4, 7, xattn::attention_kernel::tiled, 2);
}

TYPED_TEST(CrossAttention, GroupedQueryAndMultiQueryHeads) {
  for (index_t kv_heads : {1, 2, 3, 6}) {
    xattn::cross_attention_config cfg;
    cfg.model_dim = 36;
    cfg.context_dim = 28;
    cfg.num_heads = 6;
    cfg.num_kv_heads = kv_heads;
    SCOPED_TRACE(kv_heads);
    check_against_composition<TypeParam>(cfg, 2, 3, 11, xattn::attention_kernel::tiled, 3);
  }
}

TYPED_TEST(CrossAttention, SingleQueryAndSingleKey) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.context_dim = 8;
  cfg.num_heads = 2;
  check_against_composition<TypeParam>(cfg, 3, 1, 13, xattn::attention_kernel::tiled, 4);
  check_against_composition<TypeParam>(cfg, 3, 6, 1, xattn::attention_kernel::tiled, 5);
}

// key_padding_mask true = padding (PyTorch); xattn's reference sees the same keys through
// kv_lengths (padding at the end of each row) or an allowed mask (padding anywhere).
TYPED_TEST(CrossAttention, KeyPaddingMaskAsLengthsOrAnywhere) {
  using T = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.context_dim = 12;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  const index_t B = 3, Lq = 4, Lk = 6;
  xattn::multi_head_cross_attention<T> mha(cfg, xattn::random_weights<T>(cfg, 7));
  inputs<T> in(cfg, B, Lq, Lk, 8);
  for (bool at_end : {true, false}) {
    SCOPED_TRACE(at_end ? "padding at the end" : "padding anywhere");
    bool pad[B][Lk] = {};
    const index_t lengths[B] = {6, 2, 4};
    for (index_t b = 0; b < B; ++b)
      for (index_t j = 0; j < Lk; ++j) pad[b][j] = at_end ? j >= lengths[b] : (j + b) % 3 == 0;
    xattn::cross_attention_options<T> opts;
    opts.key_padding_mask = xattn::make_view(&pad[0][0], {B, Lk});
    mha.forward(in.query.cview(), in.context.cview(), in.values.cview(), in.out.view(), opts);

    bool allowed[B][Lk] = {};
    for (index_t b = 0; b < B; ++b)
      for (index_t j = 0; j < Lk; ++j) allowed[b][j] = !pad[b][j];
    xattn::attention_mask<ld> mask;
    mask.allowed = xattn::make_view<const bool>(&allowed[0][0], {B, 1, 1, Lk}, {Lk, 0, 0, 1});
    const auto want = compose<T>(cfg, mha.weights(), in.query.cview(), in.context.cview(),
                                 in.values.cview(), mask);
    EXPECT_TRUE(all_close(in.out.data, want.out, module_tol<T>(cfg, Lk, want.max_abs_score)));
  }
}

// Key padding combines with the caller's own allowed mask (a PyTorch bool attn_mask, negated).
TYPED_TEST(CrossAttention, KeyPaddingCombinesWithAllowedMask) {
  using T = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.num_heads = 2;
  const index_t B = 2, Lq = 3, Lk = 5;
  xattn::multi_head_cross_attention<T> mha(cfg, xattn::random_weights<T>(cfg, 9));
  inputs<T> in(cfg, B, Lq, Lk, 10);
  bool pad[B][Lk] = {{false, true, false, false, false}, {false, false, false, true, true}};
  bool allowed[Lq][Lk] = {{true, true, false, true, true},
                          {true, true, true, true, false},
                          {false, true, true, true, true}};
  xattn::cross_attention_options<T> opts;
  opts.key_padding_mask = xattn::make_view<const bool>(&pad[0][0], {B, Lk});
  opts.mask.allowed = xattn::to_rank<4>(xattn::make_view<const bool>(&allowed[0][0], {Lq, Lk}));
  mha.forward(in.query.cview(), in.context.cview(), in.out.view(), opts);

  bool both[B][Lq][Lk] = {};
  for (index_t b = 0; b < B; ++b)
    for (index_t i = 0; i < Lq; ++i)
      for (index_t j = 0; j < Lk; ++j) both[b][i][j] = allowed[i][j] && !pad[b][j];
  xattn::attention_mask<ld> mask;
  mask.allowed = xattn::make_view<const bool>(&both[0][0][0], {B, 1, Lq, Lk}, {Lq * Lk, 0, Lk, 1});
  const auto want = compose<T>(cfg, mha.weights(), in.query.cview(), in.context.cview(),
                               in.context.cview(), mask);
  EXPECT_TRUE(all_close(in.out.data, want.out, module_tol<T>(cfg, Lk, want.max_abs_score)));
}

TYPED_TEST(CrossAttention, WeightsPerHeadAndAveraged) {
  using T = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 24;
  cfg.context_dim = 10;
  cfg.num_heads = 3;
  const index_t B = 2, Lq = 4, Lk = 5, H = 3;
  xattn::multi_head_cross_attention<T> mha(cfg, xattn::random_weights<T>(cfg, 11));
  inputs<T> in(cfg, B, Lq, Lk, 12);
  tensor<T, 4> per_head({B, H, Lq, Lk}, T(-7));
  tensor<T, 3> averaged({B, Lq, Lk}, T(-7)), averaged_alone({B, Lq, Lk}, T(-7));
  xattn::cross_attention_options<T> opts;
  opts.weights_out = per_head.view();
  opts.average_weights_out = averaged.view();
  mha.forward(in.query.cview(), in.context.cview(), in.out.view(), opts);
  const auto want =
      compose<T>(cfg, mha.weights(), in.query.cview(), in.context.cview(), in.context.cview());
  const double tol = module_tol<T>(cfg, Lk, want.max_abs_score);
  EXPECT_TRUE(all_close(per_head.data, want.weights, tol));
  std::vector<ld> mean(std::size_t(B * Lq * Lk), 0.0L);
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t n = 0; n < Lq * Lk; ++n)
        mean[std::size_t(b * Lq * Lk + n)] +=
            want.weights[std::size_t((b * H + h) * Lq * Lk + n)] / H;
  EXPECT_TRUE(all_close(averaged.data, mean, tol));

  // Averaged weights alone (no per-head output given) come from the module's workspace.
  xattn::cross_attention_options<T> avg_only;
  avg_only.average_weights_out = averaged_alone.view();
  mha.forward(in.query.cview(), in.context.cview(), in.out.view(), avg_only);
  EXPECT_TRUE(all_close(averaged_alone.data, mean, tol));
}

// A decoder generating token by token: each step's query attends to the cached context, and the
// steps together give what one forward over all queries gives.
TYPED_TEST(CrossAttention, StepByStepWithCacheEqualsFullForward) {
  using T = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 32;
  cfg.context_dim = 24;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  const index_t B = 2, Lq = 6, Lk = 10;
  xattn::multi_head_cross_attention<T> mha(cfg, xattn::random_weights<T>(cfg, 13));
  inputs<T> in(cfg, B, Lq, Lk, 14);
  bool pad[B][Lk] = {};
  for (index_t j = 7; j < Lk; ++j) pad[1][j] = true;
  xattn::cross_attention_options<T> opts;
  opts.key_padding_mask = xattn::make_view<const bool>(&pad[0][0], {B, Lk});
  mha.forward(in.query.cview(), in.context.cview(), in.out.view(), opts);

  const auto cache = mha.encode_context(in.context.cview());
  EXPECT_EQ(cache.batch(), B);
  EXPECT_EQ(cache.kv_len(), Lk);
  EXPECT_EQ(cache.num_kv_heads(), 2);
  tensor<T, 3> steps({B, Lq, 32}, T(-7));
  for (index_t t = 0; t < Lq; ++t) {
    const xattn::tensor_view<const T, 3> q_t(in.query.data.data() + t * 32, {B, 1, 32},
                                             {Lq * 32, 32, 1});
    const xattn::tensor_view<T, 3> out_t(steps.data.data() + t * 32, {B, 1, 32}, {Lq * 32, 32, 1});
    mha.forward(q_t, cache, out_t, opts);
  }
  // Only the GEMM sizes differ between the two runs, so only rounding can.
  EXPECT_TRUE(all_close(steps.data, in.out.data, module_tol<T>(cfg, Lk, 0.0)));
}

TYPED_TEST(CrossAttention, RepeatedForwardAllocatesNothing) {
  using T = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.context_dim = 8;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<T> mha(cfg, xattn::random_weights<T>(cfg, 15));
  inputs<T> big(cfg, 2, 8, 9, 16), small(cfg, 2, 3, 5, 17);
  tensor<T, 3> avg({2, 8, 9});
  bool pad[2][9] = {};
  pad[0][1] = true;  // not at the end: goes through the allowed buffer
  xattn::cross_attention_options<T> opts;
  opts.average_weights_out = avg.view();
  opts.key_padding_mask = xattn::make_view<const bool>(&pad[0][0], {2, 9});

  mha.forward(big.query.cview(), big.context.cview(), big.out.view(), opts);
  const index_t after_first = mha.workspace_allocations();
  EXPECT_GT(after_first, 0);
  const std::vector<T> first = big.out.data;
  mha.forward(big.query.cview(), big.context.cview(), big.out.view(), opts);
  EXPECT_EQ(mha.workspace_allocations(), after_first);
  EXPECT_EQ(big.out.data, first);
  // Smaller shapes fit in the buffers too.
  mha.forward(small.query.cview(), small.context.cview(), small.out.view());
  EXPECT_EQ(mha.workspace_allocations(), after_first);

  // A reused cache keeps its memory as well.
  xattn::context_cache<T> cache;
  mha.encode_context(big.context.cview(), big.context.cview(), cache);
  const index_t cache_allocations = cache.allocations();
  mha.encode_context(small.context.cview(), small.context.cview(), cache);
  mha.encode_context(big.context.cview(), big.context.cview(), cache);
  EXPECT_EQ(cache.allocations(), cache_allocations);
}

TYPED_TEST(CrossAttention, NaiveAndTiledKernelsAgree) {
  using T = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 32;
  cfg.num_heads = 4;
  xattn::multi_head_cross_attention<T> mha(cfg, xattn::random_weights<T>(cfg, 18));
  inputs<T> in(cfg, 2, 33, 70, 19);
  tensor<T, 3> naive_out({2, 33, 32});
  xattn::cross_attention_options<T> opts;
  opts.kernel = xattn::attention_kernel::naive;
  mha.forward(in.query.cview(), in.context.cview(), naive_out.view(), opts);
  opts.kernel = xattn::attention_kernel::tiled;
  opts.tiles.q_tile = 8;
  opts.tiles.kv_tile = 16;
  mha.forward(in.query.cview(), in.context.cview(), in.out.view(), opts);
  EXPECT_TRUE(all_close(in.out.data, naive_out.data, module_tol<T>(cfg, 70, 0.0)));
}

TEST(CrossAttentionConfig, ResolvesDefaults) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 64;
  cfg.num_heads = 8;
  const auto c = cfg.resolved();
  EXPECT_EQ(c.context_dim, 64);
  EXPECT_EQ(c.value_context_dim, 64);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 8);
  cfg.context_dim = 100;
  EXPECT_EQ(cfg.resolved().value_context_dim, 100);
}

TEST(CrossAttentionConfig, InvalidConfigurationsThrow) {
  auto cfg_with = [](index_t dm, index_t h, index_t hkv, index_t d) {
    xattn::cross_attention_config c;
    c.model_dim = dm;
    c.num_heads = h;
    c.num_kv_heads = hkv;
    c.head_dim = d;
    return c;
  };
  using E = xattn::value_error;
  EXPECT_TRUE(throws_with<E>([&] { (void)cfg_with(64, 8, 3, 0).resolved(); },
                             {"num_heads = 8 is not a multiple of num_kv_heads = 3"}));
  EXPECT_TRUE(throws_with<E>([&] { (void)cfg_with(60, 8, 0, 0).resolved(); },
                             {"model_dim = 60 is not a multiple of num_heads = 8"}));
  EXPECT_TRUE(throws_with<E>([&] { (void)cfg_with(0, 8, 0, 0).resolved(); }, {"model_dim is 0"}));
  EXPECT_TRUE(throws_with<E>([&] { (void)cfg_with(64, 0, 0, 0).resolved(); }, {"num_heads is 0"}));
  EXPECT_TRUE(
      throws_with<E>([&] { (void)cfg_with(64, 8, -2, 0).resolved(); }, {"num_kv_heads = -2"}));
  EXPECT_TRUE(
      throws_with<E>([&] { xattn::multi_head_cross_attention<float> m(cfg_with(64, 8, 3, 0)); },
                     {"num_kv_heads"}));
  EXPECT_NO_THROW((void)cfg_with(60, 8, 0, 16).resolved());  // an explicit head_dim is fine
}

TEST(CrossAttentionModule, WeightsOfTheWrongShapeThrow) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.context_dim = 8;
  cfg.num_heads = 2;
  cfg.num_kv_heads = 1;
  auto w = xattn::random_weights<float>(cfg, 1);
  EXPECT_EQ(w.k_proj.out_features(), 8);  // one kv head of width 8
  auto bad = w;
  bad.k_proj.weight.resize(16, 8);
  EXPECT_TRUE(
      throws_with<xattn::shape_error>([&] { xattn::multi_head_cross_attention<float> m(cfg, bad); },
                                      {"k_proj.weight is [16, 8], expected [8, 8]"}));
  bad = w;
  bad.out_proj.bias.resize(0);
  EXPECT_TRUE(
      throws_with<xattn::shape_error>([&] { xattn::multi_head_cross_attention<float> m(cfg, bad); },
                                      {"out_proj.bias.extent(0) is 0, expected 16"}));
  cfg.bias = false;
  EXPECT_TRUE(
      throws_with<xattn::shape_error>([&] { xattn::multi_head_cross_attention<float> m(cfg, w); },
                                      {"q_proj has a bias but the config gives it none"}));
}

TEST(CrossAttentionModule, ForwardShapeErrorsNameTheArgument) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.context_dim = 8;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<float> mha(cfg, xattn::random_weights<float>(cfg, 1));
  tensor<float, 3> q({2, 3, 16}), ctx({2, 5, 8}), out({2, 3, 16}), bad_q({2, 3, 15}),
      bad_ctx({2, 5, 9}), bad_out({2, 4, 16}), other_batch({3, 5, 8}), avg({2, 3, 4});
  using E = xattn::shape_error;
  EXPECT_TRUE(throws_with<E>([&] { mha.forward(bad_q.cview(), ctx.cview(), out.view()); },
                             {"query.extent(2) is 15, expected 16"}));
  EXPECT_TRUE(throws_with<E>([&] { mha.forward(q.cview(), bad_ctx.cview(), out.view()); },
                             {"context.extent(2) is 9, expected 8"}));
  EXPECT_TRUE(throws_with<E>([&] { mha.forward(q.cview(), ctx.cview(), bad_out.view()); },
                             {"out.extent(1) is 4, expected 3"}));
  EXPECT_TRUE(
      throws_with<E>([&] { mha.forward(q.cview(), ctx.cview(), bad_q.cview(), out.view()); },
                     {"values.extent(1) is 3, expected 5"}));
  const auto cache = mha.encode_context(other_batch.cview());
  EXPECT_TRUE(throws_with<E>([&] { mha.forward(q.cview(), cache, out.view()); },
                             {"the context has batch 3, expected query.extent(0) = 2"}));
  xattn::cross_attention_options<float> opts;
  opts.average_weights_out = avg.view();
  EXPECT_TRUE(throws_with<E>([&] { mha.forward(q.cview(), ctx.cview(), out.view(), opts); },
                             {"average_weights_out.extent(2) is 4, expected 5"}));
  bool pad[2][4] = {};
  xattn::cross_attention_options<float> pad_opts;
  pad_opts.key_padding_mask = xattn::make_view<const bool>(&pad[0][0], {2, 4});
  EXPECT_TRUE(throws_with<E>([&] { mha.forward(q.cview(), ctx.cview(), out.view(), pad_opts); },
                             {"key_padding_mask.extent(1) is 4, expected 5"}));
}

// ---- defects found from outside (each failed before its fix) ----------------------------------

TEST(CrossAttentionConfig, SizeProductsThatOverflowThrow) {
  xattn::cross_attention_config c;
  c.model_dim = 8;
  c.num_heads = 4;
  c.head_dim = index_t(1) << 62;  // 4 · 2^62 wraps to 0 in index_t
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { (void)c.resolved(); },
                                              {"num_heads = 4 times head_dim", "overflows"}));
  EXPECT_TRUE(throws_with<xattn::value_error>(
      [&] { xattn::multi_head_cross_attention<float> m(c); }, {"overflows"}));
  // Each weight's element count: [H·Dk, Dm] with H·Dk = 2^40 and Dm = 2^30.
  c.head_dim = index_t(1) << 38;
  c.model_dim = index_t(1) << 30;
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { (void)c.resolved(); },
                                              {"num_heads * head_dim", "model_dim", "overflows"}));
  c.model_dim = 8;
  c.head_dim = 2;
  c.context_dim = index_t(1) << 62;
  EXPECT_TRUE(
      throws_with<xattn::value_error>([&] { (void)c.resolved(); }, {"context_dim", "overflows"}));
}

TEST(CrossAttentionModule, FailedEncodeLeavesTheCacheAsItWas) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 8;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<float> mha(cfg, xattn::random_weights<float>(cfg, 3));
  const auto query = random_tensor<float, 3>({1, 2, 8}, 4);
  const auto context = random_tensor<float, 3>({1, 5, 8}, 5);
  auto cache = mha.encode_context(context.cview());
  tensor<float, 3> before({1, 2, 8}), after({1, 2, 8});
  mha.forward(query.cview(), cache, before.view());
  // 2^40 context rows through a zero stride: the cache cannot grow to hold their projections.
  const xattn::tensor_view<const float, 3> huge(context.data.data(), {1, index_t(1) << 40, 8},
                                                {0, 0, 1});
  EXPECT_THROW(mha.encode_context(huge, huge, cache), std::bad_alloc);
  EXPECT_TRUE(cache.usable());
  EXPECT_EQ(cache.kv_len(), 5);  // the old extents over the old buffers
  mha.forward(query.cview(), cache, after.view());
  EXPECT_EQ(before.data, after.data);
  // The module's own cache (forward with a context) recovers the same way.
  EXPECT_THROW(mha.forward(query.cview(), huge, after.view()), std::bad_alloc);
  mha.forward(query.cview(), context.cview(), after.view());
  EXPECT_EQ(before.data, after.data);
}

TEST(CrossAttentionModule, CacheLeftHalfWrittenIsRefusedUntilEncodedAgain) {
  // The keys project; the values cannot: they must be copied first (their rows are strided),
  // and the copy of 2^24 rows of 2^22 values fails. The cache is then marked unusable.
  xattn::cross_attention_config cfg;
  cfg.model_dim = 2;
  cfg.num_heads = 2;
  cfg.context_dim = 1;
  cfg.value_context_dim = index_t(1) << 22;
  cfg.head_dim = 1;
  cfg.num_kv_heads = 1;
  xattn::multi_head_cross_attention<float> mha(cfg);
  const index_t Lk = index_t(1) << 24;
  const float zero[2] = {0.0f, 0.0f};
  const xattn::tensor_view<const float, 3> context(zero, {1, Lk, 1}, {0, 0, 1});
  const xattn::tensor_view<const float, 3> values(zero, {1, Lk, cfg.value_context_dim}, {0, 0, 2});
  xattn::context_cache<float> cache;
  EXPECT_THROW(mha.encode_context(context, values, cache), std::bad_alloc);
  EXPECT_FALSE(cache.usable());
  const tensor<float, 3> query({1, 1, 2});
  tensor<float, 3> out({1, 1, 2}, -7.0f);
  EXPECT_TRUE(throws_with<xattn::value_error>(
      [&] { mha.forward(query.cview(), cache, out.view()); }, {"the cache is unusable", "encode"}));
  EXPECT_EQ(out.data, std::vector<float>(2, -7.0f));
  const tensor<float, 3> small({1, 3, 1}), small_values({1, 3, cfg.value_context_dim});
  mha.encode_context(small.cview(), small_values.cview(), cache);
  EXPECT_TRUE(cache.usable());
  mha.forward(query.cview(), cache, out.view());
  EXPECT_EQ(out.data, std::vector<float>(2, 0.0f));  // zero weights, no bias: zeros
}

TEST(CrossAttentionModule, OutputsThatOverlapAreRejectedAndNothingIsWritten) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 8;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<float> mha(cfg, xattn::random_weights<float>(cfg, 6));
  const index_t B = 1, Lq = 3, Lk = 4;
  const auto query = random_tensor<float, 3>({B, Lq, 8}, 7);
  const auto context = random_tensor<float, 3>({B, Lk, 8}, 8);
  const auto cache = mha.encode_context(context.cview());
  // One buffer big enough for every output, filled with a sentinel.
  std::vector<float> buf(256, -7.0f);
  const xattn::tensor_view<float, 3> out(buf.data(), {B, Lq, 8});
  const xattn::tensor_view<float, 4> weights(buf.data() + 64, {B, 2, Lq, Lk});
  const xattn::tensor_view<float, 3> avg(buf.data() + 128, {B, Lq, Lk});
  using E = xattn::shape_error;
  const auto run = [&](const xattn::tensor_view<float, 3>& o,
                       const xattn::cross_attention_options<float>& opts) {
    return [&, o] { mha.forward(query.cview(), cache, o, opts); };
  };
  // out with a stride of 0: every row would land on the same memory.
  const xattn::tensor_view<float, 3> zero_stride(buf.data(), {B, Lq, 8}, {0, 0, 1});
  EXPECT_TRUE(throws_with<E>(run(zero_stride, {}), {"so elements of out would share memory"}));
  xattn::cross_attention_options<float> opts;
  opts.weights_out = xattn::tensor_view<float, 4>(buf.data() + 8, {B, 2, Lq, Lk});
  EXPECT_TRUE(throws_with<E>(run(out, opts), {"weights_out overlaps out"}));
  opts = {};
  opts.average_weights_out = xattn::tensor_view<float, 3>(buf.data() + 12, {B, Lq, Lk});
  EXPECT_TRUE(throws_with<E>(run(out, opts), {"average_weights_out overlaps out"}));
  opts.weights_out = weights;
  opts.average_weights_out = xattn::tensor_view<float, 3>(buf.data() + 70, {B, Lq, Lk});
  EXPECT_TRUE(throws_with<E>(run(out, opts), {"average_weights_out overlaps weights_out"}));
  // An output over an input: the query, and (forward with a context) the context.
  opts = {};
  opts.average_weights_out =
      xattn::tensor_view<float, 3>(const_cast<float*>(query.data.data()), {B, Lq, Lk});
  EXPECT_TRUE(throws_with<E>(run(out, opts), {"average_weights_out overlaps query"}));
  EXPECT_TRUE(throws_with<E>(
      [&] {
        mha.forward(
            query.cview(), context.cview(),
            xattn::tensor_view<float, 3>(const_cast<float*>(context.data.data()), {B, Lq, 8}));
      },
      {"out overlaps context"}));
  EXPECT_EQ(buf, std::vector<float>(256, -7.0f));
  // Apart, the same views work.
  opts = {};
  opts.weights_out = weights;
  opts.average_weights_out = avg;
  mha.forward(query.cview(), cache, out, opts);
  for (index_t i = 0; i < Lq; ++i) {
    float sum = 0;
    for (index_t j = 0; j < Lk; ++j) sum += avg(0, i, j);
    EXPECT_NEAR(sum, 1.0f, 1e-6f);
  }
}

TEST(CrossAttentionModule, CopiesShareWeightsAndOwnTheirBuffers) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 8;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<float> a(cfg, xattn::random_weights<float>(cfg, 9));
  const auto query = random_tensor<float, 3>({2, 3, 8}, 10);
  const auto context = random_tensor<float, 3>({2, 4, 8}, 11);
  tensor<float, 3> out_a({2, 3, 8}), out_b({2, 3, 8});
  a.forward(query.cview(), context.cview(), out_a.view());
  xattn::multi_head_cross_attention<float> b = a;
  EXPECT_EQ(&a.weights(), &b.weights());    // shared, not copied
  EXPECT_EQ(b.workspace_allocations(), 0);  // its own buffers, none grown yet
  b.forward(query.cview(), context.cview(), out_b.view());
  EXPECT_EQ(out_a.data, out_b.data);
  // New weights for one leave the other as it was.
  b.set_weights(xattn::random_weights<float>(cfg, 12));
  EXPECT_NE(&a.weights(), &b.weights());
  tensor<float, 3> again({2, 3, 8});
  a.forward(query.cview(), context.cview(), again.view());
  EXPECT_EQ(out_a.data, again.data);
  a = b;
  EXPECT_EQ(&a.weights(), &b.weights());
}

TEST(CrossAttentionModule, CacheCopiesAreDeep) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 8;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<float> mha(cfg, xattn::random_weights<float>(cfg, 13));
  const auto c1 = random_tensor<float, 3>({1, 4, 8}, 14),
             c2 = random_tensor<float, 3>({1, 4, 8}, 15);
  auto cache = mha.encode_context(c1.cview());
  const auto copy = cache;
  EXPECT_NE(copy.keys().data(), cache.keys().data());
  mha.encode_context(c2.cview(), c2.cview(), cache);  // the original changes, the copy does not
  const auto fresh = mha.encode_context(c1.cview());
  for (index_t j = 0; j < 4; ++j)
    for (index_t d = 0; d < 4; ++d) EXPECT_EQ(copy.keys()(0, 1, j, d), fresh.keys()(0, 1, j, d));
}

TEST(CrossAttentionModule, ContextReadFromTheCacheItselfIsRejected) {
  // Encoding into a cache a context that lies in that cache's own buffers would overwrite it
  // while reading it; the check comes before the cache changes.
  xattn::cross_attention_config cfg;
  cfg.model_dim = 8;
  cfg.num_heads = 2;
  xattn::multi_head_cross_attention<float> mha(cfg, xattn::random_weights<float>(cfg, 16));
  const auto context = random_tensor<float, 3>({1, 4, 8}, 17);
  auto cache = mha.encode_context(context.cview());
  const auto before = std::vector<float>(cache.keys().data(), cache.keys().data() + 32);
  const xattn::tensor_view<const float, 3> own(cache.keys().data(), {1, 4, 8});
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { mha.encode_context(own, own, cache); },
                                              {"the cache overlaps context"}));
  EXPECT_TRUE(cache.usable());
  EXPECT_EQ(std::vector<float>(cache.keys().data(), cache.keys().data() + 32), before);
}

}  // namespace
