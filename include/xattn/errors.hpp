// SPDX-License-Identifier: MIT
// The errors xattn reports, and the checks public functions run on their arguments before any
// work starts. Every message names the function, the argument, and what was found and expected:
//   naive_attention: v.extent(2) is 77, expected 64
#pragma once

#include "xattn/config.hpp"

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace xattn {

/// An argument's extents, strides or rank do not fit what the function needs.
struct shape_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// An argument has the right shape but a value the function cannot use (a NaN scale, a key
/// padding length outside [0, kv_len], ...).
struct value_error : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

/// A file's contents are not what its format promises (a truncated or malformed safetensors
/// file, a tensor missing from it). The message names the file and, where one is involved, the
/// tensor.
struct format_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

/// Joins the arguments into one string with operator<<.
template <class... Parts>
std::string message(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

[[noreturn]] inline void fail_shape(const std::string& what) { XATTN_THROW(shape_error(what)); }
[[noreturn]] inline void fail_value(const std::string& what) { XATTN_THROW(value_error(what)); }

/// Checks arg.extent(dim) == want.
inline void require_extent(const char* fn, const char* arg, int dim, index_t got, index_t want) {
  if (got == want) return;
  fail_shape(message(fn, ": ", arg, ".extent(", dim, ") is ", got, ", expected ", want));
}

/// Checks arg.extent(dim) is 1 (broadcast) or want.
inline void require_extent_or_one(const char* fn, const char* arg, int dim, index_t got,
                                  index_t want) {
  if (got == want || got == 1) return;
  fail_shape(message(fn, ": ", arg, ".extent(", dim, ") is ", got, ", expected 1 or ", want));
}

}  // namespace detail

/// A file could not be written (or read); the message names the path and what failed.
struct io_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace xattn
