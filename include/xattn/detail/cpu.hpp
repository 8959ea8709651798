// SPDX-License-Identifier: MIT
// What the CPU can run, and how one translation unit compiles code for several instruction sets.
// detail/kernels.hpp builds the tiled kernel's inner loops once per level named here;
// dispatch.hpp picks one level per process.
#pragma once

#include "xattn/config.hpp"

// XATTN_DISPATCH (a config hook): 1 compiles the inner loops for every x86-64 level below and
// picks one at run time; 0 compiles them once, for the build's own target, through Eigen's
// packets (NEON on AArch64, whatever -m flags give on x86). It defaults to 1 where GCC or Clang
// target x86-64, and must be 0 elsewhere.
#ifndef XATTN_DISPATCH
#  if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#    define XATTN_DISPATCH 1
#  else
#    define XATTN_DISPATCH 0
#  endif
#endif

// A region of code compiled for more instruction-set extensions than the rest of the translation
// unit: every function defined between XATTN_DETAIL_TARGET_PUSH("avx2,fma") and
// XATTN_DETAIL_TARGET_POP may use them (GCC's target pragma, Clang's attribute pragma, which
// also reaches templates and lambdas). Standard and Eigen headers must be included before a
// region opens, or their functions would be compiled for it too.
#if XATTN_DISPATCH
#  include <cpuid.h>
#  include <immintrin.h>
#  define XATTN_DETAIL_STRINGIFY(x) #  x
#  if defined(__clang__)
#    define XATTN_DETAIL_TARGET_PUSH(t) \
      _Pragma(XATTN_DETAIL_STRINGIFY(   \
          clang attribute push(__attribute__((target(t))), apply_to = function)))
#    define XATTN_DETAIL_TARGET_POP _Pragma("clang attribute pop")
#  else
// GCC 12's AVX-512 intrinsics pass an uninitialised vector as the unused merge source, which
// -Wmaybe-uninitialized reports wherever they are inlined (fixed in GCC 13).
#    define XATTN_DETAIL_TARGET_PUSH(t)                                          \
      _Pragma("GCC push_options") _Pragma(XATTN_DETAIL_STRINGIFY(GCC target(t))) \
          _Pragma("GCC diagnostic push")                                         \
              _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")        \
                  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#    define XATTN_DETAIL_TARGET_POP _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#  endif
// The extensions of each level, as target strings.
#  define XATTN_DETAIL_TARGET_SSE2 "sse2"
#  define XATTN_DETAIL_TARGET_AVX2 "avx2,fma,f16c"
#  define XATTN_DETAIL_TARGET_AVX512 "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#  define XATTN_DETAIL_TARGET_AVX512BF16 \
    "avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c"
#endif

namespace xattn::detail {

/// The instruction-set levels of the inner loops, slowest first. `eigen` is the single level of
/// a build without dispatch. `avx512bf16` is avx512 with AVX-512 BF16 (vdpbf16ps): the same
/// loops, except that bf16 calls multiply in bf16 (detail/bf16_products.inl).
enum class cpu_level : int { eigen = 0, sse2 = 1, avx2 = 2, avx512 = 3, avx512bf16 = 4 };

inline constexpr const char* level_name(cpu_level l) noexcept {
  switch (l) {
    case cpu_level::sse2:
      return "sse2";
    case cpu_level::avx2:
      return "avx2";
    case cpu_level::avx512:
      return "avx512";
    case cpu_level::avx512bf16:
      return "avx512bf16";
    default:
      return "eigen";
  }
}

#if XATTN_DISPATCH
/// F16C (vcvtph2ps, the fp16 conversion of the avx2 and avx512 levels), from CPUID leaf 1:
/// every CPU with AVX2 has it, but a virtual machine may hide it. Read directly because not
/// every compiler's __builtin_cpu_supports knows the name.
inline bool cpu_has_f16c() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid(1, &a, &b, &c, &d) != 0 && (c & bit_F16C) != 0;
}

/// AVX-512 BF16 (vdpbf16ps, vcvtne2ps2bf16), from CPUID leaf 7, sub-leaf 1 (EAX bit 5): Zen 4,
/// Cooper Lake, Sapphire Rapids and later.
inline bool cpu_has_avx512_bf16() noexcept {
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) != 0 && (a & (1u << 5)) != 0;
}
#endif

/// Whether this build has the level's loops and this CPU (and its operating system, which must
/// save the wider registers) can run them.
inline bool level_available(cpu_level l) noexcept {
#if XATTN_DISPATCH
  __builtin_cpu_init();
  switch (l) {
    case cpu_level::sse2:
      return true;  // part of x86-64
    case cpu_level::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case cpu_level::avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case cpu_level::avx512bf16:
      return level_available(cpu_level::avx512) && cpu_has_avx512_bf16();
    default:
      return false;
  }
#else
  return l == cpu_level::eigen;
#endif
}

/// The levels this build has, slowest first.
#if XATTN_DISPATCH
inline constexpr cpu_level built_levels[] = {cpu_level::sse2, cpu_level::avx2, cpu_level::avx512,
                                             cpu_level::avx512bf16};
#else
inline constexpr cpu_level built_levels[] = {cpu_level::eigen};
#endif

}  // namespace xattn::detail
