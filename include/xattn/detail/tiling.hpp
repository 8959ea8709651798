// SPDX-License-Identifier: MIT
// How tiled_attention cuts one call into work units (tile sizes, key splits, threads), and the
// per-thread scratch those units run in.
#pragma once

#include "xattn/config.hpp"
#include "xattn/detail/kernels.hpp"
#include "xattn/errors.hpp"
#include "xattn/options.hpp"
#include "xattn/shapes.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cstddef>
#include <exception>
#include <vector>

#ifdef _OPENMP
#  include <omp.h>
#endif

namespace xattn::detail {

/// The most threads tiled_attention accepts in tile_options::num_threads.
inline constexpr int max_threads = 4096;

/// Checks the set fields of tiles: tile sizes >= 1, a thread count in [1, max_threads].
inline void check_tile_options(const char* fn, const tile_options& tiles) {
  if (tiles.q_tile && *tiles.q_tile < 1)
    fail_value(message(fn, ": tiles.q_tile is ", *tiles.q_tile, ", expected >= 1"));
  if (tiles.kv_tile && *tiles.kv_tile < 1)
    fail_value(message(fn, ": tiles.kv_tile is ", *tiles.kv_tile, ", expected >= 1"));
  if (tiles.num_threads && (*tiles.num_threads < 1 || *tiles.num_threads > max_threads))
    fail_value(message(fn, ": tiles.num_threads is ", *tiles.num_threads,
                       ", expected a value in [1, ", max_threads, "]"));
}

/// The threads a call uses when tile_options::num_threads is unset.
inline int default_threads() noexcept {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

/// Runs f(i, thread) for i in [0, n) on `threads` threads, round-robin so that tiles of unequal
/// cost (causal masks) spread evenly; thread is the index of the running thread, in
/// [0, threads). No exception leaves the parallel region (that would end the program): the
/// first one thrown is carried out and rethrown on the calling thread once the team has joined.
template <class F>
void parallel_for(index_t n, int threads, const F& f) {
#ifdef _OPENMP
  if (threads > 1) {
#  if XATTN_HAS_EXCEPTIONS
    std::exception_ptr error;
#  endif
#  pragma omp parallel num_threads(threads)
    {
      const int thread = omp_get_thread_num();
#  pragma omp for schedule(static, 1)
      for (index_t i = 0; i < n; ++i) {
#  if XATTN_HAS_EXCEPTIONS
        try {
          f(i, thread);
        } catch (...) {
#    pragma omp critical(xattn_parallel_for_error)
          if (!error) error = std::current_exception();
        }
#  else
        f(i, thread);
#  endif
      }
    }
#  if XATTN_HAS_EXCEPTIONS
    if (error) std::rethrow_exception(error);
#  endif
    return;
  }
#else
  (void)threads;
#endif
  for (index_t i = 0; i < n; ++i) f(i, 0);
}

/// One call cut into work units. A unit is one (batch, head, query tile) over one range of
/// keys; key ranges ("splits") exist only when there are too few query tiles to keep threads
/// busy, as when one decoder query reads a long context. Nothing here depends on the thread
/// count, so neither does the result.
struct tiled_plan {
  index_t lanes = 1;   ///< lanes of one packet on the call's instruction-set path
  bool rows = false;   ///< few queries: the row path, one query at a time (see attention_tiled.hpp)
  index_t q_tile = 0;  ///< queries per tile
  index_t width = 0;   ///< lanes path: q_tile rounded up to whole packets
  index_t kv_tile = 0;  ///< keys per tile
  index_t q_tiles = 0;  ///< query tiles per (batch, head)
  /// Query heads per item: on the row path of grouped-query attention, the heads that share a
  /// key/value head (as many as keep an item within rows_per_item rows), so that each key and
  /// value is read once for all of them; else 1.
  index_t heads_per_item = 1;
  index_t items = 0;   ///< B · (H / heads_per_item) · q_tiles
  index_t splits = 1;  ///< key ranges per item
  index_t split_len = 0;
  int threads = 1;  ///< threads to start (at most one per unit)

  index_t units() const noexcept { return items * splits; }
};

/// Key splitting aims for at least this many units, gives each range at least min_split_keys
/// keys, so that the merge stays cheap next to the work it divides, and makes a power of two of
/// ranges, so that they share evenly among 2, 4, 8 ... threads.
inline constexpr index_t split_target_units = 16;
inline constexpr index_t min_split_keys = 128;

/// The least work (in FLOPs, 2·Lq·Lk·(Dk + Dv) per head) for which the default thread count
/// starts one more thread: about 10 to 20 µs of one core's time, against about 1 µs for an
/// OpenMP fork and join on an idle machine.
inline constexpr double min_flops_per_thread = 1 << 20;

/// Default tile sizes. 64 queries are one register block of four 16-float packets with
/// AVX-512; 128 keys keep Sᵀ (32 KiB), Qᵀ and Oᵀ (16 KiB each at Dk = Dv = 64) in L1 and L2.
/// The row path stores one score row only, so its key tiles are longer.
inline constexpr index_t default_q_tile = 64;
inline constexpr index_t default_kv_tile = 128;
inline constexpr index_t default_row_kv_tile = 512;
/// Query rows whose scores the row path holds at once (rows sharing their keys: the query heads
/// of a grouped-query item on quantized keys and values).
inline constexpr index_t row_chunk = 4;
/// The most query rows (heads times queries) one row-path item holds.
inline constexpr index_t rows_per_item = 64;

/// The plan of a call of shape s on a path whose packets have `lanes` lanes of T (by default,
/// the path a call starting now takes).
template <class T>
tiled_plan make_tiled_plan(const attention_shape& s, const tile_options& t, bool need_weights,
                           index_t lanes = active_kernels<T>().lanes) {
  const index_t L = lanes;
  tiled_plan p;
  p.lanes = L;
  p.rows = s.q_len < L;
  const index_t q_want = t.q_tile ? *t.q_tile : (p.rows ? s.q_len : default_q_tile);
  p.q_tile = std::max<index_t>(1, std::min(q_want, s.q_len));
  p.width = (p.q_tile + L - 1) / L * L;
  p.kv_tile = std::max<index_t>(
      1, std::min(t.kv_tile ? *t.kv_tile : (p.rows ? default_row_kv_tile : default_kv_tile),
                  s.kv_len));
  p.q_tiles = (s.q_len + p.q_tile - 1) / p.q_tile;
  if (p.rows && s.kv_heads() > 0) {
    const index_t group = s.num_heads / s.kv_heads();
    for (index_t g = group; g >= 1; --g)
      if (group % g == 0 && g * p.q_tile <= rows_per_item) {
        p.heads_per_item = g;
        break;
      }
  }
  p.items = s.batch * (s.num_heads / p.heads_per_item) * p.q_tiles;
  const double flops = 2.0 * double(s.batch) * double(s.num_heads) * double(s.q_len) *
                       double(s.kv_len) * double(s.head_dim + s.value_dim);
  if (!need_weights && p.items > 0 && p.items < split_target_units) {
    // No more ranges than threads worth starting (min_flops_per_thread each): below that the
    // merge only costs time (one decoder query over 1500 keys ran 8 % slower in 8 ranges).
    const index_t want = (split_target_units + p.items - 1) / p.items;
    const index_t worth = index_t(std::min(flops / min_flops_per_thread, double(want)));
    const index_t most = std::max<index_t>(1, std::min({want, worth, s.kv_len / min_split_keys}));
    while (p.splits * 2 <= most) p.splits *= 2;  // a power of two shares evenly among 2^k threads
  }
  p.split_len = p.splits > 1 ? (s.kv_len + p.splits - 1) / p.splits : s.kv_len;
  int asked = t.num_threads ? *t.num_threads : default_threads();
  if (!t.num_threads) {
    // Unless asked for a thread count, start a thread only for a fair share of work: a small
    // call (one decoder query, one head) ends before a second thread would have woken, and
    // beside another library's spinning thread pool a fork can cost milliseconds.
    asked = int(std::max(1.0, std::min(double(asked), flops / min_flops_per_thread)));
  }
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
/// hold a K or V tile only when the caller's rows are not contiguous. pairs holds the bf16
/// pairs of the bf16-product loops (QP, a padded K tile, VP and PP: detail/bf16_products.inl).
template <class T>
struct tile_scratch {
  aligned_vector<T> qt, s, acc, stats, k_copy, v_copy;
  aligned_vector<Eigen::bfloat16> pairs;

  index_t bytes() const noexcept {
    std::size_t n = 0;
    for (const auto* v : {&qt, &s, &acc, &stats, &k_copy, &v_copy}) n += v->capacity();
    return index_t(n * sizeof(T) + pairs.capacity() * sizeof(Eigen::bfloat16));
  }
};

/// The scratch of one call's whole thread team: one tile_scratch per thread and the per-split
/// partial results. It belongs to the calling thread (kept for its lifetime, so repeated calls
/// allocate nothing) and is sized in full before the threads start: an allocation failure is
/// an ordinary exception on the calling thread, and no OpenMP worker owns memory of its own.
template <class T>
struct team_scratch {
  std::vector<tile_scratch<T>> threads;
  aligned_vector<T> partials;
};

/// The calling thread's team scratch.
template <class T>
team_scratch<T>& calling_thread_scratch() {
  static thread_local team_scratch<T> scratch;
  return scratch;
}

/// The elements each array of one thread's scratch needs for any unit of plan p (see
/// tile_scratch). k_copy and v_copy are needed only when K or V rows are strided, pairs (bf16
/// elements, not T) only for the bf16-product loops. Every product is checked: a huge tile is
/// an error on the calling thread, before any work.
struct unit_scratch_sizes {
  index_t qt = 0, s = 0, acc = 0, stats = 0, k_copy = 0, v_copy = 0, pairs = 0;
  index_t total() const noexcept { return qt + s + acc + stats + k_copy + v_copy; }
};

/// Where the arrays of one thread's bf16 pairs (tile_scratch::pairs) start, for a lanes-path
/// plan p, and their total: QP [⌈Dk/2⌉][W][2], a K tile with rows padded to 2⌈Dk/2⌉ bf16 (row
/// stride k_row), VP [⌈n/2⌉][Dv][2] and PP [⌈n/2⌉][W][2] (detail/bf16_products.inl).
struct pair_scratch_layout {
  index_t k_row = 0, k = 0, v = 0, p = 0, total = 0;
  pair_scratch_layout(const tiled_plan& plan, const attention_shape& s) {
    constexpr const char* fn = "tiled_attention";
    const index_t kt = 2 * ((plan.kv_tile + 1) / 2);
    k_row = 2 * ((s.head_dim + 1) / 2);
    k = checked_mul(fn, k_row, plan.width);
    v = k + checked_mul(fn, plan.kv_tile, k_row);
    p = v + checked_mul(fn, kt, s.value_dim);
    total = p + checked_mul(fn, kt, plan.width);
  }
};

template <class T>
unit_scratch_sizes unit_scratch_elements(const tiled_plan& p, const attention_shape& s,
                                         bool copy_k = true, bool copy_v = true,
                                         bool pairs = false) {
  constexpr const char* fn = "tiled_attention";
  const index_t w = p.rows ? p.q_tile * p.heads_per_item : p.width;
  unit_scratch_sizes n;
  n.qt = checked_mul(fn, w, s.head_dim);
  n.s = p.rows ? checked_mul(fn, row_chunk, p.kv_tile + p.lanes) : checked_mul(fn, p.kv_tile, w);
  n.acc = std::max(checked_mul(fn, w, s.value_dim), s.value_dim);  // the merge needs Dv
  n.stats = (p.rows ? 2 : 3) * w;
  if (copy_k) n.k_copy = checked_mul(fn, p.kv_tile, s.head_dim);
  if (copy_v) n.v_copy = checked_mul(fn, p.kv_tile, s.value_dim);
  if (pairs && !p.rows) n.pairs = pair_scratch_layout(p, s).total;
  return n;
}

/// Elements of one unit's partial result (m, l and an output row per query), rounded up to
/// whole 64-byte cache lines so that threads writing neighbouring units never share a line.
template <class T>
index_t partial_stride(const tiled_plan& p, const attention_shape& s) {
  constexpr index_t line = 64 / index_t(sizeof(T));
  return (p.q_tile * p.heads_per_item * (s.value_dim + 2) + line - 1) / line * line;
}

/// Elements of the per-call partial results: one block per unit when the keys are split.
template <class T>
index_t partial_elements(const tiled_plan& p, const attention_shape& s) {
  return p.splits > 1 ? checked_mul("tiled_attention", p.units(), partial_stride<T>(p, s)) : 0;
}

/// Sizes the calling thread's team scratch for plan p and returns it. Everything the threads
/// will touch is allocated here, so nothing inside the parallel region allocates.
template <class T>
team_scratch<T>& reserve_team_scratch(const tiled_plan& p, const attention_shape& s, bool copy_k,
                                      bool copy_v, bool pairs = false) {
  team_scratch<T>& team = calling_thread_scratch<T>();
  const unit_scratch_sizes n = unit_scratch_elements<T>(p, s, copy_k, copy_v, pairs);
  const index_t parts = partial_elements<T>(p, s);
  if (team.threads.size() < std::size_t(p.threads)) team.threads.resize(std::size_t(p.threads));
  for (int t = 0; t < p.threads; ++t) {
    tile_scratch<T>& ws = team.threads[std::size_t(t)];
    at_least(ws.qt, n.qt);
    at_least(ws.s, n.s);
    at_least(ws.acc, n.acc);
    at_least(ws.stats, n.stats);
    at_least(ws.k_copy, n.k_copy);
    at_least(ws.v_copy, n.v_copy);
    at_least(ws.pairs, n.pairs);
  }
  at_least(team.partials, parts);
  return team;
}

}  // namespace xattn::detail
