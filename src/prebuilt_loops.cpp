// SPDX-License-Identifier: MIT
// The inner loops of every instruction-set level, compiled once for a program whose other files
// define XATTN_PREBUILT_LOOPS=1 (detail/cpu.hpp). CMake builds this file as xattn::prebuilt; a
// build without CMake compiles it with the same flags and definitions as the program's files
// (the same XATTN_DISPATCH and -march) and links it in.
#ifndef XATTN_PREBUILT_LOOPS
#  define XATTN_PREBUILT_LOOPS 1
#endif
#if !XATTN_PREBUILT_LOOPS
#  error "src/prebuilt_loops.cpp is for programs built with XATTN_PREBUILT_LOOPS=1"
#endif
#define XATTN_DETAIL_BUILDING_LOOPS 1

#include "xattn/detail/gemm.hpp"
#include "xattn/detail/kernels.hpp"

namespace xattn::detail {

// The element types the drivers compute in (compute_t: float for the half types).
template const tile_kernels<float>& level_kernels<float>(cpu_level) noexcept;
template const tile_kernels<double>& level_kernels<double>(cpu_level) noexcept;
template const gemm_kernels<float>& level_gemm_kernels<float>(cpu_level) noexcept;
template const gemm_kernels<double>& level_gemm_kernels<double>(cpu_level) noexcept;

}  // namespace xattn::detail
