// SPDX-License-Identifier: MIT
// tiled_attention reading q8 and q4 blocks (quantized.hpp) as keys and values. The contract:
// the result is the float call's on the dequantized keys and values (dequantize is exact), so
// the format's quantization error is the only error it adds. On the lanes path, which
// dequantizes a tile into scratch and runs the float loops, that holds bit for bit; on the row
// path (decoder steps), which reads the blocks in place, within float's attention tolerance of
// the long-double reference on the dequantized inputs. Every CPU path this machine runs, the
// emulated avx512 level, odd shapes (head dimensions that are not multiples of 32, Dk != Dv,
// Lq = 1, Lk = 1), GQA, every mask kind, key splits across threads, lse and weights; and the
// module's quantized context cache.

#include "xattn/quantized.hpp"

#include "xattn/attention_tiled.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/dispatch.hpp"

#include "emulated_levels.hpp"
#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::each_path;
using xattn_test::random_tensor;
using xattn_test::shape;
using xattn_test::tensor;
using xattn_test::throws_with;
using xattn_test::tiles;

template <class B>
class QuantizedAttention : public ::testing::Test {};
using block_types = ::testing::Types<xattn::q8_block, xattn::q4_block>;
TYPED_TEST_SUITE(QuantizedAttention, block_types, );

// x [B, H, L, d] quantized into blocks [B, H, L, ceil(d / 32)], and those blocks dequantized.
template <class B>
struct quantized_rows {
  tensor<B, 4> blocks;
  tensor<float, 4> values;  // the dequantized values: what the kernel must compute with
  explicit quantized_rows(const tensor<float, 4>& x)
      : blocks(
            {x.extents[0], x.extents[1], x.extents[2], xattn::quant_blocks_per_row(x.extents[3])},
            B{}),
        values(x.extents) {
    xattn::quantize(x.cview(), blocks.view());
    xattn::dequantize(blocks.cview(), values.view());
  }
};

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// The lanes a query tile of `path` holds: calls with Lq below it take the row path.
index_t lanes_of(std::string_view path) {
  if (path == "sse2") return 4;
  if (path == "avx2") return 8;
  if (path == "avx512" || path == "avx512bf16" || path == "avx512-emulated") return 16;
  return xattn::detail::active_kernels<float>().lanes;
}

struct mask_case {
  const char* name;
  bool lengths = false, causal = false, allowed = false, bias = false;
};

TYPED_TEST(QuantizedAttention, EqualsTheFloatCallOnTheDequantizedCache) {
  using B = TypeParam;
  each_path()([](std::string_view path) {
    for (const auto& s : {shape(1, 8, 1, 300, 64, 64), shape(2, 4, 3, 77, 40, 24, 2),
                          shape(1, 2, 40, 129, 33, 17), shape(1, 1, 1, 1, 1, 1),
                          shape(1, 4, 1, 45, 96, 130, 1), shape(1, 2, 17, 50, 128, 64, 1)}) {
      SCOPED_TRACE(::testing::Message()
                   << "H " << s.num_heads << " Hkv " << s.kv_heads() << " Lq " << s.q_len << " Lk "
                   << s.kv_len << " Dk " << s.head_dim << " Dv " << s.value_dim);
      const auto q = random_tensor<float, 4>({s.batch, s.num_heads, s.q_len, s.head_dim}, 7);
      const quantized_rows<B> k(
          random_tensor<float, 4>({s.batch, s.kv_heads(), s.kv_len, s.head_dim}, 8));
      const quantized_rows<B> v(
          random_tensor<float, 4>({s.batch, s.kv_heads(), s.kv_len, s.value_dim}, 9));
      const std::vector<index_t> lengths(std::size_t(s.batch), std::max<index_t>(1, s.kv_len - 5));
      xattn_test::bool_mask allowed({1, 1, s.q_len, s.kv_len}, true);
      for (index_t i = 0; i < s.q_len; ++i)
        for (index_t j = 0; j < s.kv_len; ++j)
          allowed.data[std::size_t(i * s.kv_len + j)] = (i + 2 * j) % 5 != 1 || j == 0;
      const auto bias = random_tensor<float, 4>({1, s.num_heads, 1, s.kv_len}, 10);
      for (const mask_case& m :
           {mask_case{"none"}, mask_case{"kv_lengths", true}, mask_case{"causal", false, true},
            mask_case{"allowed and bias", false, false, true, true}}) {
        SCOPED_TRACE(m.name);
        xattn::attention_options<float> opts;
        if (m.lengths) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {s.batch});
        if (m.causal) opts.mask.causal = xattn::causal_mask::bottom_right;
        if (m.allowed) opts.mask.allowed = allowed.cview();
        if (m.bias) opts.mask.bias = bias.cview();
        const auto exact = xattn_test::reference_attention<float>(q.cview(), k.values.cview(),
                                                                  v.values.cview(), opts);
        const double tol =
            xattn_test::attention_tol<float>(s.head_dim, s.kv_len, exact.max_abs_score);
        for (const auto& t : {tiles(0, 0), tiles(5, 64, 2), tiles(1, 7, 1), tiles(0, 0, 2)}) {
          SCOPED_TRACE(xattn_test::describe(t));
          tensor<float, 4> out({s.batch, s.num_heads, s.q_len, s.value_dim}, -7.0f), want = out;
          tensor<float, 3> lse({s.batch, s.num_heads, s.q_len}, -7.0f), lse_f = lse;
          tensor<float, 4> w({s.batch, s.num_heads, s.q_len, s.kv_len}, -7.0f), w_f = w;
          xattn::attention_options<float> o = opts, fo = opts;
          o.lse_out = lse.view();
          o.weights_out = w.view();
          fo.lse_out = lse_f.view();
          fo.weights_out = w_f.view();
          xattn::tiled_attention<float>(q.cview(), k.blocks.cview(), v.blocks.cview(), out.view(),
                                        o, t);
          xattn::tiled_attention<float>(q.cview(), k.values.cview(), v.values.cview(), want.view(),
                                        fo, t);
          const index_t q_tile = t.q_tile.value_or(s.q_len);
          if (s.q_len >= lanes_of(path) && q_tile >= lanes_of(path)) {  // the lanes path
            EXPECT_TRUE(same_bits(out.data, want.data)) << "output";
            EXPECT_TRUE(same_bits(lse.data, lse_f.data)) << "log-sum-exp";
            EXPECT_TRUE(same_bits(w.data, w_f.data)) << "weights";
          }
          EXPECT_TRUE(xattn_test::all_close(out.data, exact.out, tol)) << "output";
          EXPECT_TRUE(xattn_test::all_close(lse.data, exact.lse, tol)) << "log-sum-exp";
          EXPECT_TRUE(xattn_test::all_close(w.data, exact.weights, tol)) << "weights";
        }
      }
    }
  });
}

TYPED_TEST(QuantizedAttention, DecodeStepReadsALongCacheInPlace) {
  // A decoder step over a cache longer than a tile, split across threads: the row path's blocks
  // read in place, every path within float's tolerance of the reference, and the same bits for
  // every thread count.
  using B = TypeParam;
  const auto q = random_tensor<float, 4>({1, 8, 1, 64}, 3);
  const quantized_rows<B> k(random_tensor<float, 4>({1, 2, 3000, 64}, 4, -2.0, 2.0));
  const quantized_rows<B> v(random_tensor<float, 4>({1, 2, 3000, 64}, 5));
  const auto exact =
      xattn_test::reference_attention<float>(q.cview(), k.values.cview(), v.values.cview());
  const double tol = xattn_test::attention_tol<float>(64, 3000, exact.max_abs_score);
  each_path()([&](std::string_view) {
    tensor<float, 4> first;
    for (int threads : xattn_test::thread_counts(4)) {
      SCOPED_TRACE(::testing::Message() << threads << " threads");
      tensor<float, 4> out({1, 8, 1, 64}, -7.0f);
      xattn::tiled_attention<float>(q.cview(), k.blocks.cview(), v.blocks.cview(), out.view(), {},
                                    tiles(0, 0, threads));
      EXPECT_TRUE(xattn_test::all_close(out.data, exact.out, tol));
      if (first.data.empty())
        first = out;
      else
        EXPECT_TRUE(same_bits(out.data, first.data)) << "differs from 1 thread";
    }
  });
}

TYPED_TEST(QuantizedAttention, RowsSharingKeysKeepTheBitsOfEachRowAlone) {
  // The row path converts each block once for the rows that share it (the query heads of a
  // grouped-query item; the queries of a short call), four rows at a time: every row must get
  // the bits it gets alone. GQA with 5 query heads per key/value head (a chunk of 4 and one
  // more), 2 tiles of keys, partial blocks, a bias per head and key padding; and MQA with 3
  // queries per head. The same tiles and one thread on both sides.
  using B = TypeParam;
  struct grouped {
    index_t H, Hkv, Lq;
  };
  each_path()([](std::string_view) {
    for (const grouped c : {grouped{10, 2, 1}, grouped{2, 1, 3}}) {
      SCOPED_TRACE(::testing::Message() << "H " << c.H << " Hkv " << c.Hkv << " Lq " << c.Lq);
      const index_t Lk = 700, Dk = 72, Dv = 40, nk = xattn::quant_blocks_per_row(Dk),
                    nv = xattn::quant_blocks_per_row(Dv), group = c.H / c.Hkv;
      const auto q = random_tensor<float, 4>({1, c.H, c.Lq, Dk}, 21, -2.0, 2.0);
      const quantized_rows<B> k(random_tensor<float, 4>({1, c.Hkv, Lk, Dk}, 22, -2.0, 2.0));
      const quantized_rows<B> v(random_tensor<float, 4>({1, c.Hkv, Lk, Dv}, 23));
      const auto bias = random_tensor<float, 4>({1, c.H, 1, Lk}, 24);
      const std::vector<index_t> lengths{Lk - 37};
      xattn::attention_options<float> opts;
      opts.mask.bias = bias.cview();
      opts.mask.kv_lengths = xattn::make_view(lengths.data(), {1});
      const auto t = tiles(0, 512, 1);
      tensor<float, 4> out({1, c.H, c.Lq, Dv}, -7.0f);
      xattn::tiled_attention<float>(q.cview(), k.blocks.cview(), v.blocks.cview(), out.view(), opts,
                                    t);
      for (index_t h = 0; h < c.H; ++h) {
        SCOPED_TRACE(::testing::Message() << "head " << h);
        const index_t g = h / group;
        const xattn::tensor_view<const float, 4> qh(q.data.data() + h * c.Lq * Dk,
                                                    {1, 1, c.Lq, Dk});
        const xattn::tensor_view<const B, 4> kh(k.blocks.data.data() + g * Lk * nk, {1, 1, Lk, nk}),
            vh(v.blocks.data.data() + g * Lk * nv, {1, 1, Lk, nv});
        xattn::attention_options<float> oh = opts;
        oh.mask.bias = xattn::tensor_view<const float, 4>(bias.data.data() + h * Lk, {1, 1, 1, Lk});
        tensor<float, 4> alone({1, 1, c.Lq, Dv}, -7.0f);
        xattn::tiled_attention<float>(qh, kh, vh, alone.view(), oh, t);
        const std::vector<float> mine(out.data.begin() + h * c.Lq * Dv,
                                      out.data.begin() + (h + 1) * c.Lq * Dv);
        EXPECT_TRUE(same_bits(mine, alone.data));
      }
    }
  });
}

TYPED_TEST(QuantizedAttention, StridedBlockViewsAndHeadsInterleaved) {
  // Blocks stored [B, L, H, nb] (as a projection writes them, heads interleaved): rows of blocks
  // strided, each row's blocks contiguous; the same bits as packed blocks.
  using B = TypeParam;
  const index_t H = 3, Lk = 40, D = 48, nb = xattn::quant_blocks_per_row(D);
  const auto q = random_tensor<float, 4>({1, H, 2, D}, 11);
  const quantized_rows<B> k(random_tensor<float, 4>({1, H, Lk, D}, 12));
  const quantized_rows<B> v(random_tensor<float, 4>({1, H, Lk, D}, 13));
  std::vector<B> ks(k.blocks.data.size()), vs(v.blocks.data.size());
  for (index_t h = 0; h < H; ++h)
    for (index_t l = 0; l < Lk; ++l)
      for (index_t b = 0; b < nb; ++b) {
        ks[std::size_t((l * H + h) * nb + b)] = k.blocks.data[std::size_t((h * Lk + l) * nb + b)];
        vs[std::size_t((l * H + h) * nb + b)] = v.blocks.data[std::size_t((h * Lk + l) * nb + b)];
      }
  const auto view = [&](const std::vector<B>& x) {
    return xattn::tensor_view<const B, 4>(x.data(), {1, H, Lk, nb}, {Lk * H * nb, nb, H * nb, 1});
  };
  each_path()([&](std::string_view) {
    tensor<float, 4> out({1, H, 2, D}, -7.0f), want = out;
    xattn::tiled_attention<float>(q.cview(), view(ks), view(vs), out.view());
    xattn::tiled_attention<float>(q.cview(), k.blocks.cview(), v.blocks.cview(), want.view());
    EXPECT_TRUE(same_bits(out.data, want.data));
  });
}

TYPED_TEST(QuantizedAttention, BadBlockViewsAreNamedErrorsAndWriteNothing) {
  using B = TypeParam;
  const auto q = random_tensor<float, 4>({1, 2, 1, 40}, 1);
  const quantized_rows<B> k(random_tensor<float, 4>({1, 2, 9, 40}, 2));
  const quantized_rows<B> v(random_tensor<float, 4>({1, 2, 9, 70}, 3));
  tensor<float, 4> out({1, 2, 1, 70}, -7.0f);
  const auto untouched = out.data;
  const auto call = [&](xattn::tensor_view<const B, 4> kk, xattn::tensor_view<const B, 4> vv,
                        xattn::tensor_view<float, 4> oo) {
    return [=] { xattn::tiled_attention<float>(q.cview(), kk, vv, oo); };
  };
  // k with 1 block per row where Dk = 40 needs 2
  const xattn::tensor_view<const B, 4> k1(k.blocks.data.data(), {1, 2, 9, 1});
  EXPECT_TRUE(throws_with<xattn::shape_error>(call(k1, v.blocks.cview(), out.view()),
                                              {"tiled_attention", "k.extent(3) is 1", "2"}));
  // out's Dv = 64 needs 2 blocks of values; v has 3
  tensor<float, 4> out64({1, 2, 1, 64}, -7.0f);
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      call(k.blocks.cview(), v.blocks.cview(), out64.view()), {"v.extent(3) is 3"}));
  // blocks of a row not contiguous
  const xattn::tensor_view<const B, 4> kstrided(k.blocks.data.data(), {1, 2, 4, 2}, {36, 18, 4, 2});
  const xattn::tensor_view<const B, 4> vshort(v.blocks.data.data(), {1, 2, 4, 3});
  EXPECT_TRUE(throws_with<xattn::shape_error>(call(kstrided, vshort, out.view()),
                                              {"k.stride(3) is 2", "contiguous"}));
  EXPECT_EQ(out.data, untouched);
  // an output overlapping the blocks
  const xattn::tensor_view<float, 4> over(
      reinterpret_cast<float*>(const_cast<B*>(k.blocks.data.data())), {1, 2, 1, 70});
  EXPECT_TRUE(throws_with<xattn::shape_error>(call(k.blocks.cview(), v.blocks.cview(), over),
                                              {"out overlaps k"}));
}

TYPED_TEST(QuantizedAttention, AModuleCacheHoldsTheQuantizedProjections) {
  // A float module encoding into a q8 or q4 cache: the keys and values are the float cache's,
  // quantized head by head; the cache's bytes are the blocks'; and forward against it is the
  // module's projections around the kernels' quantized call, bit for bit.
  using B = TypeParam;
  xattn::cross_attention_config cfg;
  cfg.model_dim = 48;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 40;  // two blocks a head, the second partial
  cfg.context_dim = 36;
  const auto w = xattn::random_weights<float>(cfg, 3);
  xattn::multi_head_cross_attention<float> mha(cfg, w);
  const index_t Bt = 2, Lq = 3, Lk = 300;  // Lk spans two of the encoder's 256-row chunks
  const auto query = random_tensor<float, 3>({Bt, Lq, 48}, 1);
  const auto context = random_tensor<float, 3>({Bt, Lk, 36}, 2);
  const auto full = mha.encode_context(context.cview());
  const auto cache = mha.template encode_context<B>(context.cview());
  EXPECT_EQ(cache.bytes(), index_t(2 * Bt * Lk * 2 * 2 * sizeof(B)));
  EXPECT_TRUE(cache.usable());
  const auto expect_quantized = [&](const xattn::tensor_view<const float, 4>& f,
                                    const xattn::tensor_view<const B, 4>& got) {
    tensor<B, 4> want({Bt, 2, Lk, 2}, B{});
    xattn::quantize(f, want.view());
    const std::vector<B> g = xattn_test::elements(got);
    EXPECT_TRUE(same_bits(g, want.data));
  };
  expect_quantized(full.keys(), cache.keys());
  expect_quantized(full.values(), cache.values());

  xattn::cross_attention_options<float> opts;
  for (int threads : xattn_test::thread_counts(2)) {
    opts.tiles.num_threads = threads;
    tensor<float, 3> out({Bt, Lq, 48}, -7.0f);
    mha.forward(query.cview(), cache, out.view(), opts);
    tensor<float, 3> qp({Bt, Lq, 160}), o({Bt, Lq, 160}), want({Bt, Lq, 48});
    w.q_proj.forward(query.cview(), qp.view());
    xattn::tiled_attention<float>(xattn::split_heads(qp.cview(), 4), cache.keys(), cache.values(),
                                  xattn::split_heads(o.view(), 4), {}, opts.tiles);
    w.out_proj.forward(o.cview(), want.view());
    EXPECT_TRUE(same_bits(out.data, want.data));
  }

  // The naive kernel does not read blocks: a named error, nothing written.
  opts.kernel = xattn::attention_kernel::naive;
  tensor<float, 3> out({Bt, Lq, 48}, -7.0f);
  const auto untouched = out.data;
  EXPECT_TRUE(
      throws_with<xattn::value_error>([&] { mha.forward(query.cview(), cache, out.view(), opts); },
                                      {"naive", xattn::quant_name<B>()}));
  EXPECT_EQ(out.data, untouched);

  // A bad context leaves the cache as it was.
  auto kept = cache;
  const auto narrow = random_tensor<float, 3>({Bt, Lk, 35}, 4);
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { mha.encode_context(narrow.cview(), narrow.cview(), kept); }, {"context"}));
  EXPECT_TRUE(same_bits(xattn_test::elements(kept.keys()), xattn_test::elements(cache.keys())));
  // A context whose projection is not finite cannot be quantized: a value_error, and the cache
  // is marked unusable (it was being written), so forward refuses it.
  auto bad = context;
  bad.data[5] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(throws_with<xattn::value_error>(
      [&] { mha.encode_context(bad.cview(), bad.cview(), kept); }, {"quantize"}));
  EXPECT_FALSE(kept.usable());
  opts.kernel = xattn::attention_kernel::tiled;
  EXPECT_TRUE(throws_with<xattn::value_error>(
      [&] { mha.forward(query.cview(), kept, out.view(), opts); }, {"unusable"}));
}

TEST(QuantizedCache, AWhisperBaseContextTakesAQuarterOrAnEighthOfTheFloatBytes) {
  xattn::cross_attention_config cfg;
  cfg.model_dim = 512;
  cfg.num_heads = 8;
  const auto w = xattn::random_weights<float>(cfg, 1);
  xattn::multi_head_cross_attention<float> mha(cfg, w);
  const auto audio = random_tensor<float, 3>({1, 1500, 512}, 2);
  const double f = double(mha.encode_context(audio.cview()).bytes());
  const double q8 = double(mha.encode_context<xattn::q8_block>(audio.cview()).bytes());
  const double q4 = double(mha.encode_context<xattn::q4_block>(audio.cview()).bytes());
  EXPECT_EQ(f, 2.0 * 1500 * 512 * 4);
  EXPECT_EQ(q8, 2.0 * 1500 * 8 * 2 * 34);  // 0.266x
  EXPECT_EQ(q4, 2.0 * 1500 * 8 * 2 * 18);  // 0.141x
  EXPECT_LE(q8 / f, 0.27);
  EXPECT_LE(q4 / f, 0.15);
}

}  // namespace
