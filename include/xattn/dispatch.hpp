// SPDX-License-Identifier: MIT
// Which instruction set tiled_attention's inner loops run on. A build for x86-64 with GCC or
// Clang compiles them for four levels, "avx512bf16" (avx512 with AVX-512 BF16: bf16 calls
// multiply in bf16, detail/bf16_products.inl), "avx512" (F, BW, DQ, VL), "avx2" (with FMA; all
// with F16C, for the half types) and "sse2" (every x86-64 CPU), and each process runs the
// fastest one its CPU supports: no -march flag is needed for full speed. Other builds (AArch64,
// MSVC, or XATTN_DISPATCH defined to 0) have one path, "eigen": Eigen's packets for the compiler's
// own target (NEON on AArch64).
//
// The environment variable XATTN_CPU_PATH, read once per process, lowers the automatic choice to
// the path it names (to reproduce a user's older machine); a name this build does not have, or
// a path above the CPU's, leaves the choice as it is. set_cpu_path forces a path from the code.
// The result of a call depends on its path only through rounding: every path is tested against
// the same reference, and each is deterministic across thread counts.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/cpu.hpp"
#include "xattn/detail/kernels.hpp"
#include "xattn/errors.hpp"

#include <iterator>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace xattn {

/// The path tiled_attention calls starting now run on: "avx512bf16", "avx512", "avx2", "sse2" or
/// "eigen".
inline std::string_view cpu_path() noexcept { return detail::level_name(detail::active_level()); }

/// The path tiled_attention calls on element type T starting now run on: cpu_path() for float
/// and double; for the half types, cpu_path() and how each tile of keys and values is widened
/// to float (half.hpp): "+f16c" (vcvtph2ps) or "+scalar" for fp16, "+shift" (a bf16 is the high
/// half of a float: shifts, byte shuffles or interleaving) or "+scalar" for bf16. On avx512bf16,
/// bf16 is "+dpbf16" where the core multiplies bf16 faster than it widens (detail::
/// bf16_products_pay: AMD Zen 4 and Zen 5, whose vdpbf16ps runs 2.0x and 1.8x the FMA's FLOP
/// rate; not the Intel Xeons, where it runs at half of it) or where the path was named by set_cpu_path
/// or XATTN_CPU_PATH: a bf16 call's query tiles (the lanes path: at least a packet of queries)
/// multiply bf16 pairs into float sums with vdpbf16ps, the probabilities rounded to bf16 for
/// P·V, as GPU FlashAttention does; its few-query rows (a decoder step), the mixed call (float
/// queries, half keys and values) and the backward widen to float as on avx512. Elsewhere on
/// avx512bf16, bf16 is "+shift", widened as on avx512.
/// ("+dpbf16-emulated" is the avx2 level under a test hook, detail::emulate_bf16_products.)
template <class T>
std::string cpu_path_for() {
  const detail::cpu_level l = detail::active_level();
  std::string name = detail::level_name(l);
  if constexpr (std::is_same_v<T, Eigen::half>)
    name += int(l) >= int(detail::cpu_level::avx2) ? "+f16c" : "+scalar";
  else if constexpr (std::is_same_v<T, Eigen::bfloat16>)
    name += l == detail::cpu_level::eigen             ? "+scalar"
            : detail::bf16_products_for(l) == nullptr ? "+shift"
            : l == detail::cpu_level::avx512bf16      ? "+dpbf16"
                                                      : "+dpbf16-emulated";
  return name;
}

/// The paths this build has and this CPU runs, fastest first.
inline std::vector<std::string_view> cpu_paths() {
  std::vector<std::string_view> names;
  for (auto it = std::rbegin(detail::built_levels); it != std::rend(detail::built_levels); ++it)
    if (detail::level_available(*it)) names.emplace_back(detail::level_name(*it));
  return names;
}

/// Makes every tiled_attention call that starts after it run on the named path (one of
/// cpu_paths()), in every thread of the process; calls already running keep theirs. A name
/// that is not one of cpu_paths() is a value_error, and the path stays as it was.
inline void set_cpu_path(std::string_view name) {
  for (detail::cpu_level l : detail::built_levels)
    if (name == detail::level_name(l) && detail::level_available(l)) {
      detail::forced_level().store(int(l), std::memory_order_relaxed);
      return;
    }
  std::string known;
  for (std::string_view n : cpu_paths()) known += (known.empty() ? "" : ", ") + std::string(n);
  detail::fail_value(detail::message(
      "set_cpu_path: \"", name, "\" is not a path of this build and CPU; expected one of ", known));
}

/// Back to the automatic choice: the fastest path, lowered by XATTN_CPU_PATH.
inline void reset_cpu_path() noexcept {
  detail::forced_level().store(-1, std::memory_order_relaxed);
}

}  // namespace xattn
