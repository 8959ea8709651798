// SPDX-License-Identifier: MIT
// attention(Q, K, V): Eigen matrices of any order and Eigen expressions in, the same numbers as
// the reference out, masks and weights through the options, and errors in 2-D terms.
#include "xattn/attention.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <Eigen/Core>

#include <cmath>
#include <limits>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::throws_with;

template <class T>
class EigenAttention : public ::testing::Test {};
TYPED_TEST_SUITE(EigenAttention, xattn_test::element_types, );

// The reference's output for single-head Q, K, V, as a row-major matrix.
template <class T>
xattn::row_matrix<long double> reference(const xattn::row_matrix<T>& Q,
                                         const xattn::row_matrix<T>& K,
                                         const xattn::row_matrix<T>& V,
                                         const xattn::attention_options<T>& opts = {},
                                         double* max_abs_score = nullptr) {
  const auto r = xattn_test::reference_attention<T>(xattn::to_rank<4>(xattn::make_view(Q)),
                                                    xattn::to_rank<4>(xattn::make_view(K)),
                                                    xattn::to_rank<4>(xattn::make_view(V)), opts);
  if (max_abs_score) *max_abs_score = r.max_abs_score;
  xattn::row_matrix<long double> O(Q.rows(), V.cols());
  for (index_t n = 0; n < O.size(); ++n) O.data()[n] = r.out[std::size_t(n)];
  return O;
}

template <class T, class M>
::testing::AssertionResult close(const M& got, const xattn::row_matrix<long double>& want,
                                 double tol) {
  std::vector<T> g;
  std::vector<long double> w;
  for (index_t i = 0; i < want.rows(); ++i)
    for (index_t j = 0; j < want.cols(); ++j) {
      g.push_back(got(i, j));
      w.push_back(want(i, j));
    }
  if (got.rows() != want.rows() || got.cols() != want.cols())
    return ::testing::AssertionFailure() << "result is " << got.rows() << "x" << got.cols();
  return xattn_test::all_close(g, w, tol);
}

TYPED_TEST(EigenAttention, AcceptsColumnMajorMatricesAndMatchesTheReference) {
  using T = TypeParam;
  using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;  // column-major
  const matrix Q = matrix::Random(7, 16), K = matrix::Random(11, 16), V = matrix::Random(11, 5);
  const auto O = xattn::attention(Q, K, V);
  double mx = 0;
  const auto want = reference<T>(Q, K, V, {}, &mx);
  EXPECT_TRUE(close<T>(O, want, xattn_test::attention_tol<T>(16, 11, mx)));
}

TYPED_TEST(EigenAttention, AcceptsRowMajorMapsBlocksAndExpressions) {
  using T = TypeParam;
  const xattn::row_matrix<T> Q = xattn::row_matrix<T>::Random(4, 8);
  const xattn::row_matrix<T> big = xattn::row_matrix<T>::Random(20, 30);
  const auto K = big.block(2, 3, 9, 8);  // a block: strided rows, read in place
  std::vector<T> vbuf(9 * 6);
  for (std::size_t n = 0; n < vbuf.size(); ++n) vbuf[n] = T(std::sin(double(n)));
  const Eigen::Map<const xattn::row_matrix<T>> V(vbuf.data(), 9, 6);
  const auto O = xattn::attention(T(2) * Q, K, V);  // an expression: evaluated once
  double mx = 0;
  const auto want = reference<T>(T(2) * Q, K, V, {}, &mx);
  EXPECT_TRUE(close<T>(O, want, xattn_test::attention_tol<T>(8, 9, mx)));
  // Transposed storage (columns as rows) gives the same numbers.
  const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic> Kt = K.transpose();
  EXPECT_TRUE(close<T>(xattn::attention(T(2) * Q, Kt.transpose(), V), want,
                       xattn_test::attention_tol<T>(8, 9, mx)));
}

TYPED_TEST(EigenAttention, PassesMasksAndReturnsWeights) {
  using T = TypeParam;
  const xattn::row_matrix<T> Q = xattn::row_matrix<T>::Random(3, 4),
                             K = xattn::row_matrix<T>::Random(6, 4),
                             V = xattn::row_matrix<T>::Random(6, 2);
  xattn::row_matrix<T> P(3, 6);
  const index_t len[] = {4};
  xattn::attention_options<T> opts;
  opts.mask.kv_lengths = xattn::make_view(len, {1});
  opts.mask.causal = xattn::causal_mask::top_left;
  opts.weights_out = xattn::to_rank<4>(xattn::make_view(P));
  const auto O = xattn::attention(Q, K, V, opts);
  double mx = 0;
  const auto want = reference<T>(Q, K, V, opts, &mx);
  EXPECT_TRUE(close<T>(O, want, xattn_test::attention_tol<T>(4, 6, mx)));
  for (index_t i = 0; i < 3; ++i) {
    EXPECT_NEAR(double(P.row(i).sum()), 1.0, 8 * std::numeric_limits<T>::epsilon());
    for (index_t j = std::min<index_t>(i + 1, 4); j < 6; ++j) EXPECT_EQ(P(i, j), T(0));
  }
}

TEST(EigenAttentionErrors, NameTheMismatchedMatrix) {
  const Eigen::MatrixXf Q(3, 4), K(5, 4), V(5, 2), K3(5, 3), V6(6, 2);
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { (void)xattn::attention(Q, K3, V); },
                                              {"attention: K.cols() is 3, expected 4 (Q.cols())"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { (void)xattn::attention(Q, K, V6); },
                                              {"attention: V.rows() is 6, expected 5 (K.rows())"}));
}

}  // namespace
