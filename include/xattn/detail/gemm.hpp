// SPDX-License-Identifier: MIT
// The matrix product of the projections (projection.hpp) and of their backward pass, C = A·B,
// compiled once per instruction-set level of this build like the attention's own loops
// (detail/kernels.hpp), so that a build without -march runs it on the widest vectors the CPU
// has. Eigen's products cannot do that: Eigen chooses its packets from the compiler's target
// at include time, SSE2 in a portable build.
//
// The structure is the usual one of BLAS libraries: C is cut into work items of at most
// gemm_mc rows and gemm_nc columns, shared among threads; each item runs over the depth in
// panels of at most gemm_kc, packs its panel of A and of B (detail/gemm.inl) and sweeps them
// with a register-blocked micro-kernel. The packed panel of A stays in L2, a sliver of B
// (gemm_kc x gemm_nr) in L1. Every element of C is summed in the same order whatever the
// number of threads: the items and panels depend on the sizes alone.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"
#include "xattn/detail/kernels.hpp"
#if XATTN_DETAIL_LOOPS_HERE  // the packets the loops are written in
#  include "xattn/detail/simd.hpp"
#  include "xattn/detail/simd_avx2.hpp"
#  include "xattn/detail/simd_avx512.hpp"
#  include "xattn/detail/simd_sse2.hpp"
#endif
#include "xattn/detail/tiling.hpp"

#include <algorithm>
#include <atomic>
#include <memory>
#include <new>
#include <type_traits>

namespace xattn::detail {

/// C [m, n] = A [m, k] · B [k, n] (+ C when accumulate) (+ bias [n] on every row when bias is
/// set). Element (i, p) of A is a[i·rsa + p·csa], element (p, j) of B is b[p·rsb + j·csb]: any
/// strides, so a transposed operand is the same call with its strides swapped. C has
/// contiguous rows, ldc apart. C must not overlap A, B or bias.
template <class T>
struct gemm_args {
  index_t m, n, k;
  const T* a;
  index_t rsa, csa;
  const T* b;
  index_t rsb, csb;
  T* c;
  index_t ldc;
  bool accumulate;
  const T* bias;
};

/// One level's GEMM loops (detail/gemm.inl).
template <class T>
struct gemm_kernels {
  cpu_level level;
  index_t mr, nr;  ///< the micro-kernel's block of C
  void (*pack_b)(const gemm_args<T>& g, index_t j0, index_t n, index_t kc, T* bp);
  void (*item)(const gemm_args<T>& g, index_t i0, index_t m, index_t j0, index_t n, index_t kc,
               const T* bp, T* ap);
};

/// The blocking, in elements: rows of one work item, columns of B packed at a time, and the
/// depth of one panel.
#ifndef XATTN_GEMM_MC
#  define XATTN_GEMM_MC 144
#endif
#ifndef XATTN_GEMM_NC
#  define XATTN_GEMM_NC 512
#endif
#ifndef XATTN_GEMM_KC
#  define XATTN_GEMM_KC 256
#endif
template <class T>
inline constexpr index_t gemm_mc = XATTN_GEMM_MC;
template <class T>
inline constexpr index_t gemm_nc = XATTN_GEMM_NC;
template <class T>
inline constexpr index_t gemm_kc = XATTN_GEMM_KC * 4 / index_t(sizeof(T));

/// The depth of one panel for depth k: the fewest panels of at most gemm_kc, made equal.
template <class T>
inline index_t gemm_panel_depth(index_t k) noexcept {
  const index_t panels = (k + gemm_kc<T> - 1) / gemm_kc<T>;
  return panels == 0 ? 0 : (k + panels - 1) / panels;
}

}  // namespace xattn::detail

#if defined(__GNUC__)
#  define XATTN_DETAIL_LOOP_INLINE inline __attribute__((always_inline))
#else
#  define XATTN_DETAIL_LOOP_INLINE EIGEN_STRONG_INLINE
#endif

#if XATTN_DETAIL_LOOPS_HERE && XATTN_DISPATCH
XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_SSE2)
namespace xattn::detail::cpu_sse2 {
#  include "xattn/detail/gemm.inl"
}  // namespace xattn::detail::cpu_sse2
XATTN_DETAIL_TARGET_POP

XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX2)
namespace xattn::detail::cpu_avx2 {
#  include "xattn/detail/gemm.inl"
}  // namespace xattn::detail::cpu_avx2
XATTN_DETAIL_TARGET_POP

XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX512)
namespace xattn::detail::cpu_avx512 {
#  include "xattn/detail/gemm.inl"
}  // namespace xattn::detail::cpu_avx512
XATTN_DETAIL_TARGET_POP
#elif XATTN_DETAIL_LOOPS_HERE
namespace xattn::detail::cpu_eigen {
#  include "xattn/detail/gemm.inl"
}  // namespace xattn::detail::cpu_eigen
#endif

#undef XATTN_DETAIL_LOOP_INLINE

namespace xattn::detail {

/// Test hook: GEMM loops that stand in for every level's (an emulated level's), or null.
template <class T>
std::atomic<const gemm_kernels<T>*>& substitute_gemm() noexcept {
  static std::atomic<const gemm_kernels<T>*> loops{nullptr};
  return loops;
}

/// The compiled GEMM loops of level l (one of built_levels; avx512bf16 runs avx512's): in this
/// file or, with XATTN_PREBUILT_LOOPS, in src/prebuilt_loops.cpp for float and double.
template <class T>
const gemm_kernels<T>& level_gemm_kernels(cpu_level l) noexcept;

#if XATTN_DETAIL_LOOPS_HERE
template <class T>
const gemm_kernels<T>& level_gemm_kernels(cpu_level l) noexcept {
#  if XATTN_DISPATCH
  switch (l) {
    case cpu_level::avx512bf16:
    case cpu_level::avx512:
      return cpu_avx512::gemm_loops<T>;
    case cpu_level::avx2:
      return cpu_avx2::gemm_loops<T>;
    default:
      return cpu_sse2::gemm_loops<T>;
  }
#  else
  (void)l;
  return cpu_eigen::gemm_loops<T>;
#  endif
}
#endif

/// The GEMM loops of level l, which must be one of built_levels.
template <class T>
const gemm_kernels<T>& gemm_kernels_for(cpu_level l) noexcept {
  if (const gemm_kernels<T>* s = substitute_gemm<T>().load(std::memory_order_relaxed)) return *s;
  return level_gemm_kernels<T>(l);
}

/// The threads a product of these sizes is worth: at most `threads`, at most one per work item
/// and none for less than min_flops_per_thread (a small product never starts a team).
template <class T>
int gemm_threads(index_t m, index_t n, index_t k, int threads) noexcept {
  const index_t items = (m + gemm_mc<T> - 1) / gemm_mc<T>;
  const double flops = 2.0 * double(m) * double(n) * double(k);
  return int(std::max(1.0, std::min({double(threads), double(items), flops / min_flops_per_thread})));
}

/// Runs g (gemm_args) with the loops `kern` on at most `threads` threads. The packing buffers are
/// allocated before C is written, so a failed allocation leaves C as it was.
template <class T>
void gemm_with(const gemm_kernels<T>& kern, const gemm_args<T>& g, int threads) {
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {
    for (index_t i = 0; i < g.m; ++i)
      for (index_t j = 0; j < g.n; ++j) {
        T x = g.accumulate ? g.c[i * g.ldc + j] : T(0);
        g.c[i * g.ldc + j] = g.bias ? x + g.bias[j] : x;
      }
    return;
  }
  const index_t mc = gemm_mc<T>, nc = gemm_nc<T>, kc = gemm_panel_depth<T>(g.k);
  const index_t row_items = (g.m + mc - 1) / mc;
  const auto round_up = [](index_t x, index_t to) { return (x + to - 1) / to * to; };
  const index_t a_size = round_up(std::min(mc, g.m), kern.mr) * kc;
  const index_t b_size = round_up(std::min(nc, g.n), kern.nr) * g.k;
  const int team = gemm_threads<T>(g.m, g.n, g.k, threads);
  const std::unique_ptr<T[]> work(new T[std::size_t(b_size + a_size * team)]);
  T* const bp = work.get();
  // B is packed once per block of nc columns and shared by every row item and thread.
  for (index_t j0 = 0; j0 < g.n; j0 += nc) {
    const index_t n = std::min(nc, g.n - j0);
    kern.pack_b(g, j0, n, kc, bp);
    parallel_for(row_items, team, [&](index_t item, int thread) {
      const index_t i0 = item * mc;
      kern.item(g, i0, std::min(mc, g.m - i0), j0, n, kc, bp,
                bp + b_size + index_t(thread) * a_size);
    });
  }
}

/// g on the active level's loops, on up to default_threads() threads.
template <class T>
void gemm(const gemm_args<T>& g) {
  gemm_with(gemm_kernels_for<T>(active_level()), g, default_threads());
}

}  // namespace xattn::detail
