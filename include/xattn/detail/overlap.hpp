// SPDX-License-Identifier: MIT
// Memory-overlap checks for outputs: against inputs and other outputs, and within one view.
// Every public function that writes through views runs them before any work.
#pragma once

#include "xattn/config.hpp"
#include "xattn/errors.hpp"
#include "xattn/tensor_view.hpp"

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace xattn::detail {

/// The bytes a view may touch, [begin, end): from its first element to one past its last.
/// Empty (begin == end) for a view without elements.
struct byte_range {
  std::uintptr_t begin = 0, end = 0;
};

template <class E, std::size_t Rank>
byte_range bytes_of(const tensor_view<E, Rank>& v) noexcept {
  if (v.size() == 0) return {};
  index_t last = 0;  // the view's constructor checked that this offset fits in index_t
  for (std::size_t r = 0; r < Rank; ++r) last += (v.extent(r) - 1) * v.stride(r);
  const auto first = reinterpret_cast<std::uintptr_t>(v.data());
  const std::uintptr_t room = (std::numeric_limits<std::uintptr_t>::max() - first) / sizeof(E);
  if (std::uintptr_t(last) >= room)  // reaches past the address space: say "up to the end"
    return {first, std::numeric_limits<std::uintptr_t>::max()};
  return {first, first + (std::uintptr_t(last) + 1) * sizeof(E)};
}

/// Fails when output view `out` shares a byte range with view `other`. The test compares the
/// first-to-last byte ranges, so two views that interleave without sharing an element (the even
/// and the odd columns of one buffer) are rejected too: conservative, never a false pass.
template <class O, std::size_t RO, class E, std::size_t RE>
void require_disjoint(const char* fn, const char* out_name, const tensor_view<O, RO>& out,
                      const char* other_name, const tensor_view<E, RE>& other) {
  const byte_range a = bytes_of(out), b = bytes_of(other);
  if (a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end)
    fail_shape(
        message(fn, ": ", out_name, " overlaps ", other_name,
                " in memory (outputs must not share memory with any input or other output)"));
}

/// Fails when two elements of output view `out` may share an address. Dimensions with more than
/// one element, taken by increasing stride, must each step past everything the smaller ones span:
/// true of every packed, padded, permuted or split_heads layout. Conservative like
/// require_disjoint: rare layouts that interleave without collisions are rejected too.
template <class O, std::size_t Rank>
void require_no_self_overlap(const char* fn, const char* out_name,
                             const tensor_view<O, Rank>& out) {
  if (out.size() == 0) return;
  std::array<std::size_t, Rank> order{};
  for (std::size_t r = 0; r < Rank; ++r) order[r] = r;
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return out.stride(a) < out.stride(b); });
  index_t span = 0;  // largest offset reachable through the dimensions seen so far
  for (std::size_t r : order) {
    if (out.extent(r) == 1) continue;
    if (out.stride(r) <= span)
      fail_shape(message(fn, ": ", out_name, ".stride(", r, ") is ", out.stride(r),
                         ", so elements of ", out_name, " would share memory (expected > ", span,
                         ")"));
    span += (out.extent(r) - 1) * out.stride(r);
  }
}

}  // namespace xattn::detail
