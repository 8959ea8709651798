// SPDX-License-Identifier: MIT
// linear<T>: the learned projections of an attention layer, y = x Wᵀ + b with PyTorch's weight
// layout, applied to a whole [B, L, in] batch with one GEMM. Read cross_attention.hpp next.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/eigen_interop.hpp"
#include "xattn/detail/gemm.hpp"
#include "xattn/detail/kernels.hpp"
#include "xattn/detail/overlap.hpp"
#include "xattn/detail/tiling.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <climits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

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

/// The engine of the projections' matrix products: "blas" (built with XATTN_USE_BLAS: the
/// forward products go through the BLAS) or "xattn" (detail/gemm.hpp, compiled for every
/// instruction-set level and chosen at run time like the attention's loops).
inline const char* gemm_engine() noexcept { return XATTN_USE_BLAS ? "blas" : "xattn"; }

namespace detail {

/// C = op(A) op(B) (+ C when accumulate) (+ bias on every row) for row-major Eigen matrices or
/// maps with contiguous rows, op(X) = Xᵀ when its flag is set; C is resized by the caller and
/// must not overlap A, B or bias. On detail::gemm (any XATTN_USE_BLAS).
template <class T, class A, class B, class C>
void product(C& c, const A& a, bool trans_a, const B& b, bool trans_b, bool accumulate,
             const T* bias = nullptr) {
  const index_t lda = index_t(a.outerStride()), ldb = index_t(b.outerStride());
  const index_t m = index_t(c.rows()), n = index_t(c.cols());
  const index_t k = trans_a ? index_t(a.rows()) : index_t(a.cols());
  XATTN_ASSERT((trans_a ? index_t(a.cols()) : index_t(a.rows())) == m);
  XATTN_ASSERT((trans_b ? index_t(b.cols()) : index_t(b.rows())) == k);
  XATTN_ASSERT((trans_b ? index_t(b.rows()) : index_t(b.cols())) == n);
  const gemm_args<T> g{m,
                       n,
                       k,
                       a.data(),
                       trans_a ? 1 : lda,
                       trans_a ? lda : 1,
                       b.data(),
                       trans_b ? 1 : ldb,
                       trans_b ? ldb : 1,
                       c.data(),
                       index_t(c.outerStride()),
                       accumulate,
                       bias};
  gemm(g);
}

/// C = A Bᵀ (+ bias on every row) for row-major A [m, k], B [n, k] and C [m, n] (rows
/// contiguous, any row strides): one cblas_sgemm/dgemm call with XATTN_USE_BLAS (the bias added
/// after), else detail::gemm with the bias added as each block is stored.
template <class T, class A, class B, class C>
void gemm_nt(const A& a, const B& b, C& c, const T* bias) {
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
    } else {
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0, a.data(),
                  int(a.outerStride()), b.data(), int(b.outerStride()), 0.0, c.data(),
                  int(c.outerStride()));
    }
    if (bias)
      c.rowwise() += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(bias, c.cols());
    return;
  }
#endif
  product<T>(c, a, false, b, true, false, bias);
}

}  // namespace detail

/// A fully connected layer stored as PyTorch's nn.Linear stores it:
///
///   weight [out, in]    bias [out] (empty: no bias)
///   y = x Wᵀ + b        x [..., in] -> y [..., out]
///
/// The [B, L, in] input is treated as one [B·L, in] matrix, so a whole batch is one GEMM (for a
/// few rows, a decoder step, one matrix-vector product per row instead).
///
/// T may be a half type (Eigen::half, Eigen::bfloat16, half.hpp): weights, bias, x and y are
/// stored in it and the arithmetic is float. The weight is widened to float once per call (the
/// GEMM's panel), x a block of rows at a time, and each output is rounded once, after the bias
/// is added; a few rows (a decoder step) read the half weight in place, widened in registers.
template <class T>
struct linear {
  static_assert(is_element_v<T>, "xattn::linear needs a floating-point or half element type");
  using compute_type = compute_t<T>;  ///< the arithmetic's type: float for the half types

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
  /// otherwise they go through `scratch`, which keeps its capacity between calls. For a half T,
  /// scratch holds the widened weight and rows, and is only ever grown.
  void forward(tensor_view<const T, 3> x, tensor_view<T, 3> y,
               row_matrix<compute_type>& scratch) const {
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
    if constexpr (is_half_v<T>)
      forward_half(x, y, rows, scratch);
    else
      forward_plain(x, y, rows, scratch);
  }

  /// As above with a scratch matrix of its own (allocated only for strided outputs, or for a
  /// half T).
  void forward(tensor_view<const T, 3> x, tensor_view<T, 3> y) const {
    row_matrix<compute_type> scratch;
    forward(x, y, scratch);
  }

  /// Eigen in, Eigen out: Y = X Wᵀ + b for X [rows, in] (for a half T computed in float and
  /// rounded once).
  template <class Derived>
  row_matrix<T> operator()(const Eigen::MatrixBase<Derived>& X) const {
    static_assert(std::is_same_v<typename Derived::Scalar, T>,
                  "linear<T>: the input's scalar type must be T");
    check_bias("linear");
    if (X.cols() != weight.cols())
      detail::fail_shape(
          detail::message("linear: x.extent(1) is ", X.cols(), ", expected ", weight.cols()));
    if constexpr (is_half_v<T>) {
      row_matrix<float> Y = X.template cast<float>() * weight.template cast<float>().transpose();
      if (has_bias()) Y.rowwise() += bias.template cast<float>();
      return Y.template cast<T>();
    } else {
      row_matrix<T> Y = X * weight.transpose();
      if (has_bias()) Y.rowwise() += bias;
      return Y;
    }
  }

 private:
  static constexpr index_t gemv_rows = 4;     // up to this many rows, one GEMV per row beats GEMM
  static constexpr index_t half_block = 256;  // rows of x widened at a time for a half T

  // Float or double storage: Eigen's (or the BLAS's) GEMM on the rows in place.
  void forward_plain(const tensor_view<const T, 3>& x, const tensor_view<T, 3>& y, index_t rows,
                     row_matrix<T>& scratch) const {
    row_matrix<T> x_copy;  // only for an x whose rows do not collapse: rare, so not kept
    const auto X = rows_of(x, x_copy);
    if (collapses(y)) {
      auto Y =
          detail::matrix_map<T>(y.data(), rows, y.extent(2), Eigen::OuterStride<>(row_step(y)));
      if (rows <= gemv_rows) {
        // A decoder step has one row per sequence: a matrix-vector product per row reads W
        // once, where GEMM would first pack all of W into its blocking buffers. The dot
        // products are the tiled attention's row kernel (one query against rows of keys).
        const detail::tile_kernels<T>& kern = detail::active_kernels<T>();
        for (index_t r = 0; r < rows; ++r) {
          T* yr = Y.row(r).data();
          kern.row_scores(X.row(r).data(), weight.data(), in_features(), in_features(),
                          out_features(), yr);
          if (has_bias())
            for (index_t o = 0; o < out_features(); ++o) yr[o] += bias[o];
        }
      } else {
        detail::gemm_nt<T>(X, weight, Y, has_bias() ? bias.data() : nullptr);
      }
    } else {
      scratch.resize(rows, out_features());
      detail::gemm_nt<T>(X, weight, scratch, has_bias() ? bias.data() : nullptr);
      for (index_t b = 0, r = 0; b < y.extent(0); ++b)
        for (index_t l = 0; l < y.extent(1); ++l, ++r)
          for (index_t o = 0; o < y.extent(2); ++o) y(b, l, o) = scratch(r, o);
    }
  }

  // Half storage: float arithmetic. The weight is widened once per call and packed for the
  // GEMM's micro-kernel (detail/gemm.hpp) into scratch (after the bias); then each block of up
  // to half_block rows is widened, multiplied on the active level's GEMM loops (one thread per
  // block, every buffer allocated before anything is written) and rounded. The blocks are
  // shared among OpenMP threads, as many as the work is worth (the rule of tiled_attention: no
  // thread for less than min_flops_per_thread). Up to gemv_rows rows read the half weight in
  // place (the row kernels of the tiled attention, dot products of one float row with half
  // rows). Every output is rounded once, after its bias is added. Neither the blocks nor any
  // block's bits depend on the thread count.
  void forward_half(const tensor_view<const T, 3>& x, const tensor_view<T, 3>& y, index_t rows,
                    row_matrix<float>& scratch) const {
    const detail::tile_kernels<float>& kern = detail::active_kernels<float>();
    const detail::gemm_kernels<float>& gk = detail::gemm_kernels_for<float>(kern.level);
    const index_t in = in_features(), out = out_features(), L = x.extent(1);
    const bool gemv = rows <= gemv_rows;
    const index_t block = std::min(rows, half_block);
    const index_t blocks = (rows + block - 1) / block;
    const double flops = 2.0 * double(rows) * double(in) * double(out);
    const int threads =
        gemv ? 1
             : int(std::max(1.0, std::min({double(detail::default_threads()), double(blocks),
                                           flops / detail::min_flops_per_thread})));
    const auto round_up = [](index_t v, index_t to) { return (v + to - 1) / to * to; };
    const index_t kc = detail::gemm_panel_depth<float>(in);
    // scratch: [bias | W | W packed (GEMM only) | per thread: x block, y block, A panel];
    // grown, never shrunk.
    const index_t packed = gemv ? 0 : round_up(out, gk.nr) * in;
    const index_t panel = gemv ? 0 : round_up(block, gk.mr) * kc;
    const index_t per_thread = block * (in + out) + panel;
    const index_t need = out + (gemv ? 0 : out * in) + packed + index_t(threads) * per_thread;
    if (scratch.size() < need) scratch.resize(1, need);
    float* const bf = scratch.data();
    float* const wf = bf + out;
    float* const bp = wf + (gemv ? 0 : out * in);
    float* const blocks_at = bp + packed;
    if (has_bias())
      widen(kern, bias.data(), out, bf);
    else
      std::fill(bf, bf + out, 0.0f);
    if (!gemv) {
      widen(kern, weight.data(), out * in, wf);
      const detail::gemm_args<float> w{0, out, in, nullptr, 0, 0, wf, 1, in, nullptr, 0, false,
                                       nullptr};
      gk.pack_b(w, 0, out, kc, bp);
    }
    detail::parallel_for(blocks, threads, [&](index_t blk, int thread) {
      float* const xf = blocks_at + index_t(thread) * per_thread;
      float* const yf = xf + block * in;
      float* const ap = yf + block * out;
      const index_t r0 = blk * block, m = std::min(block, rows - r0);
      for (index_t r = 0; r < m; ++r) {
        const index_t b = (r0 + r) / L, l = (r0 + r) % L;
        const T* src = x.data() + b * x.stride(0) + l * x.stride(1);
        if (x.stride(2) == 1 || in <= 1)
          widen(kern, src, in, xf + r * in);
        else
          for (index_t i = 0; i < in; ++i)
            xf[r * in + i] = static_cast<float>(src[i * x.stride(2)]);
      }
      if (gemv) {
        for (index_t r = 0; r < m; ++r) {
          float* yr = yf + r * out;
          if constexpr (std::is_same_v<T, Eigen::half>)
            kern.row_scores_fp16(xf + r * in, weight.data(), in, in, out, yr);
          else
            kern.row_scores_bf16(xf + r * in, weight.data(), in, in, out, yr);
          for (index_t o = 0; o < out; ++o) yr[o] += bf[o];
        }
      } else if (in == 0) {
        for (index_t r = 0; r < m; ++r) std::copy(bf, bf + out, yf + r * out);
      } else {
        const detail::gemm_args<float> g{m, out, in, xf, in, 1, wf, 1, in, yf, out, false, bf};
        gk.item(g, 0, m, 0, out, kc, bp, ap);
      }
      for (index_t r = 0; r < m; ++r) {
        const float* yr = yf + r * out;
        const index_t b = (r0 + r) / L, l = (r0 + r) % L;
        T* dst = y.data() + b * y.stride(0) + l * y.stride(1);
        if (y.stride(2) == 1 || out <= 1)
          narrow(kern, yr, out, dst);
        else
          for (index_t o = 0; o < out; ++o) dst[o * y.stride(2)] = static_cast<T>(yr[o]);
      }
    });
  }
  static void widen(const detail::tile_kernels<float>& kern, const T* x, index_t n, float* y) {
    if constexpr (std::is_same_v<T, Eigen::half>)
      kern.widen_fp16(x, n, y);
    else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
      kern.widen_bf16(x, n, y);
  }
  static void narrow(const detail::tile_kernels<float>& kern, const float* x, index_t n, T* y) {
    if constexpr (std::is_same_v<T, Eigen::half>)
      kern.narrow_fp16(x, n, y);
    else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
      kern.narrow_bf16(x, n, y);
  }

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
