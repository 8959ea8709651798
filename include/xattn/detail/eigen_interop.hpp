// SPDX-License-Identifier: MIT
// Maps 2-D tensor_view slices to Eigen matrices so the kernels can use Eigen's GEMM and array
// expressions on data they do not own.
#pragma once

#include "xattn/config.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

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
