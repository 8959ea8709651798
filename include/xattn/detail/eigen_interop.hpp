// SPDX-License-Identifier: MIT
// Maps 2-D tensor_view slices to Eigen matrices so the kernels can use Eigen's GEMM and array
// expressions on data they do not own.
#pragma once

#include "xattn/config.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <type_traits>

namespace xattn::detail {

/// Stops template argument deduction through a parameter (std::type_identity before C++20).
template <class T>
struct type_identity {
  using type = T;
};
template <class T>
using identity_t = typename type_identity<T>::type;

template <class T>
using row_matrix_of =
    std::conditional_t<std::is_const_v<T>, const row_matrix<std::remove_const_t<T>>, row_matrix<T>>;

/// A row-major matrix whose rows are contiguous and `outer` elements apart: what GEMM wants.
template <class T>
using matrix_map = Eigen::Map<row_matrix_of<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

/// Any 2-D strided layout; Eigen reads it element by element.
template <class T>
using strided_map =
    Eigen::Map<row_matrix_of<T>, Eigen::Unaligned, Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;

/// The packing buffers of Eigen's GEMM kernel for one thread (see tile_gemm).
template <class T>
using gemm_blocking =
    Eigen::internal::gemm_blocking_space<Eigen::RowMajor, T, T, Eigen::Dynamic, Eigen::Dynamic,
                                         Eigen::Dynamic, 1, false>;

/// C [m, n] = alpha · op(A) op(B) (+ C when `accumulate`) for row-major tiles with leading
/// dimensions lda, ldb, ldc; op(X) is Xᵀ when its flag is set. Eigen's GEMM kernel called
/// directly, so that it never splits a tile over Eigen's own OpenMP threads: a tile's bits then
/// depend on its sizes only, never on how many threads run the call. `reuse`, when given, is
/// blocking made for at least m rows, n columns and this depth, with its buffers allocated
/// (allocateAll), so that the call allocates nothing; otherwise the call makes its own.
template <bool TransA, bool TransB, class T>
void tile_gemm(index_t m, index_t n, index_t depth, const T* a, index_t lda, const T* b,
               index_t ldb, T* c, index_t ldc, T alpha, bool accumulate,
               gemm_blocking<T>* reuse = nullptr) {
  if (!accumulate)
    for (index_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T(0));
  if (m == 0 || n == 0 || depth == 0) return;
  using namespace Eigen::internal;
  constexpr int a_order = TransA ? Eigen::ColMajor : Eigen::RowMajor;
  constexpr int b_order = TransB ? Eigen::ColMajor : Eigen::RowMajor;
  using product = general_matrix_matrix_product<Eigen::Index, T, a_order, false, T, b_order, false,
                                                Eigen::RowMajor, 1>;
  if (reuse) {
    product::run(m, n, depth, a, lda, b, ldb, c, 1, ldc, alpha, *reuse);
  } else {
    gemm_blocking<T> blocking(m, n, depth, 1, true);
    product::run(m, n, depth, a, lda, b, ldb, c, 1, ldc, alpha, blocking);
  }
}

template <class T>
bool has_contiguous_rows(const tensor_view<T, 2>& v) noexcept {
  return v.stride(1) == 1 || v.extent(1) <= 1;
}

template <class T>
matrix_map<T> as_matrix(const tensor_view<T, 2>& v) noexcept {
  XATTN_ASSERT(has_contiguous_rows(v));
  return matrix_map<T>(v.data(), v.extent(0), v.extent(1), Eigen::OuterStride<>(v.stride(0)));
}

template <class T>
strided_map<T> as_strided_matrix(const tensor_view<T, 2>& v) noexcept {
  return strided_map<T>(v.data(), v.extent(0), v.extent(1),
                        Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>(v.stride(0), v.stride(1)));
}

/// The first n rows of v (n <= v.extent(0)).
template <class T>
tensor_view<T, 2> first_rows(const tensor_view<T, 2>& v, index_t n) {
  XATTN_ASSERT(n >= 0 && n <= v.extent(0));
  return tensor_view<T, 2>(v.data(), {n, v.extent(1)}, v.strides());
}

/// v as a GEMM-ready matrix: read in place when its rows are contiguous, else copied into
/// scratch (which keeps its capacity across calls).
template <class T>
matrix_map<const T> contiguous_rows(const tensor_view<const T, 2>& v, row_matrix<T>& scratch) {
  if (has_contiguous_rows(v)) return as_matrix(v);
  scratch = as_strided_matrix(v);
  return matrix_map<const T>(scratch.data(), scratch.rows(), scratch.cols(),
                             Eigen::OuterStride<>(scratch.cols()));
}

/// v widened to C as a GEMM-ready matrix: contiguous_rows when C is v's own type, else a
/// converted copy in scratch (half-precision inputs computed in float).
template <class C, class S>
matrix_map<const C> compute_rows(const tensor_view<const S, 2>& v, row_matrix<C>& scratch) {
  if constexpr (std::is_same_v<C, S>) {
    return contiguous_rows(v, scratch);
  } else {
    scratch = as_strided_matrix(v).template cast<C>();
    return matrix_map<const C>(scratch.data(), scratch.rows(), scratch.cols(),
                               Eigen::OuterStride<>(scratch.cols()));
  }
}

/// dst = src for any layout of dst; src is evaluated into scratch first when dst's rows are
/// not contiguous (so a product still runs as one GEMM), or when dst's element type T is not
/// the expression's C (a float result rounded once into a half-precision output).
template <class T, class Expr, class C>
void assign_rows(const tensor_view<T, 2>& dst, const Expr& src, row_matrix<C>& scratch) {
  if constexpr (!std::is_same_v<T, C>) {
    scratch.noalias() = src;
    as_strided_matrix(dst) = scratch.template cast<T>();
  } else if (has_contiguous_rows(dst)) {
    as_matrix(dst).noalias() = src;
  } else {
    scratch.noalias() = src;
    as_strided_matrix(dst) = scratch;
  }
}

}  // namespace xattn::detail
