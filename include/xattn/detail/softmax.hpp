// SPDX-License-Identifier: MIT
// The numerically safe softmax of one row of scores, shared by the kernels.
#pragma once

#include "xattn/config.hpp"

#include <Eigen/Core>

#include <cmath>
#include <limits>

namespace xattn::detail {

/// s[t] = exp(s[t] - m) for t in [0, n), vectorised.
/// Eigen's vectorised exp clamps its argument from below (near -87.3 for float, -708 for double),
/// so exp(-inf) comes out as a tiny subnormal number instead of 0. Results below the smallest
/// normal number are flushed to exactly 0: a masked key (score -inf) then gets a weight of
/// exactly 0, and any other key loses less than that smallest normal number.
template <class T>
void exp_shifted(T* s, index_t n, T m) {
  Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>> row(s, n);
  row = (row - m).exp();
  constexpr T tiny = std::numeric_limits<T>::min();
  for (index_t t = 0; t < n; ++t) s[t] = s[t] < tiny ? T(0) : s[t];
}

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
  exp_shifted(s, n, m);
  const T l = row.sum();
  row *= T(1) / l;
  return m + std::log(l);
}

}  // namespace xattn::detail
