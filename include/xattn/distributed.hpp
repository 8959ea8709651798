// SPDX-License-Identifier: MIT
// Attention over a context sharded across MPI processes (context parallelism), and a module
// whose queries are split across them. Optional: not included by xattn.hpp; link the CMake
// target xattn::mpi. The README's "Past one machine" has the communication model;
// examples/10_sharded_context.cpp is a whole program.
//
// Each rank holds the same queries and its own shard of the keys and values (rank r holds
// context positions [offset_r, offset_r + Lk_r), shards in rank order). A rank's attention over
// its shard gives a partial output O_r and log-sum-exp lse_r per query row; the whole result is
// their merge (see online softmax in attention_tiled.hpp: it is the same step, once per rank):
//   lse = log Σ_r exp(lse_r)           O = Σ_r exp(lse_r - lse) · O_r
// Only O_r and lse_r travel, Lq·(Dv + 1) numbers per (batch, head) whatever Lk is.
#pragma once

#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/config.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/errors.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace xattn {

/// An MPI call failed. The message names the xattn function, the MPI call and MPI's words.
struct mpi_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {

inline void check_mpi(int rc, const char* fn, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) len = 0;
  XATTN_THROW(mpi_error(message(fn, ": ", call, " failed (error ", rc, "): ",
                                std::string(text, std::size_t(std::max(len, 0))))));
}

}  // namespace detail

/// xattn's own copy of an MPI communicator. Constructing one is collective over `comm` (it is
/// duplicated, so xattn's messages never mix with the caller's), and errors on the copy come
/// back to xattn, which throws them as mpi_error instead of letting MPI abort. Make one and keep
/// it for every sharded call. Call MPI_Init_thread (MPI_THREAD_FUNNELED when the kernels use
/// OpenMP threads: only the calling thread talks to MPI) before, MPI_Finalize after its end.
class communicator {
 public:
  explicit communicator(MPI_Comm comm) {
    constexpr const char* fn = "communicator";
    int initialised = 0, finalised = 0;
    detail::check_mpi(MPI_Initialized(&initialised), fn, "MPI_Initialized");
    detail::check_mpi(MPI_Finalized(&finalised), fn, "MPI_Finalized");
    if (!initialised || finalised)
      detail::fail_value(detail::message(
          fn, ": MPI is not running (call MPI_Init_thread before, MPI_Finalize after)"));
    if (comm == MPI_COMM_NULL)
      detail::fail_value(
          detail::message(fn, ": the communicator is MPI_COMM_NULL, which has no processes"));
    MPI_Comm dup = MPI_COMM_NULL;
    detail::check_mpi(MPI_Comm_dup(comm, &dup), fn, "MPI_Comm_dup");
    comm_ = dup;
    const int rc = MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    if (rc == MPI_SUCCESS) {
      MPI_Comm_rank(comm_, &rank_);
      MPI_Comm_size(comm_, &size_);
    } else {
      release();
      detail::check_mpi(rc, fn, "MPI_Comm_set_errhandler");
    }
  }
  ~communicator() { release(); }
  communicator(const communicator&) = delete;
  communicator& operator=(const communicator&) = delete;
  communicator(communicator&& o) noexcept : comm_(o.comm_), rank_(o.rank_), size_(o.size_) {
    o.comm_ = MPI_COMM_NULL;
  }
  communicator& operator=(communicator&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
      rank_ = o.rank_;
      size_ = o.size_;
    }
    return *this;
  }

  int rank() const noexcept { return rank_; }  ///< this process's rank, in [0, size())
  int size() const noexcept { return size_; }  ///< processes, >= 1
  MPI_Comm get() const noexcept { return comm_; }

 private:
  void release() noexcept {
    int finalised = 1;
    if (comm_ != MPI_COMM_NULL && MPI_Finalized(&finalised) == MPI_SUCCESS && !finalised)
      MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
};

/// Which ranks receive the merged result of a sharded call.
enum class shard_result {
  all_ranks,  ///< every rank (an allreduce): out and lse_out written everywhere
  root,       ///< the root only (a reduce): out and lse_out are left as they were elsewhere
};

/// How a sharded call delivers its result.
struct shard_options {
  shard_result result = shard_result::all_ranks;
  int root = 0;  ///< the receiving rank when result is root, in [0, size)
};

namespace detail {

template <class T>
MPI_Datatype mpi_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "the sharded kernels run on float or double");
  return std::is_same_v<T, float> ? MPI_FLOAT : MPI_DOUBLE;
}

/// One rank's account of a collective call, exchanged before any data moves: whether its own
/// argument checks passed, and the values every rank must agree on. Every rank receives every
/// report and runs the same decision on them, so all ranks throw the same error or none does.
class call_check {
 public:
  explicit call_check(const char* fn) : fn_(fn) {}

  /// A value the ranks must agree on; a disagreement is a shape_error (or value_error).
  void agree(const char* what, std::int64_t value, bool is_shape = true) {
    XATTN_ASSERT(count_ < max_fields);
    names_[count_] = what;
    shapes_[count_] = is_shape;
    report_.fields[count_++] = value;
  }
  void agree_scale(double scale) { report_.scale = scale; }
  /// This rank's own value (its shard's length), handed to every rank by exchange().
  void own(std::int64_t value) { report_.own = value; }
  /// Whether this rank's own checks have passed so far.
  bool passed() const noexcept { return report_.error == 0; }

  /// Runs this rank's own checks; an xattn argument error is kept for exchange() to report.
  template <class F>
  void local(F&& checks) {
#if XATTN_HAS_EXCEPTIONS
    try {
      checks();
    } catch (const shape_error& e) {
      keep(1, e.what());
    } catch (const value_error& e) {
      keep(2, e.what());
    } catch (const std::bad_alloc&) {
      keep(3, "out of memory");
    }
#else
    checks();  // without exceptions a failed check aborts this rank, and mpiexec the others
#endif
  }

  /// Exchanges the reports (MPI_Allgather); throws on every rank when any rank's checks failed
  /// (the lowest such rank's error, std::bad_alloc where it could not allocate) or when the
  /// ranks disagree. Returns every rank's own().
  std::vector<std::int64_t> exchange(const communicator& comm) const {
    const int P = comm.size();
    std::vector<report> all(static_cast<std::size_t>(P));
    check_mpi(MPI_Allgather(&report_, int(sizeof(report)), MPI_BYTE, all.data(),
                            int(sizeof(report)), MPI_BYTE, comm.get()),
              fn_, "MPI_Allgather");
    for (int r = 0; r < P; ++r) {
      const report& rep = all[std::size_t(r)];
      if (rep.error == 0) continue;
      if (rep.error == 3) XATTN_THROW(std::bad_alloc());
      const std::string what =
          message(std::string(rep.text, std::find(rep.text, rep.text + text_size, '\0')),
                  " (on rank ", r, ")");
      if (rep.error == 1) fail_shape(what);
      fail_value(what);
    }
    for (int r = 1; r < P; ++r) {
      const report& a = all[0];
      const report& b = all[std::size_t(r)];
      for (int f = 0; f < count_; ++f)
        if (a.fields[f] != b.fields[f]) {
          const std::string what = message(fn_, ": the ranks disagree on ", names_[f],
                                           ": rank 0 has ", a.fields[f], ", rank ", r, " has ",
                                           b.fields[f]);
          if (shapes_[f]) fail_shape(what);
          fail_value(what);
        }
      if (std::memcmp(&a.scale, &b.scale, sizeof(double)) != 0)
        fail_value(message(fn_, ": the ranks disagree on the scale: rank 0 has ", a.scale,
                           ", rank ", r, " has ", b.scale));
    }
    std::vector<std::int64_t> owns;
    for (const report& rep : all) owns.push_back(rep.own);
    return owns;
  }

 private:
  static constexpr int max_fields = 24;
  static constexpr std::size_t text_size = 480;
  struct report {
    std::int64_t error = 0;  // 0: the checks passed, 1: shape_error, 2: value_error, 3: bad_alloc
    std::int64_t own = 0;
    std::int64_t fields[max_fields] = {};
    double scale = 0.0;
    char text[text_size] = {};
  };

  void keep(std::int64_t kind, const char* what) {
    if (report_.error != 0) return;
    report_.error = kind;
    std::strncpy(report_.text, what, text_size - 1);
  }

  const char* fn_;
  report report_;
  const char* names_[max_fields] = {};
  bool shapes_[max_fields] = {};
  int count_ = 0;
};

/// A fingerprint of key padding lengths (FNV-1a), for the ranks to compare.
inline std::int64_t fingerprint(const std::optional<tensor_view<const index_t, 1>>& lengths) {
  if (!lengths) return -1;
  std::uint64_t h = 1469598103934665603ull;
  for (index_t b = 0; b < lengths->extent(0); ++b) {
    std::uint64_t x = std::uint64_t((*lengths)(b));
    for (int byte = 0; byte < 8; ++byte, x >>= 8) h = (h ^ (x & 0xffu)) * 1099511628211ull;
  }
  return std::int64_t(h & 0x7fffffffffffffffull);
}

/// The masks every rank must agree on (element masks are per shard: only whether one is given).
template <class T>
void agree_on_mask(call_check& check, const attention_mask<T>& m) {
  check.agree("mask.kv_lengths (a fingerprint of its values, -1: unset)", fingerprint(m.kv_lengths),
              false);
  check.agree("mask.causal", std::int64_t(m.causal), false);
  check.agree("whether mask.allowed is given", m.allowed.has_value(), false);
  check.agree("whether mask.bias is given", m.bias.has_value(), false);
}

/// Local checks of key padding in context positions: its extent, and no negative length (the
/// upper bound, the context's length, is known after the exchange).
template <class T>
void check_lengths_shape(const char* fn, const attention_mask<T>& m, index_t batch) {
  if (!m.kv_lengths) return;
  require_extent(fn, "mask.kv_lengths", 0, m.kv_lengths->extent(0), batch);
  for (index_t b = 0; b < batch; ++b)
    if ((*m.kv_lengths)(b) < 0)
      fail_value(message(fn, ": mask.kv_lengths(", b, ") is ", (*m.kv_lengths)(b),
                         ", expected >= 0"));
}

/// After the exchange: the same on every rank, since their kv_lengths agree.
template <class T>
void check_lengths_fit(const char* fn, const attention_mask<T>& m, index_t context_len) {
  if (!m.kv_lengths) return;
  for (index_t b = 0; b < m.kv_lengths->extent(0); ++b)
    if ((*m.kv_lengths)(b) > context_len)
      fail_value(message(fn, ": mask.kv_lengths(", b, ") is ", (*m.kv_lengths)(b),
                         ", expected a value in [0, ", context_len,
                         "] (the context's length, all shards together)"));
}

inline void check_root(const char* fn, const shard_options& sh, int size) {
  if (sh.result == shard_result::root && (sh.root < 0 || sh.root >= size))
    fail_value(message(fn, ": sharding.root is ", sh.root, ", expected a rank in [0, ", size, ")"));
}

/// A committed MPI datatype of `width` consecutive T, freed at scope exit.
template <class T>
class row_type {
 public:
  row_type(const char* fn, index_t width) {
    check_mpi(MPI_Type_contiguous(int(width), mpi_type<T>(), &type_), fn, "MPI_Type_contiguous");
    const int rc = MPI_Type_commit(&type_);
    if (rc != MPI_SUCCESS) {
      MPI_Type_free(&type_);
      check_mpi(rc, fn, "MPI_Type_commit");
    }
  }
  ~row_type() { MPI_Type_free(&type_); }
  row_type(const row_type&) = delete;
  row_type& operator=(const row_type&) = delete;
  MPI_Datatype get() const noexcept { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

/// The buffers a thread's sharded calls use, kept between calls: they only grow, so repeated
/// calls with the same shapes allocate (and fault in) no memory. About 3·B·H·Lq·(Dv + 1)
/// numbers after a call.
template <class T>
struct shard_buffers {
  std::vector<T> mine, lse, parts, merged, result;
  std::vector<double> rank_weights;  ///< one per rank, for a row's merge
  static shard_buffers& get() {
    thread_local shard_buffers buffers;
    return buffers;
  }
  /// Grows every buffer for a merge of [rows, width] over P ranks, before the ranks exchange
  /// anything: an allocation that fails then fails the checks, on every rank.
  void reserve(index_t rows, index_t width, int P) {
    const std::size_t n = std::size_t(rows) * std::size_t(width);
    const std::size_t chunk = (std::size_t(rows) / std::size_t(P) + 1) * std::size_t(width);
    for (auto* v : {&mine, &result}) v->reserve(n);
    lse.reserve(std::size_t(rows));
    parts.reserve(chunk * std::size_t(P));
    merged.reserve(chunk);
    rank_weights.resize(std::size_t(P));
  }
};

/// Checks that B·H·Lq query rows fit one merge and reserves its buffers for [B·H·Lq, width].
template <class T>
void prepare_merge(const char* fn, const communicator& comm, index_t B, index_t H, index_t Lq,
                   index_t width) {
  const index_t rows = checked_mul(fn, checked_mul(fn, B, H), Lq);
  if (rows > INT_MAX / 2)
    fail_value(message(fn, ": B·H·Lq is ", rows, ", more than ", INT_MAX / 2,
                       " query rows, the most one call merges"));
  shard_buffers<T>::get().reserve(rows, width, comm.size());
}

/// Exchanges the reports of `check` (see call_check::exchange) and returns where this rank's
/// shard sits in the whole context, shards in rank order: its first key and the context's
/// length. Key padding is checked against that length here, the same on every rank.
template <class T>
position_window exchange_shards(const communicator& comm, const char* fn, const call_check& check,
                                const attention_mask<T>& mask) {
  const std::vector<std::int64_t> lens = check.exchange(comm);
  position_window w;
  index_t total = 0;
  for (int r = 0; r < comm.size(); ++r) {
    if (r == comm.rank()) w.key_offset = total;
    total += index_t(lens[std::size_t(r)]);
  }
  w.kv_len = total;
  check_lengths_fit(fn, mask, total);
  return w;
}

/// What the kernel-level sharded calls (forward and backward) share before the exchange: the
/// values the ranks must agree on, this rank's shard length, and the local checks, among them
/// kernel_check(opts without kv_lengths), the kernel's own argument check (kv_lengths count the
/// whole context and are checked after the exchange). Reserves the merge's buffers for
/// [B·H·Lq, width] rows.
template <class T, class KernelCheck>
void check_kernel_call(call_check& check, const char* fn, const communicator& comm,
                       const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                       const tensor_view<const T, 4>& v, const attention_options<T>& opts,
                       const tile_options& tiles, index_t width, KernelCheck&& kernel_check) {
  check.agree("the element type's size", std::int64_t(sizeof(T)));
  check.agree("q.extent(0) (B)", q.extent(0));
  check.agree("q.extent(1) (H)", q.extent(1));
  check.agree("q.extent(2) (Lq)", q.extent(2));
  check.agree("q.extent(3) (Dk)", q.extent(3));
  check.agree("k.extent(1) (Hkv)", k.extent(1));
  check.agree("v.extent(3) (Dv)", v.extent(3));
  check.agree_scale(opts.scale ? *opts.scale : std::numeric_limits<double>::quiet_NaN());
  agree_on_mask(check, opts.mask);
  check.own(k.extent(2));
  check.local([&] {
    if (opts.mask.window)
      fail_value(message(fn, ": mask.window is set; leave it unset, the call sets it from the shards"));
    check_lengths_shape(fn, opts.mask, q.extent(0));
    attention_options<T> local = opts;
    local.mask.kv_lengths.reset();
    kernel_check(local);
    check_tile_options(fn, tiles);  // here: the kernel's own check would come after the exchange
    prepare_merge<T>(fn, comm, q.extent(0), q.extent(1), q.extent(2), width);
  });
}

/// Rows [begin(c), begin(c + 1)) of `rows` are chunk c of P.
inline int chunk_begin(index_t rows, int c, int P) {
  return int(std::int64_t(rows) * c / P);
}

/// Combines, in rank order, the P ranks' [rows, width] blocks of T into one, identical on every
/// receiving rank: rank c gathers chunk c of every rank's rows (MPI_Alltoallv) and combines them
/// with combine(parts, P, stride, out) (parts[r·stride + e] is rank r's value e of the row),
/// then the chunks go to every rank (MPI_Allgatherv) or to `root` (MPI_Gatherv, root >= 0).
/// Each rank sends and receives about 2·rows·width numbers, whatever P: a reduce-scatter and an
/// allgather. The combination order is fixed, so the result does not depend on timing.
template <class T, class Combine>
void reduce_rows(const communicator& comm, const char* fn, const std::vector<T>& mine,
                 index_t rows, index_t width, int root, std::vector<T>& result,
                 Combine&& combine) {
  if (rows == 0 || width == 0) {  // nothing to send (every rank agrees on the sizes)
    result.assign(std::size_t(rows) * std::size_t(width), T(0));
    return;
  }
  const int P = comm.size(), me = comm.rank();
  const row_type<T> row(fn, width);
  std::vector<int> send_counts(static_cast<std::size_t>(P)), send_displs(static_cast<std::size_t>(P));
  std::vector<int> recv_counts(static_cast<std::size_t>(P)), recv_displs(static_cast<std::size_t>(P));
  const int my_begin = chunk_begin(rows, me, P), my_rows = chunk_begin(rows, me + 1, P) - my_begin;
  for (int c = 0; c < P; ++c) {
    send_displs[std::size_t(c)] = chunk_begin(rows, c, P);
    send_counts[std::size_t(c)] = chunk_begin(rows, c + 1, P) - send_displs[std::size_t(c)];
    recv_counts[std::size_t(c)] = my_rows;
    recv_displs[std::size_t(c)] = c * my_rows;
  }
  std::vector<T>& parts = shard_buffers<T>::get().parts;
  parts.resize(std::size_t(P) * std::size_t(my_rows) * std::size_t(width));
  check_mpi(MPI_Alltoallv(mine.data(), send_counts.data(), send_displs.data(), row.get(),
                          parts.data(), recv_counts.data(), recv_displs.data(), row.get(),
                          comm.get()),
            fn, "MPI_Alltoallv");
  std::vector<T>& merged = shard_buffers<T>::get().merged;
  merged.resize(std::size_t(my_rows) * std::size_t(width));
  const std::size_t stride = std::size_t(my_rows) * std::size_t(width);
  for (int i = 0; i < my_rows; ++i)
    combine(parts.data() + std::size_t(i) * std::size_t(width), P, stride,
            merged.data() + std::size_t(i) * std::size_t(width));
  if (root < 0 || me == root) result.resize(std::size_t(rows) * std::size_t(width));
  if (root < 0)
    check_mpi(MPI_Allgatherv(merged.data(), my_rows, row.get(), result.data(), send_counts.data(),
                             send_displs.data(), row.get(), comm.get()),
              fn, "MPI_Allgatherv");
  else
    check_mpi(MPI_Gatherv(merged.data(), my_rows, row.get(), result.data(), send_counts.data(),
                          send_displs.data(), row.get(), root, comm.get()),
              fn, "MPI_Gatherv");
}

/// The merge of one query row's partial results by their log-sum-exp, in double: each part is
/// [o_0 .. o_{Dv-1}, lse]. Parts with lse = -inf (no key of the shard visible) weigh 0; a row
/// no shard sees gets zeros and -inf, a NaN part makes the row NaN (as in one process).
/// `weights` is scratch of P doubles.
template <class T>
void merge_by_lse(const T* parts, int P, std::size_t stride, index_t dv, double* weights, T* out) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  double m = -inf;
  bool nan = false;
  for (int r = 0; r < P; ++r) {
    const double l = double(parts[std::size_t(r) * stride + std::size_t(dv)]);
    if (std::isnan(l)) nan = true;
    m = std::max(m, l);
  }
  if (nan || m == inf) {
    std::fill(out, out + dv + 1, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  if (m == -inf) {
    std::fill(out, out + dv, T(0));
    out[dv] = T(-inf);
    return;
  }
  double sum = 0.0;
  for (int r = 0; r < P; ++r)
    sum += weights[r] = std::exp(double(parts[std::size_t(r) * stride + std::size_t(dv)]) - m);
  for (index_t e = 0; e < dv; ++e) {
    double acc = 0.0;
    for (int r = 0; r < P; ++r)  // a part of weight 0 adds nothing, even a NaN
      if (weights[r] > 0.0) acc += weights[r] * double(parts[std::size_t(r) * stride + std::size_t(e)]);
    out[e] = T(acc / sum);
  }
  out[dv] = T(m + std::log(sum));
}

/// The kernel-level work of a sharded call after its checks: this rank's partial result over its
/// shard (local(...) runs naive_attention or tiled_attention with the shard's window), then the
/// merge. Writes out and opts.lse_out where the result goes, and opts.weights_out (this rank's
/// keys, normalised over the whole context) on every rank.
template <class T, class Local>
void sharded_attention_run(const communicator& comm, const char* fn,
                           const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
                           const tensor_view<const T, 4>& v, const tensor_view<T, 4>& out,
                           const attention_options<T>& opts, const shard_options& sh,
                           const position_window& shard, Local&& local) {
  const index_t B = q.extent(0), H = q.extent(1), Lq = q.extent(2), Dv = v.extent(3);
  const index_t rows = B * H * Lq, width = Dv + 1;
  // This rank's partial O written straight into the rows it sends, [B·H·Lq, Dv + 1], with its
  // log-sum-exp in the last column.
  shard_buffers<T>& buf = shard_buffers<T>::get();
  std::vector<T>& mine = buf.mine;
  std::vector<T>& lse = buf.lse;
  mine.resize(std::size_t(rows) * std::size_t(width));
  lse.resize(std::size_t(rows));
  attention_options<T> o = opts;
  o.mask.window = shard;
  o.lse_out = tensor_view<T, 3>(lse.data(), {B, H, Lq});
  local(q, k, v,
        tensor_view<T, 4>(mine.data(), {B, H, Lq, Dv}, {H * Lq * width, Lq * width, width, 1}),
        o);
  for (index_t r = 0; r < rows; ++r) mine[std::size_t(r * width + Dv)] = lse[std::size_t(r)];

  // Weights need the whole context's log-sum-exp on every rank that asked for them.
  const bool everywhere = sh.result == shard_result::all_ranks || opts.weights_out;
  std::vector<T>& result = buf.result;
  double* weights = buf.rank_weights.data();  // sized by reserve() for comm.size() ranks
  reduce_rows<T>(comm, fn, mine, rows, width, everywhere ? -1 : sh.root, result,
                 [Dv, weights](const T* parts, int P, std::size_t stride, T* merged) {
                   merge_by_lse(parts, P, stride, Dv, weights, merged);
                 });
  const bool receives = sh.result == shard_result::all_ranks || comm.rank() == sh.root;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Lq; ++i) {
        const index_t r = (b * H + h) * Lq + i;
        const T* merged = result.data() + r * width;
        if (receives) {
          for (index_t e = 0; e < Dv; ++e) out(b, h, i, e) = merged[e];
          if (opts.lse_out) (*opts.lse_out)(b, h, i) = merged[Dv];
        }
        if (opts.weights_out) {  // p_j over the shard's keys, times exp(lse_r - lse)
          const T mine_lse = lse[std::size_t(r)];
          const double factor = mine_lse == -std::numeric_limits<T>::infinity()
                                    ? 0.0
                                    : std::exp(double(mine_lse) - double(merged[Dv]));
          const auto& wts = *opts.weights_out;
          for (index_t j = 0; j < wts.extent(3); ++j)
            wts(b, h, i, j) = T(double(wts(b, h, i, j)) * factor);
        }
      }
}

}  // namespace detail

/// Attention over a context sharded across the ranks of comm: every rank passes the same queries
/// and its own shard of the keys and values, shards in rank order (rank 0's keys first; any may
/// be empty, lengths may differ). The result equals tiled_attention over the concatenated keys,
/// up to rounding, bit for bit the same on every rank and from run to run.
///
///   q    [B, H, Lq, Dk]     the same on every rank
///   k    [B, Hkv, Lk_r, Dk] this rank's keys       v [B, Hkv, Lk_r, Dv]
///   out  [B, H, Lq, Dv]     the whole result: written on every rank, or on sharding.root only
///
/// opts as for tiled_attention, with positions counted in the whole context: mask.kv_lengths
/// (each in [0, Σ Lk_r]) and mask.causal (aligned to the whole context's length) the same on
/// every rank; mask.allowed and mask.bias this rank's columns, [B|1, H|1, Lq|1, Lk_r|1];
/// mask.window unset (the call sets it from the shards). opts.lse_out receives the whole
/// context's log-sum-exp where out is written; opts.weights_out [B, H, Lq, Lk_r] receives the
/// weights of this rank's keys, normalised over the whole context (all ranks then receive the
/// log-sum-exp, even with result root).
///
/// Collective: every rank of comm calls it. Arguments are checked on each rank and the ranks'
/// shapes, scale and masks compared (one MPI_Allgather) before any data moves; a failure
/// throws the same shape_error or value_error on every rank. Then each rank sends and receives
/// about 2·B·H·Lq·(Dv + 1) numbers (MPI_Alltoallv, then MPI_Allgatherv or MPI_Gatherv). An MPI
/// failure during that exchange (mpi_error) may leave out, lse_out and weights_out partly
/// written.
template <class T>
void sharded_attention(const communicator& comm, detail::identity_t<tensor_view<const T, 4>> q,
                       detail::identity_t<tensor_view<const T, 4>> k,
                       detail::identity_t<tensor_view<const T, 4>> v, tensor_view<T, 4> out,
                       const detail::identity_t<attention_options<T>>& opts = {},
                       const tile_options& tiles = {}, const shard_options& sharding = {}) {
  constexpr const char* fn = "sharded_attention";
  detail::call_check check(fn);
  detail::check_kernel_call<T>(check, fn, comm, q, k, v, opts, tiles, v.extent(3) + 1,
                               [&](const attention_options<T>& local) {
                                 (void)detail::check_attention_args<T>(fn, q, k, v, out, local);
                               });
  check.agree("whether weights_out is given", opts.weights_out.has_value(), false);
  check.agree("sharding.result", std::int64_t(sharding.result), false);
  check.agree("sharding.root", sharding.root, false);
  check.local([&] { detail::check_root(fn, sharding, comm.size()); });
  // The kernel's scratch for this rank's shard, reserved before any data moves: a rank that
  // cannot have it fails every rank here (std::bad_alloc) instead of leaving them waiting.
  check.local([&] {
    if (!check.passed()) return;
    const attention_shape s{q.extent(0), q.extent(1), q.extent(2), k.extent(2),
                            q.extent(3), v.extent(3), k.extent(1)};
    detail::reserve_tiled_attention<T>(s, k, v, opts.weights_out.has_value(), tiles);
  });
  const position_window w = detail::exchange_shards(comm, fn, check, opts.mask);
  detail::sharded_attention_run<T>(
      comm, fn, q, k, v, out, opts, sharding, w,
      [&](auto qq, auto kk, auto vv, auto oo, const auto& o) {
        tiled_attention<T>(qq, kk, vv, oo, o, tiles);
      });
}

/// The backward of sharded_attention: each rank passes the forward's arguments (its shard of
/// k and v), the whole forward's out and log-sum-exp (opts.lse_out, as sharded_attention wrote
/// them with result all_ranks) and dout, the same on every rank. grads.dk and grads.dv [B, Hkv,
/// Lk_r, D] receive this rank's keys' gradients and stay on it; grads.dq [B, H, Lq, Dk] is the
/// sum over the ranks (in rank order, so bit for bit the same everywhere), written on every
/// rank; grads.dbias, when set, the gradient of this rank's mask.bias. Collective, checked as
/// sharded_attention is; each rank sends and receives about 2·B·H·Lq·Dk numbers.
template <class T>
void sharded_attention_backward(const communicator& comm,
                                detail::identity_t<tensor_view<const T, 4>> q,
                                detail::identity_t<tensor_view<const T, 4>> k,
                                detail::identity_t<tensor_view<const T, 4>> v,
                                detail::identity_t<tensor_view<const T, 4>> out,
                                detail::identity_t<tensor_view<const T, 4>> dout,
                                const attention_grads<T>& grads,
                                const detail::identity_t<attention_options<T>>& opts,
                                const tile_options& tiles = {}) {
  constexpr const char* fn = "sharded_attention_backward";
  detail::call_check check(fn);
  detail::check_kernel_call<T>(
      check, fn, comm, q, k, v, opts, tiles, q.extent(3), [&](const attention_options<T>& local) {
        (void)detail::check_backward_args<T>(fn, q, k, v, out, dout, grads, local, true);
      });
  check.agree("whether grads.dbias is given", grads.dbias.has_value(), false);
  const position_window w = detail::exchange_shards(comm, fn, check, opts.mask);

  const index_t B = q.extent(0), H = q.extent(1), Lq = q.extent(2), Dk = q.extent(3);
  const index_t rows = B * H * Lq;
  std::vector<T>& dq = detail::shard_buffers<T>::get().mine;
  dq.resize(std::size_t(rows) * std::size_t(Dk));
  attention_options<T> o = opts;
  o.mask.window = w;
  attention_grads<T> mine = grads;
  mine.dq = tensor_view<T, 4>(dq.data(), {B, H, Lq, Dk});
  tiled_attention_backward<T>(q, k, v, out, dout, mine, o, tiles);

  std::vector<T>& sum = detail::shard_buffers<T>::get().result;
  detail::reduce_rows<T>(comm, fn, dq, rows, Dk, -1, sum,
                         [Dk](const T* parts, int P, std::size_t stride, T* merged) {
                           for (index_t e = 0; e < Dk; ++e) {
                             double acc = 0.0;
                             for (int r = 0; r < P; ++r) acc += double(parts[std::size_t(r) * stride + std::size_t(e)]);
                             merged[e] = T(acc);
                           }
                         });
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Lq; ++i)
        for (index_t e = 0; e < Dk; ++e)
          grads.dq(b, h, i, e) = sum[std::size_t(((b * H + h) * Lq + i) * Dk + e)];
}

namespace detail {

/// The argument checks the module-level sharded calls share, run on each rank before the
/// exchange: the layer, the query and the context against each other, and the output. The
/// attention's own arguments (masks, scale, weights) are checked by the callers.
template <class T>
void check_sharded_layer(const char* fn, const multi_head_cross_attention<T>& layer,
                         const tensor_view<const T, 3>& query, const context_cache<T>& cache,
                         const tensor_view<T, 3>& out, const cross_attention_options<T>& opts) {
  const cross_attention_config& c = layer.config();
  if (opts.mask.window)
    fail_value(message(fn, ": mask.window is set; leave it unset, the call sets it"));
  if (!cache.usable())
    fail_value(message(fn, ": the cache is unusable: an earlier encode_context into it failed "
                           "while writing; encode a context into it again"));
  const index_t B = query.extent(0), Lq = query.extent(1);
  require_extent(fn, "query", 2, query.extent(2), c.model_dim);
  if (cache.batch() != B)
    fail_shape(message(fn, ": the context has batch ", cache.batch(),
                       ", expected query.extent(0) = ", B));
  if (cache.num_kv_heads() != c.num_kv_heads || cache.head_dim() != c.head_dim)
    fail_shape(message(fn, ": the cache holds ", cache.num_kv_heads(), " heads of width ",
                       cache.head_dim(), ", expected ", c.num_kv_heads, " of width ", c.head_dim));
  const index_t want[3] = {B, Lq, c.model_dim};
  for (int r = 0; r < 3; ++r) require_extent(fn, "out", r, out.extent(std::size_t(r)), want[r]);
  require_no_self_overlap(fn, "out", out);
  require_disjoint(fn, "out", out, "query", query);
}

template <class T>
void agree_on_layer(call_check& check, const multi_head_cross_attention<T>& layer,
                    const tensor_view<const T, 3>& query, const cross_attention_options<T>& opts,
                    const shard_options& sh) {
  const cross_attention_config& c = layer.config();
  check.agree("the element type's size", std::int64_t(sizeof(T)));
  check.agree("the layer's model_dim", c.model_dim);
  check.agree("the layer's num_heads", c.num_heads);
  check.agree("the layer's num_kv_heads", c.num_kv_heads);
  check.agree("the layer's head_dim", c.head_dim);
  check.agree("query.extent(0) (B)", query.extent(0));
  check.agree("query.extent(1) (Lq)", query.extent(1));
  check.agree_scale(opts.scale ? *opts.scale
                               : c.scale.value_or(std::numeric_limits<double>::quiet_NaN()));
  agree_on_mask(check, opts.mask);
  check.agree("whether key_padding_mask is given", opts.key_padding_mask.has_value(), false);
  check.agree("whether weights_out is given", opts.weights_out.has_value(), false);
  check.agree("whether average_weights_out is given", opts.average_weights_out.has_value(), false);
  check.agree("the kernel", std::int64_t(opts.kernel), false);
  check.agree("sharding.result", std::int64_t(sh.result), false);
  check.agree("sharding.root", sh.root, false);
}

}  // namespace detail

/// multi_head_cross_attention::forward over a context sharded across the ranks of comm (context
/// parallelism): each rank projects only its own shard into a context_cache
/// (layer.encode_context on its part of the context: the key and value projections are divided
/// among the ranks), projects the queries itself, and the attention is merged as in
/// sharded_attention; the output projection then runs where the result goes.
///
///   query [B, Lq, Dm]   the same on every rank     shard  this rank's B contexts of Lk_r keys
///   out   [B, Lq, Dm]   written on every rank, or on sharding.root only
///
/// opts as for forward, with positions counted in the whole context: mask.kv_lengths and
/// mask.causal the same on every rank, mask.allowed and mask.bias this rank's columns; no
/// key_padding_mask (give key padding as mask.kv_lengths) and no mask.window. weights_out
/// [B, H, Lq, Lk_r] and average_weights_out [B, Lq, Lk_r] receive this rank's columns,
/// normalised over the whole context. Collective and checked as sharded_attention; allocates
/// its buffers (the projected queries and the attention's output) per call.
template <class T>
void sharded_forward(const communicator& comm, const multi_head_cross_attention<T>& layer,
                     tensor_view<const T, 3> query, const context_cache<T>& shard,
                     tensor_view<T, 3> out, const cross_attention_options<T>& opts = {},
                     const shard_options& sharding = {}) {
  constexpr const char* fn = "sharded_forward";
  const cross_attention_config& c = layer.config();
  const index_t B = query.extent(0), Lq = query.extent(1), H = c.num_heads;
  const index_t width = c.num_heads * c.head_dim, Lk = shard.kv_len();
  detail::call_check check(fn);
  detail::agree_on_layer(check, layer, query, opts, sharding);
  check.own(Lk);
  // Q = query Wqᵀ + bq on every rank (cheaper than sending it), O merged across the ranks.
  // Their buffers, and every check, come before the exchange: a failure is every rank's.
  std::vector<T> q_buf, o_buf, wts;
  attention_options<T> ao;
  ao.scale = opts.scale ? opts.scale : c.scale;
  ao.mask = opts.mask;
  check.local([&] {
    detail::check_sharded_layer(fn, layer, query, shard, out, opts);
    if (opts.key_padding_mask)
      detail::fail_value(detail::message(
          fn, ": key_padding_mask is per shard; give key padding as mask.kv_lengths, counted "
              "in the whole context"));
    detail::check_root(fn, sharding, comm.size());
    detail::check_tile_options(fn, opts.tiles);
    detail::check_lengths_shape(fn, opts.mask, B);
    if (opts.average_weights_out) {
      const index_t want[3] = {B, Lq, Lk};
      for (int r = 0; r < 3; ++r)
        detail::require_extent(fn, "average_weights_out", r,
                               opts.average_weights_out->extent(std::size_t(r)), want[r]);
      detail::require_no_self_overlap(fn, "average_weights_out", *opts.average_weights_out);
    }
    if (opts.weights_out) {
      detail::require_disjoint(fn, "weights_out", *opts.weights_out, "out", out);
      detail::require_disjoint(fn, "weights_out", *opts.weights_out, "query", query);
    }
    if (opts.average_weights_out) {
      detail::require_disjoint(fn, "average_weights_out", *opts.average_weights_out, "out", out);
      detail::require_disjoint(fn, "average_weights_out", *opts.average_weights_out, "query", query);
    }
    detail::prepare_merge<T>(fn, comm, B, H, Lq, c.head_dim + 1);
    const index_t n = detail::checked_mul(fn, detail::checked_mul(fn, B, Lq), width);
    q_buf.resize(std::size_t(n));
    o_buf.resize(std::size_t(n));
    if (opts.weights_out) {
      ao.weights_out = opts.weights_out;
    } else if (opts.average_weights_out) {
      wts.resize(std::size_t(detail::checked_mul(fn, B * H * Lq, Lk)));
      ao.weights_out = tensor_view<T, 4>(wts.data(), {B, H, Lq, Lk});
    }
    attention_options<T> local = ao;
    local.mask.kv_lengths.reset();  // counts the whole context: checked after the exchange
    (void)detail::check_attention_args<T>(
        fn, split_heads(tensor_view<const T, 3>(q_buf.data(), {B, Lq, width}), H), shard.keys(),
        shard.values(), split_heads(tensor_view<T, 3>(o_buf.data(), {B, Lq, width}), H), local);
    if (opts.kernel == attention_kernel::tiled)  // its scratch too, before the exchange
      detail::reserve_tiled_attention<T>(
          attention_shape{B, H, Lq, shard.keys().extent(2), c.head_dim, c.head_dim,
                          c.num_kv_heads},
          shard.keys(), shard.values(), ao.weights_out.has_value(), opts.tiles);
  });
  const position_window window = detail::exchange_shards(comm, fn, check, opts.mask);

  const cross_attention_weights<T>& w = layer.weights();
  row_matrix<T> scratch;
  const tensor_view<T, 3> q(q_buf.data(), {B, Lq, width}), o(o_buf.data(), {B, Lq, width});
  w.q_proj.forward(query, q, scratch);
  detail::sharded_attention_run<T>(
      comm, fn, split_heads(tensor_view<const T, 3>(q), H), shard.keys(), shard.values(),
      split_heads(o, H), ao, sharding, window,
      [&](auto qq, auto kk, auto vv, auto oo, const auto& a) {
        if (opts.kernel == attention_kernel::naive)
          naive_attention<T>(qq, kk, vv, oo, a);
        else
          tiled_attention<T>(qq, kk, vv, oo, a, opts.tiles);
      });
  if (opts.average_weights_out) {
    const auto& all = *ao.weights_out;
    const auto& avg = *opts.average_weights_out;
    for (index_t b = 0; b < B; ++b)
      for (index_t i = 0; i < Lq; ++i)
        for (index_t j = 0; j < Lk; ++j) {
          T sum = 0;
          for (index_t h = 0; h < H; ++h) sum += all(b, h, i, j);
          avg(b, i, j) = sum / T(H);
        }
  }
  if (sharding.result == shard_result::all_ranks || comm.rank() == sharding.root)
    w.out_proj.forward(tensor_view<const T, 3>(o), out, scratch);
}

/// multi_head_cross_attention::forward with the queries split across the ranks of comm (query
/// parallelism, for many queries against a context every rank holds): rank r computes query
/// positions [Lq·r/P, Lq·(r + 1)/P) of every batch item and the rows are gathered; nothing is
/// merged, so each row is what one process's forward computes for it, up to the rounding of
/// products blocked differently for fewer rows.
///
///   query [B, Lq, Dm]   the whole, the same on every rank      cache  the whole context
///   out   [B, Lq, Dm]   written on every rank, or on sharding.root only
///
/// opts as for forward (masks over the whole call; causal masks count whole positions), except
/// weights_out and average_weights_out, which are not gathered (a value_error). Collective:
/// each rank checks its arguments and computes its rows, then the ranks compare their shapes,
/// scale and masks (one MPI_Allgather) before any rows move; a failure throws the same error
/// on every rank. Each rank sends its B·(Lq/P)·Dm outputs. Allocates per call (a copy of the
/// layer, which shares its weights, and this rank's rows).
template <class T>
void query_sharded_forward(const communicator& comm, const multi_head_cross_attention<T>& layer,
                           tensor_view<const T, 3> query, const context_cache<T>& cache,
                           tensor_view<T, 3> out, const cross_attention_options<T>& opts = {},
                           const shard_options& sharding = {}) {
  constexpr const char* fn = "query_sharded_forward";
  const int P = comm.size(), me = comm.rank();
  const index_t B = query.extent(0), Lq = query.extent(1), Dm = layer.config().model_dim;
  const auto first = [&](int r) { return index_t(std::int64_t(Lq) * r / P); };
  const index_t begin = first(me), n = first(me + 1) - begin;
  detail::call_check check(fn);
  detail::agree_on_layer(check, layer, query, opts, sharding);
  check.agree("the context's length", cache.kv_len());
  std::vector<T> rows;
  check.local([&] {
    detail::check_sharded_layer(fn, layer, query, cache, out, opts);
    detail::check_root(fn, sharding, P);
    if (opts.weights_out || opts.average_weights_out)
      detail::fail_value(detail::message(
          fn, ": weights_out and average_weights_out are not gathered across the ranks; run "
              "sharded_forward, or forward in one process, for attention weights"));
    if (detail::checked_mul(fn, detail::checked_mul(fn, B, Lq), Dm) > INT_MAX)
      detail::fail_value(detail::message(fn, ": B·Lq·Dm is more than ", INT_MAX,
                                         ", the most one call gathers"));
    // This rank's query positions, in place, and the whole call's masks cut to them.
    const auto slice_rows = [&](auto view, std::size_t dim) {
      using V = decltype(view);
      auto e = view.extents();
      auto st = view.strides();
      e[dim] = n;
      return V(view.data() + begin * view.stride(dim), e, st);
    };
    cross_attention_options<T> o = opts;
    position_window w;
    w.query_offset = begin;
    w.query_len = Lq;
    o.mask.window = w;
    if (o.mask.allowed && o.mask.allowed->extent(2) == Lq) o.mask.allowed = slice_rows(*o.mask.allowed, 2);
    if (o.mask.bias && o.mask.bias->extent(2) == Lq) o.mask.bias = slice_rows(*o.mask.bias, 2);
    rows.resize(std::size_t(B * n * Dm));
    multi_head_cross_attention<T> mine(layer);  // shares the weights, buffers of its own
    mine.forward(slice_rows(query, 1), cache, tensor_view<T, 3>(rows.data(), {B, n, Dm}), o);
  });
  (void)check.exchange(comm);

  const bool receives = sharding.result == shard_result::all_ranks || me == sharding.root;
  std::vector<int> counts(static_cast<std::size_t>(P)), displs(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) {
    counts[std::size_t(r)] = int(B * (first(r + 1) - first(r)) * Dm);
    displs[std::size_t(r)] = int(B * first(r) * Dm);
  }
  std::vector<T> all(receives ? std::size_t(B * Lq * Dm) : 0);
  if (sharding.result == shard_result::all_ranks)
    detail::check_mpi(MPI_Allgatherv(rows.data(), int(rows.size()), detail::mpi_type<T>(),
                                     all.data(), counts.data(), displs.data(),
                                     detail::mpi_type<T>(), comm.get()),
                      fn, "MPI_Allgatherv");
  else
    detail::check_mpi(MPI_Gatherv(rows.data(), int(rows.size()), detail::mpi_type<T>(), all.data(),
                                  counts.data(), displs.data(), detail::mpi_type<T>(),
                                  sharding.root, comm.get()),
                      fn, "MPI_Gatherv");
  if (!receives) return;
  for (int r = 0; r < P; ++r) {  // rank r's block is [B, its positions, Dm]
    const index_t r0 = first(r), nr = first(r + 1) - r0;
    const T* block = all.data() + displs[std::size_t(r)];
    for (index_t b = 0; b < B; ++b)
      for (index_t i = 0; i < nr; ++i)
        for (index_t e = 0; e < Dm; ++e) out(b, r0 + i, e) = block[(b * nr + i) * Dm + e];
  }
}

}  // namespace xattn
