// SPDX-License-Identifier: MIT
// How tiled_attention cuts one call into work units (tile sizes, key splits, threads), and the
// per-thread scratch those units run in.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/simd.hpp"
#include "xattn/errors.hpp"
#include "xattn/options.hpp"
#include "xattn/shapes.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <vector>

#ifdef _OPENMP
#  include <omp.h>
#endif

namespace xattn::detail {

/// The most threads tiled_attention accepts in tile_options::num_threads.
inline constexpr int max_threads = 4096;

/// The threads a call uses when tile_options::num_threads is unset.
inline int default_threads() noexcept {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

/// One call cut into work units. A unit is one (batch, head, query tile) over one range of
/// keys; key ranges ("splits") exist only when there are too few query tiles to keep threads
/// busy, as when one decoder query reads a long context. Nothing here depends on the thread
/// count, so neither does the result.
struct tiled_plan {
  bool rows = false;   ///< few queries: the row path, one query at a time (see attention_tiled.hpp)
  index_t q_tile = 0;  ///< queries per tile
  index_t width = 0;   ///< lanes path: q_tile rounded up to whole packets
  index_t kv_tile = 0;  ///< keys per tile
  index_t q_tiles = 0;  ///< query tiles per (batch, head)
  index_t items = 0;    ///< B · H · q_tiles
  index_t splits = 1;   ///< key ranges per item
  index_t split_len = 0;
  int threads = 1;  ///< threads to start (at most one per unit)

  index_t units() const noexcept { return items * splits; }
};

/// Key splitting aims for at least this many units, gives each range at least min_split_keys
/// keys, so that the merge stays cheap next to the work it divides, and makes a power of two of
/// ranges, so that they share evenly among 2, 4, 8 ... threads.
inline constexpr index_t split_target_units = 16;
inline constexpr index_t min_split_keys = 128;

/// Default tile sizes. 64 queries are one register block of four 16-float packets with
/// AVX-512; 128 keys keep Sᵀ (32 KiB), Qᵀ and Oᵀ (16 KiB each at Dk = Dv = 64) in L1 and L2.
/// The row path stores one score row only, so its key tiles are longer.
inline constexpr index_t default_q_tile = 64;
inline constexpr index_t default_kv_tile = 128;
inline constexpr index_t default_row_kv_tile = 512;

template <class T>
tiled_plan make_tiled_plan(const attention_shape& s, const tile_options& t, bool need_weights) {
  constexpr index_t L = simd::lanes<T>;
  tiled_plan p;
  p.rows = s.q_len < L;
  const index_t q_want = t.q_tile ? *t.q_tile : (p.rows ? s.q_len : default_q_tile);
  p.q_tile = std::max<index_t>(1, std::min(q_want, s.q_len));
  p.width = (p.q_tile + L - 1) / L * L;
  p.kv_tile = std::max<index_t>(
      1, std::min(t.kv_tile ? *t.kv_tile : (p.rows ? default_row_kv_tile : default_kv_tile),
                  s.kv_len));
  p.q_tiles = (s.q_len + p.q_tile - 1) / p.q_tile;
  p.items = s.batch * s.num_heads * p.q_tiles;
  if (!need_weights && p.items > 0 && p.items < split_target_units) {
    const index_t want = (split_target_units + p.items - 1) / p.items;
    const index_t most = std::max<index_t>(1, std::min(want, s.kv_len / min_split_keys));
    while (p.splits * 2 <= most) p.splits *= 2;  // a power of two shares evenly among 2^k threads
  }
  p.split_len = p.splits > 1 ? (s.kv_len + p.splits - 1) / p.splits : s.kv_len;
  const int asked = t.num_threads ? *t.num_threads : default_threads();
  p.threads = int(std::max<index_t>(1, std::min<index_t>(asked, p.units())));
  return p;
}

template <class T>
using aligned_vector = std::vector<T, Eigen::aligned_allocator<T>>;

/// Grows v to at least n elements (never shrinks, so a repeated call allocates nothing).
template <class T>
T* at_least(aligned_vector<T>& v, index_t n) {
  if (index_t(v.size()) < n) v.resize(std::size_t(n));
  return v.data();
}

/// One thread's scratch. Lanes path: qt = Qᵀ [Dk, W], s = Sᵀ [kv_tile, W], acc = Oᵀ [Dv, W],
/// stats = m, l and corr [3 W]. Row path: qt = scaled query rows [q_tile, Dk], s = one score
/// row [kv_tile], acc = output rows [q_tile, Dv], stats = m, l [2 q_tile]. k_copy and v_copy
/// hold a K or V tile only when the caller's rows are not contiguous. partials holds the
/// per-split results of a call (used from the calling thread's scratch only).
template <class T>
struct tile_scratch {
  aligned_vector<T> qt, s, acc, stats, k_copy, v_copy, partials;

  index_t bytes() const noexcept {
    std::size_t n = 0;
    for (const auto* v : {&qt, &s, &acc, &stats, &k_copy, &v_copy, &partials}) n += v->capacity();
    return index_t(n * sizeof(T));
  }
};

/// The calling thread's scratch, kept for the thread's lifetime. Each OpenMP worker has its own.
template <class T>
tile_scratch<T>& thread_scratch() {
  static thread_local tile_scratch<T> scratch;
  return scratch;
}

/// Elements of per-thread scratch (without partials) that a unit of plan p needs, at most.
template <class T>
index_t unit_scratch_elements(const tiled_plan& p, const attention_shape& s) {
  const index_t w = p.rows ? p.q_tile : p.width;
  return w * s.head_dim + (p.rows ? p.kv_tile + simd::lanes<T> : p.kv_tile * w) + w * s.value_dim +
         (p.rows ? 2 : 3) * w + p.kv_tile * (s.head_dim + s.value_dim);
}

/// Elements of one unit's partial result (m, l and an output row per query), rounded up to
/// whole 64-byte cache lines so that threads writing neighbouring units never share a line.
template <class T>
index_t partial_stride(const tiled_plan& p, const attention_shape& s) {
  constexpr index_t line = 64 / index_t(sizeof(T));
  return (p.q_tile * (s.value_dim + 2) + line - 1) / line * line;
}

/// Elements of the per-call partial results: one block per unit when the keys are split.
template <class T>
index_t partial_elements(const tiled_plan& p, const attention_shape& s) {
  return p.splits > 1 ? p.units() * partial_stride<T>(p, s) : 0;
}

}  // namespace xattn::detail
