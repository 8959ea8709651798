// SPDX-License-Identifier: MIT
// linear<T>: y = x Wᵀ + b against a long-double triple loop, on packed, column-sliced and fully
// strided views, with and without bias, and every shape error.
#include "xattn/projection.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::all_close;
using xattn_test::random_tensor;
using xattn_test::tensor;
using xattn_test::throws_with;

template <class T>
class Linear : public ::testing::Test {};
TYPED_TEST_SUITE(Linear, xattn_test::element_types, );

// Rounding of a dot product of n terms drawn from [-1, 1]: about eps·sqrt(n) per output.
template <class T>
double linear_tol(index_t in_features) {
  return xattn_test::attention_tol<T>(in_features, 1, 0.0);
}

template <class T>
xattn::linear<T> random_linear(index_t out, index_t in, bool bias, unsigned seed) {
  xattn::linear<T> l(out, in, bias);
  const auto w = random_tensor<T, 2>({out, in}, seed);
  const auto b = random_tensor<T, 1>({out}, seed + 1);
  for (index_t o = 0; o < out; ++o) {
    for (index_t i = 0; i < in; ++i) l.weight(o, i) = w.data[std::size_t(o * in + i)];
    if (bias) l.bias(o) = b.data[std::size_t(o)];
  }
  return l;
}

// y = x Wᵀ + b by definition, in long double, packed [B, L, out].
template <class T>
std::vector<long double> reference(const xattn::linear<T>& l,
                                   const xattn::tensor_view<const T, 3>& x) {
  std::vector<long double> y;
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t r = 0; r < x.extent(1); ++r)
      for (index_t o = 0; o < l.out_features(); ++o) {
        long double acc = l.has_bias() ? static_cast<long double>(l.bias(o)) : 0.0L;
        for (index_t i = 0; i < l.in_features(); ++i)
          acc += static_cast<long double>(x(b, r, i)) * static_cast<long double>(l.weight(o, i));
        y.push_back(acc);
      }
  return y;
}

template <class T>
std::vector<T> elements3(const xattn::tensor_view<T, 3>& v) {
  std::vector<T> out;
  for (index_t a = 0; a < v.extent(0); ++a)
    for (index_t b = 0; b < v.extent(1); ++b)
      for (index_t c = 0; c < v.extent(2); ++c) out.push_back(v(a, b, c));
  return out;
}

TYPED_TEST(Linear, PackedBatchMatchesDefinitionWithAndWithoutBias) {
  using T = TypeParam;
  // 21 rows go through GEMM; 2 and 4 rows (decoder steps) through one GEMV per row.
  const index_t shapes[3][2] = {{3, 7}, {2, 1}, {1, 4}};  // [B, L]
  for (const auto& bl : shapes)
    for (bool bias : {true, false}) {
      const index_t batch = bl[0], len = bl[1];
      const auto l = random_linear<T>(24, 40, bias, 3);
      const auto x = random_tensor<T, 3>({batch, len, 40}, 5);
      tensor<T, 3> y({batch, len, 24}, T(-9));
      l.forward(x.cview(), y.view());
      EXPECT_TRUE(all_close(y.data, reference(l, x.cview()), linear_tol<T>(40)))
          << "rows " << batch * len << ", bias " << bias;
    }
}

TYPED_TEST(Linear, ReadsAndWritesColumnSlicesInPlace) {
  using T = TypeParam;
  // x is columns [2, 2 + 16) of a [2, 5, 30] tensor; y is columns [4, 4 + 8) of a [2, 5, 20] one.
  const auto l = random_linear<T>(8, 16, true, 11);
  const auto big_x = random_tensor<T, 3>({2, 5, 30}, 12);
  tensor<T, 3> big_y({2, 5, 20}, T(-9));
  const xattn::tensor_view<const T, 3> x(big_x.data.data() + 2, {2, 5, 16}, {150, 30, 1});
  const xattn::tensor_view<T, 3> y(big_y.data.data() + 4, {2, 5, 8}, {100, 20, 1});
  l.forward(x, y);
  EXPECT_TRUE(all_close(elements3(y), reference(l, x), linear_tol<T>(16)));
  // Columns outside the slice are untouched.
  for (index_t r = 0; r < 10; ++r) {
    EXPECT_EQ(big_y.data[std::size_t(r * 20 + 3)], T(-9));
    EXPECT_EQ(big_y.data[std::size_t(r * 20 + 12)], T(-9));
  }
}

TYPED_TEST(Linear, StridedViewsGoThroughScratch) {
  using T = TypeParam;
  const auto l = random_linear<T>(6, 9, true, 21);
  // x is [L, B, in] storage viewed as [B, L, in]: its (b, l) rows do not collapse.
  const auto storage = random_tensor<T, 3>({4, 3, 9}, 22);
  const auto x = xattn::permute(storage.cview(), {1, 0, 2});
  // y has a feature stride of 2.
  tensor<T, 3> y_storage({3, 4, 12}, T(-9));
  const xattn::tensor_view<T, 3> y(y_storage.data.data(), {3, 4, 6}, {48, 12, 2});
  xattn::row_matrix<T> scratch;
  l.forward(x, y, scratch);
  EXPECT_TRUE(all_close(elements3(y), reference(l, x), linear_tol<T>(9)));
}

TYPED_TEST(Linear, EigenCallMatchesForward) {
  using T = TypeParam;
  const auto l = random_linear<T>(5, 7, true, 31);
  const auto x = random_tensor<T, 3>({1, 4, 7}, 32);
  const xattn::row_matrix<T> X = Eigen::Map<const xattn::row_matrix<T>>(x.data.data(), 4, 7);
  const xattn::row_matrix<T> Y = l(X);
  const std::vector<T> got(Y.data(), Y.data() + Y.size());
  EXPECT_TRUE(all_close(got, reference(l, x.cview()), linear_tol<T>(7)));
}

TYPED_TEST(Linear, EmptyBatchIsANoOp) {
  using T = TypeParam;
  const auto l = random_linear<T>(3, 4, true, 1);
  tensor<T, 3> x({0, 5, 4}), y({0, 5, 3});
  l.forward(x.cview(), y.view());
  SUCCEED();
}

TEST(Linear, ShapeErrorsNameTheArgument) {
  const auto l = random_linear<float>(3, 4, true, 1);
  tensor<float, 3> x({2, 5, 4}), y({2, 5, 3}), wrong_in({2, 5, 6}), wrong_out({2, 5, 4}),
      wrong_len({2, 4, 3});
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { l.forward(wrong_in.cview(), y.view()); },
                                              {"linear::forward", "x.extent(2) is 6, expected 4"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { l.forward(x.cview(), wrong_out.view()); },
                                              {"y.extent(2) is 4, expected 3"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { l.forward(x.cview(), wrong_len.view()); },
                                              {"y.extent(1) is 4, expected 5"}));
  auto bad_bias = l;
  bad_bias.bias.resize(2);
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { bad_bias.forward(x.cview(), y.view()); },
                                              {"bias.extent(0) is 2, expected 3"}));
  const xattn::row_matrix<float> X(5, 6);
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { (void)l(X); }, {"x.extent(1) is 6"}));
}

TEST(Linear, OutputOverlappingTheInputIsRejected) {
  // y == x gave a wrong result silently (the GEMM overwrote x while reading it).
  const auto l = random_linear<float>(4, 4, true, 2);
  auto x = xattn_test::random_tensor<float, 3>({2, 3, 4}, 3);
  const auto before = x.data;
  const xattn::tensor_view<const float, 3> in = x.cview();
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { l.forward(in, x.view()); },
                                              {"linear::forward", "y overlaps x"}));
  EXPECT_EQ(x.data, before);
  // A y whose rows share memory (stride 0).
  tensor<float, 3> y({2, 3, 4}, -7.0f);
  const xattn::tensor_view<float, 3> rows_alike(y.data.data(), {2, 3, 4}, {0, 0, 1});
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { l.forward(in, rows_alike); },
                                              {"so elements of y would share memory"}));
  EXPECT_EQ(y.data, std::vector<float>(24, -7.0f));
}

TEST(Linear, UsesTheGemmEngineItWasBuiltFor) {
  // The BLAS build of these tests must not silently test Eigen's GEMM twice.
  EXPECT_STREQ(xattn::gemm_engine(), XATTN_TEST_EXPECTED_GEMM_ENGINE);
}

TEST(Linear, NoInputFeaturesGiveTheBiasInEveryGemmEngine) {
  // in = 0: every output is its bias. A BLAS rejects a leading dimension of 0 and writes nothing,
  // so that case must not reach it.
  xattn::linear<float> l(3, 0, true);
  l.bias << 1.0f, -2.0f, 0.5f;
  const tensor<float, 3> x({2, 5, 0});
  tensor<float, 3> y({2, 5, 3}, -7.0f);
  l.forward(x.cview(), y.view());
  for (index_t r = 0; r < 10; ++r)
    for (index_t o = 0; o < 3; ++o) EXPECT_EQ(y.data[std::size_t(r * 3 + o)], l.bias(o));
}

}  // namespace
