// SPDX-License-Identifier: MIT
// The tiled kernel's inner loops (detail/online_softmax.inl), compiled once per instruction-set
// level of this build (detail/cpu.hpp), and the choice of one level per process. The rest of
// tiled_attention is compiled once and calls the loops through a tile_kernels table: one
// indirect call per tile of keys, not per element.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"
#include "xattn/quantized.hpp"
#if XATTN_DETAIL_LOOPS_HERE  // the packets the loops are written in
#  include "xattn/detail/simd.hpp"
#  include "xattn/detail/simd_avx2.hpp"
#  include "xattn/detail/simd_avx512.hpp"
#  include "xattn/detail/simd_avx512bf16.hpp"
#  include "xattn/detail/simd_sse2.hpp"
#endif

#include <Eigen/Core>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

namespace xattn::detail {

/// The row path's products on keys or values stored in blocks of type B (quantized.hpp), read
/// in place, and the lanes path's dequantization of a row (online_softmax.inl has each); T =
/// float only, null otherwise.
template <class T, class B>
struct quant_kernels {
  /// s[g * lds + j] = q_g · K[j] for `rows` query rows q_g = q + g · ldq (sharing the keys).
  void (*rows_scores)(const T* q, index_t ldq, index_t rows, const B* k, index_t ldk,
                      index_t head_dim, index_t n, T* s, index_t lds);
  /// acc_g = corr[g] · acc_g + Σ_j p_g[j] · V[j] for `rows` rows (p + g · ldp, acc + g · lda).
  void (*rows_values)(const T* p, index_t ldp, index_t rows, const B* v, index_t ldv,
                      index_t value_dim, index_t n, const T* corr, T* acc, index_t lda);
  void (*dequantize_row)(const B* x, index_t d, T* y);
};

/// One level's inner loops (see detail/online_softmax.inl for each).
template <class T>
struct tile_kernels {
  cpu_level level;
  index_t lanes;  ///< lanes of one packet of T: the query tile's width is a multiple of it
  void (*tile_scores)(index_t n, index_t packets, const T* k, index_t ldk, const T* qt, index_t ldq,
                      index_t head_dim, T* s, index_t lds);
  void (*online_softmax_tile)(T* s, index_t lds, index_t n, index_t packets, T* m, T* l, T* corr);
  void (*tile_values)(index_t n, index_t packets, const T* v, index_t ldv, const T* pt, index_t ldp,
                      index_t value_dim, const T* corr, T* ot, index_t ldo);
  void (*row_scores)(const T* q, const T* k, index_t ldk, index_t head_dim, index_t n, T* s);
  void (*online_softmax_row)(T* s, index_t n, T m_old, T& m_new, T& sum);
  void (*row_values)(const T* p, const T* v, index_t ldv, index_t value_dim, index_t n, T corr,
                     T* acc);
  void (*exp_flushed)(const T* x, index_t n, T* y);
  /// y = x widened to T, for the half types' tiles of keys and values (half.hpp)
  void (*widen_fp16)(const Eigen::half* x, index_t n, T* y);
  void (*widen_bf16)(const Eigen::bfloat16* x, index_t n, T* y);
  /// y = x rounded to nearest even, for the half types' outputs
  void (*narrow_fp16)(const T* x, index_t n, Eigen::half* y);
  void (*narrow_bf16)(const T* x, index_t n, Eigen::bfloat16* y);
  /// row_scores and row_values reading fp16 or bf16 keys and values in place (T = float only;
  /// null otherwise)
  void (*row_scores_fp16)(const T* q, const Eigen::half* k, index_t ldk, index_t head_dim,
                          index_t n, T* s);
  void (*row_scores_bf16)(const T* q, const Eigen::bfloat16* k, index_t ldk, index_t head_dim,
                          index_t n, T* s);
  void (*row_values_fp16)(const T* p, const Eigen::half* v, index_t ldv, index_t value_dim,
                          index_t n, T corr, T* acc);
  void (*row_values_bf16)(const T* p, const Eigen::bfloat16* v, index_t ldv, index_t value_dim,
                          index_t n, T corr, T* acc);
  /// the same on q8 and q4 blocks (T = float only; null otherwise)
  quant_kernels<T, q8_block> q8;
  quant_kernels<T, q4_block> q4;
};

/// The lanes path's products in bf16 arithmetic (detail/bf16_products.inl explains them), for
/// bf16 calls on the avx512bf16 level.
struct bf16_product_kernels {
  index_t lanes;  ///< lanes of one float packet: must equal the level's tile_kernels<float>
  void (*tile_scores)(index_t n, index_t packets, const Eigen::bfloat16* k, index_t ldk,
                      const Eigen::bfloat16* qp, index_t ldq, index_t dpairs, float scale, float* s,
                      index_t lds);
  void (*round_probabilities)(const float* s, index_t lds, index_t n, index_t packets,
                              Eigen::bfloat16* pp, index_t ldp);
  void (*pack_pairs)(const Eigen::bfloat16* v, index_t ldv, index_t n, index_t value_dim,
                     Eigen::bfloat16* vp);
  void (*tile_values)(index_t kpairs, index_t packets, const Eigen::bfloat16* vp, index_t ldv,
                      const Eigen::bfloat16* pp, index_t ldp, index_t value_dim, const float* corr,
                      float* ot, index_t ldo);
};

}  // namespace xattn::detail

#if defined(__GNUC__)
#  define XATTN_DETAIL_LOOP_INLINE inline __attribute__((always_inline))
#else
#  define XATTN_DETAIL_LOOP_INLINE EIGEN_STRONG_INLINE
#endif

#if XATTN_DETAIL_LOOPS_HERE && XATTN_DISPATCH
XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_SSE2)
namespace xattn::detail::cpu_sse2 {
inline constexpr cpu_level level = cpu_level::sse2;
#  include "xattn/detail/online_softmax.inl"
}  // namespace xattn::detail::cpu_sse2
XATTN_DETAIL_TARGET_POP

XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX2)
namespace xattn::detail::cpu_avx2 {
inline constexpr cpu_level level = cpu_level::avx2;
#  include "xattn/detail/bf16_products.inl"  // emulated: for testing them on any AVX2 CPU
#  include "xattn/detail/online_softmax.inl"
}  // namespace xattn::detail::cpu_avx2
XATTN_DETAIL_TARGET_POP

XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX512)
namespace xattn::detail::cpu_avx512 {
inline constexpr cpu_level level = cpu_level::avx512;
#  include "xattn/detail/online_softmax.inl"
}  // namespace xattn::detail::cpu_avx512
XATTN_DETAIL_TARGET_POP

XATTN_DETAIL_TARGET_PUSH(XATTN_DETAIL_TARGET_AVX512BF16)
namespace xattn::detail::cpu_avx512bf16 {
inline constexpr cpu_level level = cpu_level::avx512bf16;
#  include "xattn/detail/bf16_products.inl"  // the float loops are the avx512 level's
}  // namespace xattn::detail::cpu_avx512bf16
XATTN_DETAIL_TARGET_POP
#elif XATTN_DETAIL_LOOPS_HERE
namespace xattn::detail::cpu_eigen {
inline constexpr cpu_level level = cpu_level::eigen;
#  include "xattn/detail/online_softmax.inl"
}  // namespace xattn::detail::cpu_eigen
#endif

#undef XATTN_DETAIL_LOOP_INLINE

namespace xattn::detail {

/// The fastest level of this build that this CPU runs.
inline cpu_level best_level() noexcept {
  cpu_level best = built_levels[0];
  for (cpu_level l : built_levels)
    if (level_available(l)) best = l;
  return best;
}

/// The level chosen when none is forced: the best one, or the one the environment variable
/// XATTN_CPU_PATH names if that is lower (a name this build does not have is ignored). Read
/// once per process.
inline cpu_level automatic_level() noexcept {
  static const cpu_level chosen = [] {
    cpu_level l = best_level();
    if (const char* env = std::getenv("XATTN_CPU_PATH"))
      for (cpu_level b : built_levels)
        if (std::strcmp(env, level_name(b)) == 0 && int(b) < int(l)) l = b;
    return l;
  }();
  return chosen;
}

/// The level set_cpu_path forced, or -1.
inline std::atomic<int>& forced_level() noexcept {
  static std::atomic<int> forced{-1};
  return forced;
}

inline cpu_level active_level() noexcept {
  const int f = forced_level().load(std::memory_order_relaxed);
  return f >= 0 ? cpu_level(f) : automatic_level();
}

/// Test hook: loops that stand in for every level's (an emulated level's, tests/
/// emulated_levels.hpp), or null. Not for production.
template <class T>
std::atomic<const tile_kernels<T>*>& substitute_loops() noexcept {
  static std::atomic<const tile_kernels<T>*> loops{nullptr};
  return loops;
}
inline std::atomic<const bf16_product_kernels*>& substitute_products() noexcept {
  static std::atomic<const bf16_product_kernels*> products{nullptr};
  return products;
}
/// Sets the stand-ins (null: none); products are used only while floats is set.
inline void substitute_kernels(const tile_kernels<float>* floats,
                               const tile_kernels<double>* doubles,
                               const bf16_product_kernels* products) noexcept {
  substitute_loops<float>().store(floats, std::memory_order_relaxed);
  substitute_loops<double>().store(doubles, std::memory_order_relaxed);
  substitute_products().store(products, std::memory_order_relaxed);
}

/// The compiled tables of level l (one of built_levels): where the loops are compiled, in this
/// file or, with XATTN_PREBUILT_LOOPS, in src/prebuilt_loops.cpp for float and double.
template <class T>
const tile_kernels<T>& level_kernels(cpu_level l) noexcept;
/// The bf16-product loops of level l (avx512bf16, or avx2's emulated ones), or null.
XATTN_DETAIL_LOOPS_LINKAGE const bf16_product_kernels* level_bf16_products(cpu_level l) noexcept;

#if XATTN_DETAIL_LOOPS_HERE
template <class T>
const tile_kernels<T>& level_kernels(cpu_level l) noexcept {
#  if XATTN_DISPATCH
  switch (l) {
    case cpu_level::avx512bf16:
    case cpu_level::avx512:
      return cpu_avx512::kernels<T>;
    case cpu_level::avx2:
      return cpu_avx2::kernels<T>;
    default:
      return cpu_sse2::kernels<T>;
  }
#  else
  (void)l;
  return cpu_eigen::kernels<T>;
#  endif
}

XATTN_DETAIL_LOOPS_LINKAGE const bf16_product_kernels* level_bf16_products(cpu_level l) noexcept {
#  if XATTN_DISPATCH
  if (l == cpu_level::avx512bf16) return &cpu_avx512bf16::bf16_products;
  if (l == cpu_level::avx2) return &cpu_avx2::bf16_products;
#  endif
  (void)l;
  return nullptr;
}
#endif

/// The inner loops of level l, which must be one of built_levels.
template <class T>
const tile_kernels<T>& kernels_for(cpu_level l) noexcept {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
    if (const tile_kernels<T>* s = substitute_loops<T>().load(std::memory_order_relaxed)) return *s;
  return level_kernels<T>(l);
}

/// Test hook: when set, the avx2 level's bf16 calls run the bf16-product loops too, with each
/// vdpbf16ps emulated by two FMAs (simd_avx2.hpp), so that those loops are tested on CPUs
/// without AVX-512 BF16. Not for production: it is slower than widening.
inline std::atomic<bool>& emulate_bf16_products() noexcept {
  static std::atomic<bool> on{false};
  return on;
}

/// Whether the avx512bf16 level was asked for by name (set_cpu_path or XATTN_CPU_PATH): then
/// bf16 calls multiply in bf16 whatever the core, else only where bf16_products_pay says so.
inline bool avx512bf16_named() noexcept {
  static const bool by_environment = [] {
    const char* env = std::getenv("XATTN_CPU_PATH");
    return env != nullptr && std::strcmp(env, level_name(cpu_level::avx512bf16)) == 0;
  }();
  const int f = forced_level().load(std::memory_order_relaxed);
  return f == int(cpu_level::avx512bf16) || (f < 0 && by_environment);
}

/// Whether this core gains by the bf16 products (bf16_products_pay), read once per process.
inline bool bf16_products_pay_here() noexcept {
#if XATTN_DISPATCH
  static const bool pay = bf16_products_pay(this_cpu());
  return pay;
#else
  return false;
#endif
}

/// The bf16-product loops of level l, or null where bf16 tiles are widened to float: on the
/// avx512bf16 level where the core gains by them or the level was named.
inline const bf16_product_kernels* bf16_products_for(cpu_level l) noexcept {
  if (substitute_loops<float>().load(std::memory_order_relaxed) != nullptr)
    return substitute_products().load(std::memory_order_relaxed);
  if (l == cpu_level::avx512bf16 && (bf16_products_pay_here() || avx512bf16_named()))
    return level_bf16_products(l);
  if (l == cpu_level::avx2 && emulate_bf16_products().load(std::memory_order_relaxed))
    return level_bf16_products(l);
  return nullptr;
}

/// The inner loops a tiled_attention call starting now runs.
template <class T>
const tile_kernels<T>& active_kernels() noexcept {
  return kernels_for<T>(active_level());
}

}  // namespace xattn::detail
