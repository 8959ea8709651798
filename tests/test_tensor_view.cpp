// SPDX-License-Identifier: MIT
// tensor_view: extents, strides, element access, views of buffers and of Eigen storage, the
// rearrangements that read heads in place, and the errors for impossible views.
#include "xattn/tensor_view.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <array>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::throws_with;

std::vector<float> iota(index_t n) {
  std::vector<float> v(std::size_t(n), 0.0f);
  std::iota(v.begin(), v.end(), 0.0f);
  return v;
}

TEST(TensorView, PackedViewHasRowMajorStrides) {
  auto buf = iota(2 * 3 * 4 * 5);
  const auto v = xattn::make_view(buf.data(), {2, 3, 4, 5});
  static_assert(decltype(v)::rank() == 4);
  EXPECT_EQ(v.extents(), (std::array<index_t, 4>{2, 3, 4, 5}));
  EXPECT_EQ(v.strides(), (std::array<index_t, 4>{60, 20, 5, 1}));
  EXPECT_EQ(v.size(), 120);
  EXPECT_TRUE(v.is_packed());
  EXPECT_FALSE(v.empty());
  EXPECT_EQ(v(1, 2, 3, 4), 119.0f);
  EXPECT_EQ(v(1, 0, 2, 1), 60.0f + 10.0f + 1.0f);
  v(0, 0, 0, 1) = -1.0f;  // a mutable view writes through
  EXPECT_EQ(buf[1], -1.0f);
}

TEST(TensorView, DefaultViewIsNullAndEmpty) {
  const xattn::tensor_view<const double, 3> v;
  EXPECT_EQ(v.data(), nullptr);
  EXPECT_EQ(v.size(), 0);
  EXPECT_TRUE(v.empty());
}

TEST(TensorView, ZeroExtentViewMayBeNull) {
  const xattn::tensor_view<float, 2> v(nullptr, {0, 7});
  EXPECT_TRUE(v.empty());
  EXPECT_TRUE(v.is_packed());
}

TEST(TensorView, ExplicitStridesAddressElements) {
  auto buf = iota(100);
  // Every other element of rows 10 apart.
  const auto v = xattn::make_view(buf.data(), {3, 4}, {10, 2});
  EXPECT_EQ(v(2, 3), 26.0f);
  EXPECT_FALSE(v.is_packed());
}

TEST(TensorView, ConvertsToConstView) {
  auto buf = iota(6);
  const xattn::tensor_view<float, 2> m = xattn::make_view(buf.data(), {2, 3});
  const xattn::tensor_view<const float, 2> c = m;
  EXPECT_EQ(c.data(), m.data());
  EXPECT_EQ(c(1, 2), 5.0f);
  static_assert(
      !std::is_convertible_v<xattn::tensor_view<const float, 2>, xattn::tensor_view<float, 2>>,
      "a const view must not convert to a mutable one");
}

TEST(TensorView, SelectFixesOneDimension) {
  auto buf = iota(2 * 3 * 4);
  const auto v = xattn::make_view(buf.data(), {2, 3, 4});
  const auto row = v.select(0, 1);  // [3, 4]
  EXPECT_EQ(row.extents(), (std::array<index_t, 2>{3, 4}));
  EXPECT_EQ(row(2, 1), v(1, 2, 1));
  const auto col = v.select(2, 3);  // [2, 3], strides 12, 4
  EXPECT_EQ(col.strides(), (std::array<index_t, 2>{12, 4}));
  EXPECT_EQ(col(1, 2), v(1, 2, 3));
}

TEST(TensorView, SelectOfAnEmptyViewTakesNoOffset) {
  // An empty view's strides are not checked, so they may be anything; select must not offset
  // the pointer by them (it did, and the pointer overflowed) and hands on strides of 0.
  float buf[1] = {};
  constexpr index_t wild = std::numeric_limits<index_t>::max() / 2;
  const xattn::tensor_view<float, 3> v(buf, {3, 0, 4}, {wild, wild, wild});
  const auto s = v.select(0, 2);
  EXPECT_EQ(s.data(), buf);
  EXPECT_EQ(s.extents(), (std::array<index_t, 2>{0, 4}));
  EXPECT_EQ(s.strides(), (std::array<index_t, 2>{0, 0}));
  EXPECT_EQ(v.select(2, 3).data(), buf);
}

TEST(TensorView, PermuteReordersWithoutCopying) {
  auto buf = iota(2 * 5 * 3 * 4);  // [B, L, H, D]
  const auto blhd = xattn::make_view(buf.data(), {2, 5, 3, 4});
  const auto bhld = xattn::permute(blhd, {0, 2, 1, 3});
  EXPECT_EQ(bhld.extents(), (std::array<index_t, 4>{2, 3, 5, 4}));
  EXPECT_EQ(bhld.data(), blhd.data());
  for (index_t b = 0; b < 2; ++b)
    for (index_t l = 0; l < 5; ++l)
      for (index_t h = 0; h < 3; ++h)
        for (index_t d = 0; d < 4; ++d) ASSERT_EQ(&bhld(b, h, l, d), &blhd(b, l, h, d));
}

TEST(TensorView, SplitHeadsReadsAProjectionBufferInPlace) {
  auto buf = iota(2 * 5 * 12);  // [B, L, H*D] with H = 3, D = 4
  const auto x = xattn::make_view(buf.data(), {2, 5, 12});
  const auto heads = xattn::split_heads(x, 3);  // [B, H, L, D]
  EXPECT_EQ(heads.extents(), (std::array<index_t, 4>{2, 3, 5, 4}));
  for (index_t b = 0; b < 2; ++b)
    for (index_t h = 0; h < 3; ++h)
      for (index_t l = 0; l < 5; ++l)
        for (index_t d = 0; d < 4; ++d) ASSERT_EQ(&heads(b, h, l, d), &x(b, l, h * 4 + d));
}

TEST(TensorView, SplitHeadsOfAnEmptyBufferTakesNoProductOfItsStrides) {
  // d * stride(2) overflowed for an empty x with a wild stride.
  float buf[1] = {};
  constexpr index_t wild = std::numeric_limits<index_t>::max() / 2 + 1;
  const xattn::tensor_view<float, 3> x(buf, {2, 0, 8}, {1, 1, wild});
  const auto heads = xattn::split_heads(x, 4);
  EXPECT_EQ(heads.data(), buf);
  EXPECT_EQ(heads.extents(), (std::array<index_t, 4>{2, 4, 0, 2}));
  EXPECT_EQ(heads.strides(), (std::array<index_t, 4>{0, 0, 0, 0}));
}

TEST(TensorView, ToRankPrependsBroadcastDimensions) {
  auto buf = iota(6);
  const auto m = xattn::to_rank<4>(xattn::make_view(buf.data(), {2, 3}));
  EXPECT_EQ(m.extents(), (std::array<index_t, 4>{1, 1, 2, 3}));
  EXPECT_EQ(m(0, 0, 1, 2), 5.0f);
}

TEST(TensorView, ViewsEigenStorageOfEitherOrder) {
  Eigen::MatrixXf col(3, 4);  // column-major
  xattn::row_matrix<float> row(3, 4);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 4; ++j) col(i, j) = row(i, j) = float(10 * i + j);
  const auto cv = xattn::make_view(col), rv = xattn::make_view(row);
  EXPECT_EQ(cv.strides(), (std::array<index_t, 2>{1, 3}));
  EXPECT_EQ(rv.strides(), (std::array<index_t, 2>{4, 1}));
  for (index_t i = 0; i < 3; ++i)
    for (index_t j = 0; j < 4; ++j) {
      EXPECT_EQ(cv(i, j), col(i, j));
      EXPECT_EQ(rv(i, j), row(i, j));
    }
  cv(2, 3) = 99.0f;  // a view of a mutable matrix writes through
  EXPECT_EQ(col(2, 3), 99.0f);
}

TEST(TensorView, ViewsBlocksMapsAndConstMatrices) {
  Eigen::MatrixXd m = Eigen::MatrixXd::Random(6, 5);
  const auto block = xattn::make_view(m.block(1, 2, 3, 2));
  EXPECT_EQ(block.extents(), (std::array<index_t, 2>{3, 2}));
  EXPECT_EQ(block(2, 1), m(3, 3));

  const Eigen::MatrixXd& cm = m;
  const auto cv = xattn::make_view(cm);
  static_assert(std::is_same_v<decltype(cv), const xattn::tensor_view<const double, 2>>);
  EXPECT_EQ(cv(4, 4), m(4, 4));

  std::vector<double> raw(12);
  Eigen::Map<xattn::row_matrix<double>, 0, Eigen::OuterStride<>> map(raw.data(), 2, 4,
                                                                     Eigen::OuterStride<>(6));
  const auto mv = xattn::make_view(map);
  EXPECT_EQ(mv.strides(), (std::array<index_t, 2>{6, 1}));
  mv(1, 3) = 5.0;
  EXPECT_EQ(raw[9], 5.0);
}

TEST(TensorView, RejectsImpossibleViews) {
  float x = 0;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::make_view(&x, {2, -3});
      },
      {"tensor_view: extent(1) is -3, expected >= 0"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::make_view(&x, {2, 3}, {3, -1});
      },
      {"tensor_view: stride(1) is -1, expected >= 0"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::make_view(static_cast<float*>(nullptr), {2, 3});
      },
      {"tensor_view: data is null but the view has 6 elements"}));
  const index_t big = index_t(1) << 40;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::make_view(&x, {big, big});
      },
      {"tensor_view", "overflows the index type"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::make_view(&x, {4, 4}, {std::numeric_limits<index_t>::max() / 2, 1});
      },
      {"tensor_view", "overflows the index type"}));
}

TEST(TensorView, RejectsBadRearrangements) {
  auto buf = iota(24);
  const auto v = xattn::make_view(buf.data(), {2, 3, 4});
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::permute(v, {0, 0, 1});
      },
      {"permute: order is not a permutation of 0..2"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::permute(v, {0, 1, 3});
      },
      {"permute: order is not a permutation of 0..2"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] { (void)xattn::split_heads(v, 3); },
      {"split_heads: x.extent(2) is 4, not a multiple of num_heads = 3"}));
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { (void)xattn::split_heads(v, 0); },
                                              {"split_heads: num_heads is 0, expected >= 1"}));
}

}  // namespace
