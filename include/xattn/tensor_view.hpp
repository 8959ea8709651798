// SPDX-License-Identifier: MIT
// tensor_view<T, Rank>: a non-owning, strided, row-major view of a tensor, and the helpers that
// make one over a plain buffer or Eigen storage, or rearrange one without copying (permute,
// split_heads, to_rank). The kernels take their inputs and outputs as views.
// Read attention_naive.hpp next.
#pragma once

#include "xattn/config.hpp"
#include "xattn/errors.hpp"

#include <Eigen/Core>

#include <array>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>

namespace xattn {

/// A dynamic-size, row-major Eigen matrix (Eigen's own default is column-major).
template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace detail {

/// a * b, or fails with a shape_error when the product does not fit in index_t.
inline index_t checked_mul(const char* fn, index_t a, index_t b) {
  if (a != 0 && b > std::numeric_limits<index_t>::max() / a)
    fail_shape(message(fn, ": ", a, " * ", b, " overflows the index type"));
  return a * b;
}

}  // namespace detail

/// A non-owning view of Rank-dimensional data: element (i0, ..., iR-1) lives at
/// data() + i0 * stride(0) + ... + iR-1 * stride(R-1). Strides count elements, not bytes.
/// T may be const. A default-constructed view is null with all extents 0.
///
/// The names (rank, extent, stride, size, data, operator()) follow std::mdspan.
template <class T, std::size_t Rank>
class tensor_view {
  static_assert(Rank >= 1, "tensor_view needs a rank of at least 1");

 public:
  using element_type = T;
  using value_type = std::remove_cv_t<T>;
  using index_array = std::array<index_t, Rank>;

  tensor_view() noexcept = default;

  /// A packed row-major view: the last index is contiguous.
  tensor_view(T* data, const index_array& extents)
      : tensor_view(data, extents, packed_strides(extents)) {}

  /// A view with explicit strides (in elements, each >= 0).
  tensor_view(T* data, const index_array& extents, const index_array& strides)
      : data_(data), extents_(extents), strides_(strides) {
    validate();
  }

  /// A view of T converts to a view of const T.
  template <class U, class = std::enable_if_t<!std::is_same_v<U, T> &&
                                              std::is_convertible_v<U (*)[], T (*)[]>>>
  tensor_view(const tensor_view<U, Rank>& other) noexcept  // NOLINT: implicit on purpose
      : data_(other.data()), extents_(other.extents()), strides_(other.strides()) {}

  static constexpr std::size_t rank() noexcept { return Rank; }
  index_t extent(std::size_t r) const noexcept { return extents_[r]; }
  index_t stride(std::size_t r) const noexcept { return strides_[r]; }
  const index_array& extents() const noexcept { return extents_; }
  const index_array& strides() const noexcept { return strides_; }
  T* data() const noexcept { return data_; }

  /// The number of elements (the product of the extents).
  index_t size() const noexcept {
    index_t n = 1;
    for (index_t e : extents_) n *= e;
    return n;
  }
  bool empty() const noexcept { return size() == 0; }

  /// True when the elements are packed in row-major order with no gaps.
  bool is_packed() const noexcept { return size() == 0 || strides_ == packed_strides(extents_); }

  /// Element access; indices are checked by XATTN_ASSERT only.
  template <class... Indices>
  T& operator()(Indices... indices) const noexcept {
    static_assert(sizeof...(Indices) == Rank, "tensor_view::operator() needs one index per rank");
    const std::array<index_t, Rank> idx{static_cast<index_t>(indices)...};
    index_t offset = 0;
    for (std::size_t r = 0; r < Rank; ++r) {
      XATTN_ASSERT(idx[r] >= 0 && idx[r] < extents_[r]);
      offset += idx[r] * strides_[r];
    }
    return data_[offset];
  }

  /// The view with dimension `dim` fixed at index i: one rank lower, no copy. A view with no
  /// elements selects one with no elements, the same data pointer and all strides 0: its
  /// strides were never checked (nothing can be read through them), so no offset is taken
  /// from them, here or by whoever walks the result.
  tensor_view<T, Rank - 1> select(std::size_t dim, index_t i) const noexcept {
    static_assert(Rank >= 2, "select needs a rank of at least 2");
    XATTN_ASSERT(dim < Rank && i >= 0 && i < extents_[dim]);
    const bool none = empty();
    std::array<index_t, Rank - 1> e{}, s{};
    for (std::size_t r = 0, o = 0; r < Rank; ++r) {
      if (r == dim) continue;
      e[o] = extents_[r];
      s[o++] = none ? 0 : strides_[r];
    }
    return tensor_view<T, Rank - 1>(none ? data_ : data_ + i * strides_[dim], e, s,
                                    typename tensor_view<T, Rank - 1>::unchecked_tag{});
  }

  /// Row-major packed strides for the given extents.
  static index_array packed_strides(const index_array& extents) noexcept {
    constexpr index_t most = std::numeric_limits<index_t>::max();
    index_array s{};
    index_t step = 1;
    for (std::size_t r = Rank; r-- > 0;) {
      s[r] = step;
      // Saturates rather than overflow. Only two kinds of extents get there: those whose element
      // count overflows too (the constructor rejects them) and those with no elements at all,
      // whose strides do not matter.
      const index_t e = extents[r] > 0 ? extents[r] : 1;
      step = step > most / e ? most : step * e;
    }
    return s;
  }

 private:
  template <class, std::size_t>
  friend class tensor_view;
  struct unchecked_tag {};
  tensor_view(T* data, const index_array& extents, const index_array& strides,
              unchecked_tag) noexcept
      : data_(data), extents_(extents), strides_(strides) {}

  // Extents and strides must be >= 0, a view with elements needs data, and the largest offset
  // and the element count must fit in index_t (so no index computation can overflow).
  void validate() const {
    index_t count = 1, last = 0;
    for (std::size_t r = 0; r < Rank; ++r) {
      if (extents_[r] < 0)
        detail::fail_shape(
            detail::message("tensor_view: extent(", r, ") is ", extents_[r], ", expected >= 0"));
      if (strides_[r] < 0)
        detail::fail_shape(
            detail::message("tensor_view: stride(", r, ") is ", strides_[r], ", expected >= 0"));
      count = detail::checked_mul("tensor_view", count, extents_[r]);
    }
    if (count == 0) return;
    for (std::size_t r = 0; r < Rank; ++r) {
      const index_t step = detail::checked_mul("tensor_view", extents_[r] - 1, strides_[r]);
      if (last > std::numeric_limits<index_t>::max() - step)
        detail::fail_shape("tensor_view: the largest offset overflows the index type");
      last += step;
    }
    if (data_ == nullptr)
      detail::fail_shape(
          detail::message("tensor_view: data is null but the view has ", count, " elements"));
  }

  T* data_ = nullptr;
  index_array extents_{};
  index_array strides_{};
};

// ---- making views ------------------------------------------------------------------------------

/// A packed row-major view of a plain buffer: make_view(ptr, {B, H, L, D}).
template <class T, std::size_t Rank>
tensor_view<T, Rank> make_view(T* data, const index_t (&extents)[Rank]) {
  std::array<index_t, Rank> e{};
  for (std::size_t r = 0; r < Rank; ++r) e[r] = extents[r];
  return tensor_view<T, Rank>(data, e);
}

/// A strided view of a plain buffer: make_view(ptr, {extents...}, {strides...}).
template <class T, std::size_t Rank>
tensor_view<T, Rank> make_view(T* data, const index_t (&extents)[Rank],
                               const index_t (&strides)[Rank]) {
  std::array<index_t, Rank> e{}, s{};
  for (std::size_t r = 0; r < Rank; ++r) {
    e[r] = extents[r];
    s[r] = strides[r];
  }
  return tensor_view<T, Rank>(data, e, s);
}

/// A [rows, cols] view of Eigen storage with direct access (Matrix, Array, Map, Ref, or a
/// Block of one), row- or column-major, without copying. Const storage gives a const view.
template <class Storage, class Plain = std::decay_t<Storage>,
          class = std::enable_if_t<std::is_base_of_v<Eigen::DenseBase<Plain>, Plain>>>
auto make_view(Storage&& m) {
  static_assert(static_cast<bool>(Plain::Flags & Eigen::DirectAccessBit),
                "make_view needs Eigen storage with direct access (a Matrix, Array, Map, Ref or a "
                "Block of one); evaluate an expression into a matrix first");
  using element = std::remove_pointer_t<decltype(m.data())>;
  const index_t inner = m.innerStride(), outer = m.outerStride();
  const bool row_major = static_cast<bool>(Plain::IsRowMajor);
  return tensor_view<element, 2>(m.data(),
                                 {static_cast<index_t>(m.rows()), static_cast<index_t>(m.cols())},
                                 {row_major ? outer : inner, row_major ? inner : outer});
}

// ---- rearranging views (no copies) -------------------------------------------------------------

/// The same elements with dimensions reordered: result.extent(r) == v.extent(order[r]).
/// permute(x, {0, 2, 1, 3}) turns a [B, L, H, D] view into [B, H, L, D].
template <class T, std::size_t Rank>
tensor_view<T, Rank> permute(const tensor_view<T, Rank>& v,
                             const std::array<std::size_t, Rank>& order) {
  std::array<bool, Rank> seen{};
  std::array<index_t, Rank> e{}, s{};
  for (std::size_t r = 0; r < Rank; ++r) {
    if (order[r] >= Rank || seen[order[r]])
      detail::fail_shape(detail::message("permute: order is not a permutation of 0..", Rank - 1));
    seen[order[r]] = true;
    e[r] = v.extent(order[r]);
    s[r] = v.stride(order[r]);
  }
  return tensor_view<T, Rank>(v.data(), e, s);
}

/// Heads read in place from a projection's output: x is [B, L, H*D] (for example the result of
/// a Q projection with H heads of width D side by side); the result is [B, H, L, D].
template <class T>
tensor_view<T, 4> split_heads(const tensor_view<T, 3>& x, index_t num_heads) {
  if (num_heads <= 0)
    detail::fail_value(detail::message("split_heads: num_heads is ", num_heads, ", expected >= 1"));
  if (x.extent(2) % num_heads != 0)
    detail::fail_shape(detail::message("split_heads: x.extent(2) is ", x.extent(2),
                                       ", not a multiple of num_heads = ", num_heads));
  const index_t d = x.extent(2) / num_heads;
  // An empty x's strides were never checked, so d * stride(2) could overflow: its heads get
  // strides 0 (nothing is read through them).
  if (x.empty())
    return tensor_view<T, 4>(x.data(), {x.extent(0), num_heads, x.extent(1), d}, {0, 0, 0, 0});
  return tensor_view<T, 4>(x.data(), {x.extent(0), num_heads, x.extent(1), d},
                           {x.stride(0), d * x.stride(2), x.stride(1), x.stride(2)});
}

/// The same elements with extent-1 dimensions put in front until the rank is NewRank:
/// to_rank<4>(a [Lq, Lk] mask) is a [1, 1, Lq, Lk] mask that broadcasts over batch and heads.
template <std::size_t NewRank, class T, std::size_t Rank>
tensor_view<T, NewRank> to_rank(const tensor_view<T, Rank>& v) {
  static_assert(NewRank >= Rank, "to_rank only adds dimensions");
  std::array<index_t, NewRank> e{}, s{};
  for (std::size_t r = 0; r < NewRank; ++r) {
    const bool added = r < NewRank - Rank;
    e[r] = added ? 1 : v.extent(r - (NewRank - Rank));
    s[r] = added ? 0 : v.stride(r - (NewRank - Rank));
  }
  return tensor_view<T, NewRank>(v.data(), e, s);
}

}  // namespace xattn
