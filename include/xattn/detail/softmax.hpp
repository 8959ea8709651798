// SPDX-License-Identifier: MIT
// The numerically safe softmax of one row of scores, shared by the kernels.
#pragma once

#include "xattn/config.hpp"

#include <Eigen/Core>

#include <cmath>
#include <limits>

namespace xattn::detail {

/// Replaces s[0, n) by softmax(s) and returns log(sum(exp(s))).
/// The row max m is subtracted before exp, so no exp can overflow: softmax(s) = exp(s - m) / l
/// with l = sum(exp(s - m)) >= 1, and the log-sum-exp is m + log(l).
/// A row of only -inf (every key masked) becomes zeros and returns -inf. NaN propagates.
template <class T>
T softmax_row(T* s, index_t n) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> row(s, n);
  const T m = n > 0 ? row.template maxCoeff<Eigen::PropagateNaN>() : neg_inf;
  if (m == neg_inf) {
    row.setZero();
    return neg_inf;
  }
  row = (row - m).exp();  // a contiguous row: Eigen vectorises this exp
  const T l = row.sum();
  row *= T(1) / l;
  return m + std::log(l);
}

}  // namespace xattn::detail
