// SPDX-License-Identifier: MIT
// linear<T>: the learned projections of an attention layer, y = x Wᵀ + b with PyTorch's weight
// layout, applied to a whole [B, L, in] batch with one GEMM. Read cross_attention.hpp next.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/eigen_interop.hpp"
#include "xattn/detail/overlap.hpp"
#include "xattn/errors.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <climits>
#include <type_traits>
#include <utility>

// XATTN_USE_BLAS=1 (CMake: -DXATTN_USE_BLAS=ON) runs the projections' matrix products through
// the CBLAS interface of the BLAS the program links (OpenBLAS, MKL, BLIS: cblas.h must be on the
// include path), which chooses its code for the CPU at run time.
#ifndef XATTN_USE_BLAS
#  define XATTN_USE_BLAS 0
#endif
#if XATTN_USE_BLAS
#  include <cblas.h>
#endif

namespace xattn {

/// The engine of the projections' matrix products: "blas" (built with XATTN_USE_BLAS) or
/// "eigen".
inline const char* gemm_engine() noexcept { return XATTN_USE_BLAS ? "blas" : "eigen"; }

namespace detail {

/// C = A Bᵀ for row-major A [m, k], B [n, k] and C [m, n] (rows contiguous, any row strides):
/// one cblas_sgemm/dgemm call with XATTN_USE_BLAS, else Eigen's GEMM.
template <class T, class A, class B, class C>
void gemm_nt(const A& a, const B& b, C& c) {
#if XATTN_USE_BLAS
  // CBLAS counts in int and needs every leading dimension >= max(1, row length).
  constexpr index_t most = INT_MAX;
  const auto fits = [](index_t ld, index_t len) {
    return ld >= std::max<index_t>(1, len) && ld <= most;
  };
  if (a.cols() > 0 && a.rows() <= most && b.rows() <= most && a.cols() <= most &&
      fits(a.outerStride(), a.cols()) && fits(b.outerStride(), b.cols()) &&
      fits(c.outerStride(), c.cols())) {
    const int m = int(a.rows()), n = int(b.rows()), k = int(a.cols());
    if constexpr (std::is_same_v<T, float>) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a.data(),
                  int(a.outerStride()), b.data(), int(b.outerStride()), 0.0f, c.data(),
                  int(c.outerStride()));
      return;
    } else if constexpr (std::is_same_v<T, double>) {
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0, a.data(),
                  int(a.outerStride()), b.data(), int(b.outerStride()), 0.0, c.data(),
                  int(c.outerStride()));
      return;
    }
  }
#endif
  c.noalias() = a * b.transpose();
}

}  // namespace detail

/// A fully connected layer stored as PyTorch's nn.Linear stores it:
///
///   weight [out, in]    bias [out] (empty: no bias)
///   y = x Wᵀ + b        x [..., in] -> y [..., out]
///
/// The [B, L, in] input is treated as one [B·L, in] matrix, so a whole batch is one GEMM (for a
/// few rows, a decoder step, one matrix-vector product per row instead).
template <class T>
struct linear {
  static_assert(std::is_floating_point_v<T>, "xattn::linear needs a floating-point element type");

  row_matrix<T> weight;                      ///< W [out, in]
  Eigen::Matrix<T, 1, Eigen::Dynamic> bias;  ///< b [out], or empty for no bias

  linear() = default;
  /// Zero weights of the given size, with a zero bias when has_bias.
  linear(index_t out_features, index_t in_features, bool has_bias)
      : weight(row_matrix<T>::Zero(out_features, in_features)),
        bias(has_bias ? Eigen::Matrix<T, 1, Eigen::Dynamic>::Zero(out_features)
                      : Eigen::Matrix<T, 1, Eigen::Dynamic>()) {}

  index_t in_features() const noexcept { return index_t(weight.cols()); }
  index_t out_features() const noexcept { return index_t(weight.rows()); }
  bool has_bias() const noexcept { return bias.size() != 0; }

  /// y = x Wᵀ + b for every row of x:
  ///
  ///   x [B, L, in]    y [B, L, out], written; must not overlap x nor itself (a shape_error)
  ///
  /// Any strides are accepted. x and y are read and written in place when their (B, L) rows
  /// collapse into one matrix with contiguous rows (a packed tensor, or a column slice of one);
  /// otherwise they go through `scratch`, which keeps its capacity between calls.
  void forward(tensor_view<const T, 3> x, tensor_view<T, 3> y, row_matrix<T>& scratch) const {
    constexpr const char* fn = "linear::forward";
    check_bias(fn);
    detail::require_extent(fn, "x", 2, x.extent(2), in_features());
    detail::require_extent(fn, "y", 0, y.extent(0), x.extent(0));
    detail::require_extent(fn, "y", 1, y.extent(1), x.extent(1));
    detail::require_extent(fn, "y", 2, y.extent(2), out_features());
    detail::require_no_self_overlap(fn, "y", y);
    detail::require_disjoint(fn, "y", y, "x", x);
    const index_t rows = detail::checked_mul(fn, x.extent(0), x.extent(1));
    if (rows == 0 || out_features() == 0) return;

    row_matrix<T> x_copy;  // only for an x whose rows do not collapse: rare, so not kept
    const auto X = rows_of(x, x_copy);
    if (collapses(y)) {
      auto Y =
          detail::matrix_map<T>(y.data(), rows, y.extent(2), Eigen::OuterStride<>(row_step(y)));
      if (rows <= gemv_rows) {
        // A decoder step has one row per sequence: a matrix-vector product per row reads W
        // once, where GEMM would first pack all of W into its blocking buffers.
        for (index_t r = 0; r < rows; ++r)
          Y.row(r).transpose().noalias() = weight * X.row(r).transpose();
      } else {
        detail::gemm_nt<T>(X, weight, Y);
      }
      if (has_bias()) Y.rowwise() += bias;
    } else {
      scratch.resize(rows, out_features());
      detail::gemm_nt<T>(X, weight, scratch);
      if (has_bias()) scratch.rowwise() += bias;
      for (index_t b = 0, r = 0; b < y.extent(0); ++b)
        for (index_t l = 0; l < y.extent(1); ++l, ++r)
          for (index_t o = 0; o < y.extent(2); ++o) y(b, l, o) = scratch(r, o);
    }
  }

  /// As above with a scratch matrix of its own (allocated only for strided outputs).
  void forward(tensor_view<const T, 3> x, tensor_view<T, 3> y) const {
    row_matrix<T> scratch;
    forward(x, y, scratch);
  }

  /// Eigen in, Eigen out: Y = X Wᵀ + b for X [rows, in].
  template <class Derived>
  row_matrix<T> operator()(const Eigen::MatrixBase<Derived>& X) const {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "linear<T>: the input's scalar type must be T");
    check_bias("linear");
    if (X.cols() != weight.cols())
      detail::fail_shape(
          detail::message("linear: x.extent(1) is ", X.cols(), ", expected ", weight.cols()));
    row_matrix<T> Y = X * weight.transpose();
    if (has_bias()) Y.rowwise() += bias;
    return Y;
  }

 private:
  static constexpr index_t gemv_rows = 4;  // up to this many rows, one GEMV per row beats GEMM

  void check_bias(const char* fn) const {
    if (has_bias() && bias.size() != weight.rows())
      detail::fail_shape(detail::message(fn, ": bias.extent(0) is ", bias.size(), ", expected ",
                                         weight.rows(), " (weight.extent(0))"));
  }

  // The distance between consecutive (b, l) rows when the two leading dimensions collapse.
  template <class E>
  static index_t row_step(const tensor_view<E, 3>& v) noexcept {
    return v.extent(1) > 1 ? v.stride(1) : (v.extent(0) > 1 ? v.stride(0) : v.extent(2));
  }
  // True when the [B, L, n] view is one [B·L, n] matrix with contiguous rows.
  template <class E>
  static bool collapses(const tensor_view<E, 3>& v) noexcept {
    const bool inner = v.stride(2) == 1 || v.extent(2) <= 1;
    const bool outer =
        v.extent(0) <= 1 || v.extent(1) <= 1 || v.stride(0) == v.extent(1) * v.stride(1);
    return inner && outer && row_step(v) >= v.extent(2);
  }
  static detail::matrix_map<const T> rows_of(const tensor_view<const T, 3>& x,
                                             row_matrix<T>& copy) {
    const index_t rows = x.extent(0) * x.extent(1);
    if (collapses(x))
      return detail::matrix_map<const T>(x.data(), rows, x.extent(2),
                                         Eigen::OuterStride<>(row_step(x)));
    copy.resize(rows, x.extent(2));
    for (index_t b = 0, r = 0; b < x.extent(0); ++b)
      for (index_t l = 0; l < x.extent(1); ++l, ++r)
        for (index_t i = 0; i < x.extent(2); ++i) copy(r, i) = x(b, l, i);
    return detail::matrix_map<const T>(copy.data(), rows, x.extent(2),
                                       Eigen::OuterStride<>(x.extent(2)));
  }
};

}  // namespace xattn
