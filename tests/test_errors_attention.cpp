// SPDX-License-Identifier: MIT
// Every way a kernel call can be rejected, one test each, for naive_attention and
// tiled_attention: the error's type, a message naming the argument, and no byte of any buffer
// (outputs included) changed. Views that overlap an input or each other are rejected too.
#include "xattn/attention.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"

#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::tensor;
using xattn_test::throws_with;

constexpr float sentinel = -7.25f;

// One kernel call: a valid B = 2, H = 4, Lq = 3, Lk = 5, Dk = 6, Dv = 7, Hkv = 2 problem that asks
// for every output, which each test spoils in one way. spare is memory for views built by hand.
struct call {
  tensor<float, 4> qb = xattn_test::random_tensor<float, 4>({2, 4, 3, 6}, 1);
  tensor<float, 4> kb = xattn_test::random_tensor<float, 4>({2, 2, 5, 6}, 2);
  tensor<float, 4> vb = xattn_test::random_tensor<float, 4>({2, 2, 5, 7}, 3);
  tensor<float, 4> ob{{2, 4, 3, 7}, sentinel}, wb{{2, 4, 3, 5}, sentinel};
  tensor<float, 3> lb{{2, 4, 3}, sentinel};
  std::vector<float> spare = std::vector<float>(4096, sentinel);

  xattn::tensor_view<const float, 4> q = qb.cview(), k = kb.cview(), v = vb.cview();
  xattn::tensor_view<float, 4> out = ob.view();
  xattn::attention_options<float> opts;
  xattn::tile_options tiles;

  call() {
    opts.weights_out = wb.view();
    opts.lse_out = lb.view();
  }

  // A packed view of spare.
  xattn::tensor_view<float, 4> spare_view(index_t b, index_t h, index_t l, index_t d) {
    return xattn::make_view(spare.data(), {b, h, l, d});
  }

  std::vector<float> snapshot() const {
    std::vector<float> all;
    for (const auto* t : {&qb, &kb, &vb, &ob, &wb})
      all.insert(all.end(), t->data.begin(), t->data.end());
    all.insert(all.end(), lb.data.begin(), lb.data.end());
    all.insert(all.end(), spare.begin(), spare.end());
    return all;
  }
};

// Runs naive_attention and tiled_attention (with c.tiles) on c: each must throw E whose message
// contains `what` (the argument's part, after "<function>: "), and leave every buffer as it was.
// naive_attention's message must also start with its name.
template <class E = xattn::shape_error>
::testing::AssertionResult rejects(call& c, const std::string& what, bool naive = true,
                                   bool tiled = true) {
  const std::vector<float> before = c.snapshot();
  const auto same_bits = [&] {
    const std::vector<float> after = c.snapshot();
    return std::memcmp(before.data(), after.data(), before.size() * sizeof(float)) == 0;
  };
  if (naive) {
    const std::string full = "naive_attention: " + what;
    auto r = throws_with<E>([&] { xattn::naive_attention<float>(c.q, c.k, c.v, c.out, c.opts); },
                            {full.c_str()});
    if (!r) return r << " (naive_attention)";
    if (!same_bits()) return ::testing::AssertionFailure() << "naive_attention wrote a buffer";
  }
  if (tiled) {
    auto r = throws_with<E>(
        [&] { xattn::tiled_attention<float>(c.q, c.k, c.v, c.out, c.opts, c.tiles); },
        {"_attention: ", what.c_str()});
    if (!r) return r << " (tiled_attention " << xattn_test::describe(c.tiles) << ")";
    if (!same_bits()) return ::testing::AssertionFailure() << "tiled_attention wrote a buffer";
  }
  return ::testing::AssertionSuccess();
}

// ---- q, k, v and out extents -------------------------------------------------------------------

TEST(KernelErrors, RejectsKBatchExtent) {
  call c;
  c.k = c.spare_view(3, 2, 5, 6);
  EXPECT_TRUE(rejects(c, "k.extent(0) is 3, expected 2"));
}

TEST(KernelErrors, RejectsKHeadsThatDoNotDivideQHeads) {
  call c;
  c.k = c.spare_view(2, 3, 5, 6);
  c.v = c.spare_view(2, 3, 5, 7);
  EXPECT_TRUE(rejects(c, "k.extent(1) is 3, expected a divisor of q.extent(1) = 4"));
}

TEST(KernelErrors, RejectsZeroKHeadsWithQHeads) {
  call c;
  c.k = c.spare_view(2, 0, 5, 6);
  c.v = c.spare_view(2, 0, 5, 7);
  EXPECT_TRUE(rejects(c, "k.extent(1) is 0, expected a divisor of q.extent(1) = 4"));
}

TEST(KernelErrors, RejectsKHeadDim) {
  call c;
  c.k = c.spare_view(2, 2, 5, 8);
  EXPECT_TRUE(rejects(c, "k.extent(3) is 8, expected 6"));
}

TEST(KernelErrors, RejectsVBatchExtent) {
  call c;
  c.v = c.spare_view(1, 2, 5, 7);
  EXPECT_TRUE(rejects(c, "v.extent(0) is 1, expected 2"));
}

TEST(KernelErrors, RejectsVHeadsUnlikeKHeads) {
  call c;
  c.v = c.spare_view(2, 4, 5, 7);
  EXPECT_TRUE(rejects(c, "v.extent(1) is 4, expected 2"));
}

TEST(KernelErrors, RejectsVLengthUnlikeKLength) {
  call c;
  c.v = c.spare_view(2, 2, 9, 7);
  EXPECT_TRUE(rejects(c, "v.extent(2) is 9, expected 5"));
}

TEST(KernelErrors, RejectsOutExtents) {
  const std::array<index_t, 4> bad[] = {{1, 4, 3, 7}, {2, 2, 3, 7}, {2, 4, 4, 7}, {2, 4, 3, 6}};
  const char* what[] = {"out.extent(0) is 1, expected 2", "out.extent(1) is 2, expected 4",
                        "out.extent(2) is 4, expected 3", "out.extent(3) is 6, expected 7"};
  for (int r = 0; r < 4; ++r) {
    call c;
    c.out = c.spare_view(bad[r][0], bad[r][1], bad[r][2], bad[r][3]);
    EXPECT_TRUE(rejects(c, what[r]));
  }
}

// ---- the scale ---------------------------------------------------------------------------------

TEST(KernelErrors, RejectsNaNScale) {
  call c;
  c.opts.scale = std::numeric_limits<double>::quiet_NaN();
  EXPECT_TRUE(rejects<xattn::value_error>(c, "scale is nan, expected a finite number"));
}

TEST(KernelErrors, RejectsInfiniteScale) {
  call c;
  c.opts.scale = -std::numeric_limits<double>::infinity();
  EXPECT_TRUE(rejects<xattn::value_error>(c, "scale is -inf, expected a finite number"));
}

TEST(KernelErrors, RejectsScaleBeyondTheElementTypesRange) {
  call c;
  c.opts.scale = 1e300;  // finite as a double, infinite as a float
  EXPECT_TRUE(rejects<xattn::value_error>(c, "scale is 1e+300, expected a magnitude of at most"));
}

// ---- masks -------------------------------------------------------------------------------------

TEST(KernelErrors, RejectsKvLengthsExtent) {
  call c;
  const index_t three[] = {5, 5, 5};
  c.opts.mask.kv_lengths = xattn::make_view(three, {3});
  EXPECT_TRUE(rejects(c, "mask.kv_lengths.extent(0) is 3, expected 2"));
}

TEST(KernelErrors, RejectsNegativeKvLength) {
  call c;
  const index_t lengths[] = {-1, 5};
  c.opts.mask.kv_lengths = xattn::make_view(lengths, {2});
  EXPECT_TRUE(
      rejects<xattn::value_error>(c, "mask.kv_lengths(0) is -1, expected a value in [0, 5]"));
}

TEST(KernelErrors, RejectsKvLengthPastKvLen) {
  call c;
  const index_t lengths[] = {5, 6};
  c.opts.mask.kv_lengths = xattn::make_view(lengths, {2});
  EXPECT_TRUE(
      rejects<xattn::value_error>(c, "mask.kv_lengths(1) is 6, expected a value in [0, 5]"));
}

TEST(KernelErrors, RejectsAllowedMaskThatDoesNotBroadcast) {
  const std::array<index_t, 4> bad[] = {{3, 1, 1, 1}, {1, 2, 1, 1}, {1, 1, 2, 1}, {1, 1, 1, 4}};
  const char* what[] = {"mask.allowed.extent(0) is 3, expected 1 or 2",
                        "mask.allowed.extent(1) is 2, expected 1 or 4",
                        "mask.allowed.extent(2) is 2, expected 1 or 3",
                        "mask.allowed.extent(3) is 4, expected 1 or 5"};
  bool allowed[64] = {};
  for (int r = 0; r < 4; ++r) {
    call c;
    c.opts.mask.allowed = xattn::tensor_view<const bool, 4>(allowed, bad[r]);
    EXPECT_TRUE(rejects(c, what[r]));
  }
}

TEST(KernelErrors, RejectsBiasThatDoesNotBroadcast) {
  const std::array<index_t, 4> bad[] = {{4, 4, 3, 5}, {2, 3, 3, 5}, {2, 4, 5, 5}, {2, 4, 3, 3}};
  const char* what[] = {
      "mask.bias.extent(0) is 4, expected 1 or 2", "mask.bias.extent(1) is 3, expected 1 or 4",
      "mask.bias.extent(2) is 5, expected 1 or 3", "mask.bias.extent(3) is 3, expected 1 or 5"};
  const std::vector<float> bias(1024, 0.0f);
  for (int r = 0; r < 4; ++r) {
    call c;
    c.opts.mask.bias = xattn::tensor_view<const float, 4>(bias.data(), bad[r]);
    EXPECT_TRUE(rejects(c, what[r]));
  }
}

// ---- extra outputs -----------------------------------------------------------------------------

TEST(KernelErrors, RejectsWeightsOutExtents) {
  const std::array<index_t, 4> bad[] = {{1, 4, 3, 5}, {2, 1, 3, 5}, {2, 4, 1, 5}, {2, 4, 3, 6}};
  const char* what[] = {
      "weights_out.extent(0) is 1, expected 2", "weights_out.extent(1) is 1, expected 4",
      "weights_out.extent(2) is 1, expected 3", "weights_out.extent(3) is 6, expected 5"};
  for (int r = 0; r < 4; ++r) {
    call c;
    c.opts.weights_out = c.spare_view(bad[r][0], bad[r][1], bad[r][2], bad[r][3]);
    EXPECT_TRUE(rejects(c, what[r]));
  }
}

TEST(KernelErrors, RejectsLseOutExtents) {
  const std::array<index_t, 3> bad[] = {{3, 4, 3}, {2, 5, 3}, {2, 4, 2}};
  const char* what[] = {"lse_out.extent(0) is 3, expected 2", "lse_out.extent(1) is 5, expected 4",
                        "lse_out.extent(2) is 2, expected 3"};
  for (int r = 0; r < 3; ++r) {
    call c;
    c.opts.lse_out = xattn::tensor_view<float, 3>(c.spare.data(), bad[r]);
    EXPECT_TRUE(rejects(c, what[r]));
  }
}

// ---- outputs that share memory -----------------------------------------------------------------

TEST(KernelErrors, RejectsOutOverlappingQ) {
  call c;
  // out [2, 4, 3, 7] and q [2, 4, 3, 6] both start in spare, q 100 floats in.
  c.out = c.spare_view(2, 4, 3, 7);
  c.q = xattn::make_view(static_cast<const float*>(c.spare.data() + 100), {2, 4, 3, 6});
  EXPECT_TRUE(rejects(c, "out overlaps q in memory"));
}

TEST(KernelErrors, RejectsOutOverlappingK) {
  call c;
  // out's last element lands on k's first: the ranges share one element.
  c.k = xattn::make_view(static_cast<const float*>(c.spare.data() + 167), {2, 2, 5, 6});
  c.out = c.spare_view(2, 4, 3, 7);
  EXPECT_TRUE(rejects(c, "out overlaps k in memory"));
}

TEST(KernelErrors, RejectsOutOverlappingV) {
  call c;
  c.out = xattn::make_view(c.vb.data.data(), {2, 4, 3, 7});  // out written over v
  EXPECT_TRUE(rejects(c, "out overlaps v in memory"));
}

TEST(KernelErrors, RejectsOutOverlappingKvLengths) {
  call c;
  std::vector<index_t> storage(200, 5);
  c.out = xattn::make_view(reinterpret_cast<float*>(storage.data()), {2, 4, 3, 7});
  c.opts.mask.kv_lengths = xattn::make_view(static_cast<const index_t*>(storage.data()), {2});
  EXPECT_TRUE(rejects(c, "out overlaps mask.kv_lengths in memory"));
  for (index_t x : storage) EXPECT_EQ(x, 5);
}

TEST(KernelErrors, RejectsOutOverlappingAllowedMask) {
  call c;
  // An output placed over the bytes of a boolean mask.
  std::memset(c.spare.data(), 0, 64);  // valid bools (false) in the mask's bytes
  const auto bytes = reinterpret_cast<bool*>(c.spare.data());
  c.opts.mask.allowed = xattn::make_view(static_cast<const bool*>(bytes) + 8, {1, 1, 3, 5});
  c.out = c.spare_view(2, 4, 3, 7);
  EXPECT_TRUE(rejects(c, "out overlaps mask.allowed in memory"));
}

TEST(KernelErrors, RejectsOutOverlappingBias) {
  call c;
  c.opts.mask.bias = xattn::make_view(static_cast<const float*>(c.ob.data.data()), {1, 1, 3, 5});
  EXPECT_TRUE(rejects(c, "out overlaps mask.bias in memory"));
}

TEST(KernelErrors, RejectsOutInterleavedWithAnInputWithoutSharingElements) {
  // The check compares first-to-last byte ranges: out in the even floats of a buffer and v in
  // the odd ones share no element, but are rejected (documented as conservative).
  call c;
  c.out = xattn::make_view(c.spare.data(), {2, 4, 3, 7}, {168, 42, 14, 2});
  c.v = xattn::make_view(static_cast<const float*>(c.spare.data() + 1), {2, 2, 5, 7},
                         {140, 70, 14, 2});
  EXPECT_TRUE(rejects(c, "out overlaps v in memory"));
}

TEST(KernelErrors, RejectsWeightsOutOverlappingAnInput) {
  call c;
  c.opts.weights_out = xattn::make_view(c.qb.data.data(), {2, 4, 3, 5});
  EXPECT_TRUE(rejects(c, "weights_out overlaps q in memory"));
}

TEST(KernelErrors, RejectsWeightsOutOverlappingOut) {
  call c;
  c.opts.weights_out = xattn::make_view(c.ob.data.data() + 10, {2, 4, 3, 5});
  EXPECT_TRUE(rejects(c, "weights_out overlaps out in memory"));
}

TEST(KernelErrors, RejectsLseOutOverlappingAnInput) {
  call c;
  c.opts.lse_out = xattn::make_view(c.kb.data.data() + 3, {2, 4, 3});
  EXPECT_TRUE(rejects(c, "lse_out overlaps k in memory"));
}

TEST(KernelErrors, RejectsLseOutOverlappingOut) {
  call c;
  c.opts.lse_out = xattn::make_view(c.ob.data.data() + 140, {2, 4, 3});
  EXPECT_TRUE(rejects(c, "lse_out overlaps out in memory"));
}

TEST(KernelErrors, RejectsLseOutOverlappingWeightsOut) {
  call c;
  c.opts.lse_out = xattn::make_view(c.wb.data.data(), {2, 4, 3});
  EXPECT_TRUE(rejects(c, "lse_out overlaps weights_out in memory"));
}

TEST(KernelErrors, RejectsOutWhoseElementsShareMemory) {
  call c;
  c.out = xattn::make_view(c.spare.data(), {2, 4, 3, 7}, {84, 21, 0, 1});  // rows on one another
  EXPECT_TRUE(rejects(c, "out.stride(2) is 0, so elements of out would share memory"));
}

TEST(KernelErrors, RejectsOutWithInterleavedStrides) {
  call c;
  // Heads 3 floats apart but rows 7 wide: head h's row overlaps head h + 1's.
  c.out = xattn::make_view(c.spare.data(), {2, 4, 3, 7}, {200, 3, 40, 1});
  EXPECT_TRUE(rejects(c, "out.stride(1) is 3, so elements of out would share memory"));
}

TEST(KernelErrors, RejectsWeightsOutWhoseElementsShareMemory) {
  call c;
  c.opts.weights_out = xattn::make_view(c.wb.data.data(), {2, 4, 3, 5}, {0, 15, 5, 1});
  EXPECT_TRUE(rejects(c, "weights_out.stride(0) is 0, so elements of weights_out"));
}

TEST(KernelErrors, RejectsLseOutWhoseElementsShareMemory) {
  call c;
  c.opts.lse_out = xattn::make_view(c.lb.data.data(), {2, 4, 3}, {12, 3, 0});
  EXPECT_TRUE(rejects(c, "lse_out.stride(2) is 0, so elements of lse_out"));
}

TEST(KernelErrors, AcceptsInputsThatShareMemoryAndOutputsThatDoNot) {
  // Inputs may alias freely (self-attention passes one buffer as q, k and v; a broadcast input
  // has stride 0); outputs padded, permuted or side by side in one buffer are fine.
  std::vector<float> x(2 * 4 * 5 * 6);
  for (std::size_t n = 0; n < x.size(); ++n) x[n] = float(n % 7) * 0.1f;
  const auto qkv = xattn::make_view(static_cast<const float*>(x.data()), {2, 4, 5, 6});
  std::vector<float> outs(4096, 0.0f);
  float* base = outs.data();
  xattn::attention_options<float> opts;
  opts.weights_out = xattn::make_view(base + 300, {2, 4, 5, 5}, {100, 25, 1, 5});  // permuted
  opts.lse_out = xattn::make_view(base + 500, {2, 4, 5}, {24, 6, 1});              // padded
  const auto out = xattn::make_view(base, {2, 4, 5, 6}, {4 * 5 * 6, 6, 24, 1});    // split heads
  const float one = 1.0f;
  opts.mask.bias = xattn::make_view(&one, {2, 4, 5, 5}, {0, 0, 0, 0});
  for (const auto& k : xattn_test::all_kernels<float>()) {
    SCOPED_TRACE(k.name);
    EXPECT_NO_THROW(k.run(qkv, qkv, qkv, out, opts));
  }
}

TEST(KernelErrors, EmptyOutputsNeverOverlap) {
  // Views without elements touch no memory, wherever they point.
  std::vector<float> x(64, 1.0f);
  const auto q = xattn::make_view(static_cast<const float*>(x.data()), {2, 4, 0, 6});
  const auto k = xattn::make_view(static_cast<const float*>(x.data()), {2, 2, 5, 6});
  const auto v = xattn::make_view(static_cast<const float*>(x.data()), {2, 2, 5, 0});
  const auto out = xattn::make_view(x.data(), {2, 4, 0, 0});
  for (const auto& kern : xattn_test::all_kernels<float>()) {
    SCOPED_TRACE(kern.name);
    EXPECT_NO_THROW(kern.run(q, k, v, out, {}));
  }
}

// ---- sizes whose products overflow -------------------------------------------------------------

TEST(KernelErrors, NaiveRejectsAScoreMatrixTooLargeToCount) {
  // Lq = Lk = 2^40 with Dk = Dv = 0: every view is empty (and valid), but the [Lq, Lk] score
  // matrix naive_attention would allocate has 2^80 elements. Reported before any allocation.
  call c;
  const index_t huge = index_t(1) << 40;
  c.q = xattn::tensor_view<const float, 4>(nullptr, {1, 1, huge, 0});
  c.k = xattn::tensor_view<const float, 4>(nullptr, {1, 1, huge, 0});
  c.v = xattn::tensor_view<const float, 4>(nullptr, {1, 1, huge, 0});
  c.out = xattn::tensor_view<float, 4>(nullptr, {1, 1, huge, 0});
  c.opts = {};
  EXPECT_TRUE(rejects(c, "1099511627776 * 1099511627776 overflows the index type", true, false));
}

TEST(KernelErrors, ScratchBytesRejectsNegativeSizes) {
  xattn::attention_shape s;
  s.q_len = -3;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { (void)xattn::naive_attention_scratch_bytes<float>(s); },
      {"naive_attention_scratch_bytes: shape.q_len is -3, expected >= 0"}));
  s.q_len = 3;
  s.kv_len = -1;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { (void)xattn::naive_attention_scratch_bytes<float>(s); },
      {"naive_attention_scratch_bytes: shape.kv_len is -1, expected >= 0"}));
}

TEST(KernelErrors, ScratchBytesRejectsKvHeadsThatDoNotDivideHeads) {
  xattn::attention_shape s;
  s.num_heads = 6;
  s.num_kv_heads = 4;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { (void)xattn::naive_attention_scratch_bytes<double>(s); },
      {"naive_attention_scratch_bytes: shape.num_kv_heads is 4, expected a divisor of "
       "shape.num_heads = 6"}));
}

TEST(KernelErrors, ScratchBytesRejectsAByteCountThatOverflows) {
  xattn::attention_shape s;
  s.q_len = s.kv_len = index_t(1) << 31;  // 2^62 scores fit, 2^65 bytes do not
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { (void)xattn::naive_attention_scratch_bytes<double>(s); },
      {"naive_attention", "overflows the index type"}));
}

// ---- views -------------------------------------------------------------------------------------

TEST(ViewErrors, PackedStridesOfHugeExtentsNeverOverflow) {
  // Found by fuzzing: packed strides were computed, and overflowed, before the extents were
  // checked. Now an empty view of huge extents is fine and a non-empty one is a shape_error.
  float x = 0;
  const index_t big = index_t(1) << 62;
  const auto empty = xattn::make_view(&x, {0, big, big});
  EXPECT_EQ(empty.size(), 0);
  EXPECT_TRUE(empty.is_packed());
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::make_view(&x, {3, big, 2});
      },
      {"tensor_view", "overflows the index type"}));
}

// ---- ranks -------------------------------------------------------------------------------------

TEST(KernelErrors, AWrongRankDoesNotCompile) {
  // Ranks are part of the view's type: a [Lq, Dk] view is not a [B, H, Lq, Dk] one.
  using v4 = xattn::tensor_view<const float, 4>;
  using v3 = xattn::tensor_view<const float, 3>;
  using o4 = xattn::tensor_view<float, 4>;
  using fn = void (*)(v4, v4, v4, o4, const xattn::attention_options<float>&);
  static_assert(std::is_invocable_v<fn, v4, v4, v4, o4, xattn::attention_options<float>>);
  static_assert(!std::is_invocable_v<fn, v3, v4, v4, o4, xattn::attention_options<float>>);
  static_assert(!std::is_convertible_v<v3, v4>);
  static_assert(!std::is_convertible_v<xattn::tensor_view<float, 2>, o4>);
  SUCCEED();
}

// ---- tile options (tiled_attention only) --------------------------------------------------------
// tiled_attention validates its tile_options: a set field must be >= 1, and num_threads at most
// 4096 (with or without OpenMP; without it every count runs serially).

TEST(KernelErrors, TiledRejectsZeroQTile) {
  call c;
  c.tiles.q_tile = 0;
  EXPECT_TRUE(rejects<xattn::value_error>(c, "q_tile", false, true));
}

TEST(KernelErrors, TiledRejectsNegativeKvTile) {
  call c;
  c.tiles.kv_tile = -4;
  EXPECT_TRUE(rejects<xattn::value_error>(c, "kv_tile", false, true));
}

TEST(KernelErrors, TiledRejectsZeroThreads) {
  call c;
  c.tiles.num_threads = 0;
  EXPECT_TRUE(rejects<xattn::value_error>(c, "num_threads", false, true));
}

TEST(KernelErrors, TiledRejectsThreadCountsPastTheLimit) {
  call c;
  c.tiles.num_threads = 4097;
  EXPECT_TRUE(rejects<xattn::value_error>(c, "num_threads", false, true));
}

// ---- attention(Q, K, V) ------------------------------------------------------------------------

TEST(EigenAttentionErrors, RejectsWeightsOutOverlappingQ) {
  xattn::row_matrix<float> Q = xattn::row_matrix<float>::Random(4, 4);
  const xattn::row_matrix<float> K = xattn::row_matrix<float>::Random(4, 4),
                                 V = xattn::row_matrix<float>::Random(4, 3);
  const xattn::row_matrix<float> before = Q;
  xattn::attention_options<float> opts;
  opts.weights_out = xattn::to_rank<4>(xattn::make_view(Q));  // weights written over Q
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { (void)xattn::attention(Q, K, V, opts); },
                                              {"naive_attention: weights_out overlaps q"}));
  EXPECT_EQ(Q, before);
}

}  // namespace
