// SPDX-License-Identifier: MIT
// Half-precision element types. naive_attention and tiled_attention accept Eigen::half (IEEE
// fp16) and Eigen::bfloat16 (bf16) views for q, k, v, out and the bias mask, and tiled_attention
// also fp32 queries against half keys and values (a decoder's float activations reading a
// cache kept in half). The arithmetic is float throughout:
//
//   - inputs are widened to float exactly (every fp16 and bf16 value is a float), a tile of
//     keys or values at a time (F16C's vcvtph2ps, or a shift for bf16, on the avx2 and avx512
//     paths; Eigen's conversion on sse2 and eigen);
//   - scores, the softmax statistics and the output accumulator are float;
//   - the output is rounded to the half type once, at the end (round to nearest even);
//   - the log-sum-exp and the weights are written in float (statistic_t<T>), so a backward
//     pass or a heat map gets them unrounded.
//
// So a half call differs from the float call on the widened inputs only by the output's one
// rounding. The bytes read from K and V halve, which is what a memory-bound decoder step pays.
// linear<T> and multi_head_cross_attention<T> take the half types too (projection.hpp,
// cross_attention.hpp), and safetensors_file::read<T> reads F16/BF16 weights into them as they
// are.
#pragma once

#include "xattn/config.hpp"

#include <Eigen/Core>

#include <type_traits>

namespace xattn {

/// True for the half-precision element types: Eigen::half (fp16) and Eigen::bfloat16.
template <class T>
inline constexpr bool is_half_v = std::is_same_v<std::remove_cv_t<T>, Eigen::half> ||
                                  std::is_same_v<std::remove_cv_t<T>, Eigen::bfloat16>;

/// The element types the attention kernels accept: float, double, long double and the half
/// types.
template <class T>
inline constexpr bool is_element_v = std::is_floating_point_v<T> || is_half_v<T>;

/// The type a kernel computes in for elements of type T: float for the half types, T itself
/// otherwise.
template <class T>
using compute_t = std::conditional_t<is_half_v<T>, float, T>;

/// The type of the statistics a kernel writes besides its output (attention weights and
/// log-sum-exp): the compute type, so half calls give them in float.
template <class T>
using statistic_t = compute_t<T>;

/// "fp16", "bf16", "float", "double" or "long double": for messages and benchmark labels.
template <class T>
constexpr const char* element_name() noexcept {
  if constexpr (std::is_same_v<T, Eigen::half>) return "fp16";
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) return "bf16";
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, double>) return "double";
  return "long double";
}

}  // namespace xattn
