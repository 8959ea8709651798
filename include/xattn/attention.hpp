// SPDX-License-Identifier: MIT
// attention(Q, K, V): single-head attention with Eigen matrices in and an Eigen matrix out, the
// first call to write. It views its arguments in place and runs the kernels underneath; the
// batched, multi-head, strided calls are in attention_naive.hpp.
#pragma once

#include "xattn/attention_naive.hpp"
#include "xattn/config.hpp"
#include "xattn/errors.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <type_traits>

namespace xattn {

namespace detail {

/// A [1, 1, rows, cols] view of an Eigen expression: in place when it has direct access,
/// otherwise of its value evaluated into storage.
template <class Derived, class T = typename Derived::Scalar>
tensor_view<const T, 4> view_of(const Eigen::MatrixBase<Derived>& m, row_matrix<T>& storage) {
  if constexpr (static_cast<bool>(Derived::Flags & Eigen::DirectAccessBit)) {
    (void)storage;
    return to_rank<4>(make_view(m.derived()));
  } else {
    storage = m;
    return to_rank<4>(make_view(std::as_const(storage)));
  }
}

}  // namespace detail

/// Single-head scaled dot-product attention, O = softmax(scale · Q Kᵀ) V (see attention_naive.hpp):
///
///   Q [Lq, Dk]   K [Lk, Dk]   V [Lk, Dv]   ->   O [Lq, Dv] (row-major)
///
/// Any Eigen dense expressions with one floating-point scalar type, row- or column-major.
/// Masks and extra outputs in opts are rank-4 views with B = H = 1 (to_rank<4> makes one).
template <class DQ, class DK, class DV>
row_matrix<typename DQ::Scalar> attention(const Eigen::MatrixBase<DQ>& Q,
                                          const Eigen::MatrixBase<DK>& K,
                                          const Eigen::MatrixBase<DV>& V,
                                          const attention_options<typename DQ::Scalar>& opts = {}) {
  using T = typename DQ::Scalar;
  static_assert(std::is_floating_point_v<T>, "xattn kernels need a floating-point element type");
  static_assert(std::is_same_v<T, typename DK::Scalar> && std::is_same_v<T, typename DV::Scalar>,
                "attention: Q, K and V need the same scalar type");
  if (K.cols() != Q.cols())
    detail::fail_shape(detail::message("attention: K.cols() is ", K.cols(), ", expected ", Q.cols(),
                                       " (Q.cols())"));
  if (V.rows() != K.rows())
    detail::fail_shape(detail::message("attention: V.rows() is ", V.rows(), ", expected ", K.rows(),
                                       " (K.rows())"));
  row_matrix<T> q_store, k_store, v_store;
  row_matrix<T> O(Q.rows(), V.cols());
  naive_attention<T>(detail::view_of(Q, q_store), detail::view_of(K, k_store),
                     detail::view_of(V, v_store), to_rank<4>(make_view(O)), opts);
  return O;
}

}  // namespace xattn
