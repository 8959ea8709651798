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

// XATTN_PREBUILT_LOOPS (a config hook, default 0): 1 leaves the inner loops of every level (the
// tiled kernel's, the bf16 products', the projections' GEMM) out of each translation unit, which
// then only declares the tables of them; src/prebuilt_loops.cpp compiles them once, for the
// whole program (CMake: link xattn::prebuilt instead of xattn::xattn). A program that includes
// xattn in many files, or a build that wants them to compile fast, compiles each loop once
// instead of once per file. Every file of the program must see the same value.
#ifndef XATTN_PREBUILT_LOOPS
#  define XATTN_PREBUILT_LOOPS 0
#endif
// Whether this translation unit compiles the loops: always, but for the users of prebuilt loops
// (src/prebuilt_loops.cpp defines XATTN_DETAIL_BUILDING_LOOPS). XATTN_DETAIL_LOOPS_LINKAGE is
// the linkage of the functions that hand out their tables: inline where every file has them.
#if !XATTN_PREBUILT_LOOPS
#  define XATTN_DETAIL_LOOPS_HERE 1
#  define XATTN_DETAIL_LOOPS_LINKAGE inline
#elif defined(XATTN_DETAIL_BUILDING_LOOPS)
#  define XATTN_DETAIL_LOOPS_HERE 1
#  define XATTN_DETAIL_LOOPS_LINKAGE
#else
#  define XATTN_DETAIL_LOOPS_HERE 0
#  define XATTN_DETAIL_LOOPS_LINKAGE
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

// XATTN_DETAIL_UNROLL before a loop of a compile-time trip count (a micro-kernel's rows and
// packets) unrolls it completely at any optimisation level: GCC unrolls such loops by itself
// only at -O3, and a micro-kernel whose accumulators are not unrolled into registers runs
// several times slower (-O2 is CMake's RelWithDebInfo and many projects' release level).
#if defined(__clang__)
#  define XATTN_DETAIL_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#  define XATTN_DETAIL_UNROLL _Pragma("GCC unroll 64")
#else
#  define XATTN_DETAIL_UNROLL
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

/// The CPU's vendor (CPUID leaf 0) and display family (leaf 1: base family, plus the extended
/// family where the base is 15), for choices that depend on the core rather than on its
/// instruction set (bf16_products_pay).
struct cpu_identity {
  enum class vendor_id { other, amd, intel } vendor = vendor_id::other;
  unsigned family = 0;
};
#if XATTN_DISPATCH
inline cpu_identity this_cpu() noexcept {
  cpu_identity id;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return id;
  // the vendor string is EBX, EDX, ECX: "AuthenticAMD", "GenuineIntel"
  if (b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u)
    id.vendor = cpu_identity::vendor_id::amd;
  else if (b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu)
    id.vendor = cpu_identity::vendor_id::intel;
  if (__get_cpuid(1, &a, &b, &c, &d) != 0) {
    const unsigned base = (a >> 8) & 0xfu, ext = (a >> 20) & 0xffu;
    id.family = base == 0xfu ? base + ext : base;
  }
  return id;
}
#endif

/// Whether bf16 calls gain by multiplying in bf16 (vdpbf16ps, detail/bf16_products.inl) rather
/// than widening bf16 to float on a core of this identity: the rule is that vdpbf16ps (two
/// products per lane) must run at least 1.3x the FLOP rate of vfmadd231ps, since the products
/// path also rounds the probabilities and packs pairs. Measured on 2-core cloud instances
/// (512-bit throughput loops, 12 independent accumulators; bench_attention):
///   AMD Zen 4 (family 0x19): vdpbf16ps 231 against vfmadd231ps 115 GFLOP/s (2.0x); the
///     products path ran 1.46x float at 1024^2 and 1.51x at 4096^2.  -> products
///   AMD Zen 5 (family 0x1a): 375-386 against 204-216 GFLOP/s (1.8x); the products path ran
///     1.6x float at 1024^2.  -> products
///   Intel Xeons with AVX-512 BF16 (Cooper Lake, Sapphire Rapids and later): vdpbf16ps at
///     about half the FMA rate; the products path ran 0.55x float where widening ran 0.8x.
///     -> widen
/// A core not in this table widens: never slower than the float loops on widened tiles.
inline constexpr bool bf16_products_pay(const cpu_identity& id) noexcept {
  return id.vendor == cpu_identity::vendor_id::amd && id.family >= 0x19u;
}

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
