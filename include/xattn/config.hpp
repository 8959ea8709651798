// SPDX-License-Identifier: MIT
// Configuration shared by every xattn header: the index type and the two hooks through which the
// library reports problems. Read errors.hpp next.
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstdlib>

namespace xattn {

/// Signed index type for extents, strides and loop counters (the same as std::ptrdiff_t).
using index_t = std::ptrdiff_t;

}  // namespace xattn

// XATTN_ASSERT(cond) guards internal invariants and element indexing. It is off under NDEBUG,
// like assert(). Define it before including any xattn header to route it elsewhere.
#ifndef XATTN_ASSERT
#  include <cassert>
#  define XATTN_ASSERT(cond) assert(cond)
#endif

// Whether this translation unit is compiled with exception support.
#if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#  define XATTN_HAS_EXCEPTIONS 1
#else
#  define XATTN_HAS_EXCEPTIONS 0
#endif

// XATTN_THROW(err) reports a bad argument at a public entry point; these checks are always on.
// By default it throws err. Without exception support (-fno-exceptions) it prints err.what() to
// stderr and calls std::abort(). Define it before including any xattn header to replace both.
#ifndef XATTN_THROW
#  if XATTN_HAS_EXCEPTIONS
#    define XATTN_THROW(err) throw err
#  else
#    define XATTN_THROW(err) ::xattn::detail::abort_with(err)
namespace xattn::detail {
template <class Error>
[[noreturn]] void abort_with(const Error& err) noexcept {
  std::fprintf(stderr, "xattn: %s\n", err.what());
  std::abort();
}
}  // namespace xattn::detail
#  endif
#endif
