// SPDX-License-Identifier: MIT
// distributed.hpp, run by CTest under mpiexec with 1 to 4 ranks: every sharded call against one
// process's result over the whole context (uneven shards, an empty one, every mask kind across
// the shard boundaries, GQA, Lq = 1, float and double, both result modes), the module in both
// modes, the backward, and bad input giving the same error on every rank without a hang.
#include "xattn/distributed.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::tensor;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

/// Shard lengths: rank r holds shard_len(r) keys, one rank's shard is empty (with 2+ ranks),
/// and the lengths differ.
index_t shard_len(int r) {
  static const index_t lens[] = {5, 0, 9, 4, 7, 2};
  return lens[r % 6];
}
index_t shard_offset(int r) {
  index_t o = 0;
  for (int s = 0; s < r; ++s) o += shard_len(s);
  return o;
}
index_t context_len() { return shard_offset(world_size()); }

/// Keys [begin, begin + n) of a [B, Hkv, Lk, D] tensor, read in place.
template <class T>
xattn::tensor_view<const T, 4> rows_of(const tensor<T, 4>& x, index_t begin, index_t n) {
  return xattn_test::key_rows(x.cview(), begin, n);
}
using xattn_test::key_columns;

/// True on every rank when cond holds on every rank.
bool everywhere(bool cond) {
  int mine = cond ? 1 : 0, all = 0;
  MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

/// True when every rank holds the same bytes.
template <class T>
bool same_on_every_rank(const std::vector<T>& x) {
  std::vector<T> first(x);
  MPI_Bcast(first.data(), int(first.size() * sizeof(T)), MPI_BYTE, 0, MPI_COMM_WORLD);
  return everywhere(std::memcmp(first.data(), x.data(), x.size() * sizeof(T)) == 0);
}

using xattn_test::bool_mask;

template <class T>
class Distributed : public ::testing::Test {};
TYPED_TEST_SUITE(Distributed, xattn_test::element_types, );

// The whole problem is made on every rank from the same seeds; each rank passes its shard.
// Compared with the long-double reference over the whole context, and with tiled_attention in
// one process; the result is the same bytes on every rank.
TYPED_TEST(Distributed, ShardedAttentionMatchesOneProcess) {
  using T = TypeParam;
  const xattn::communicator comm(MPI_COMM_WORLD);
  const int me = comm.rank(), P = comm.size();
  const index_t Lk = context_len(), mine = shard_len(me), offset = shard_offset(me);
  for (const auto& s : {xattn_test::shape(2, 4, 6, Lk, 5, 3, 2), xattn_test::shape(1, 2, 1, Lk, 8, 8)}) {
    std::vector<index_t> lengths;
    for (index_t b = 0; b < s.batch; ++b) lengths.push_back(std::max<index_t>(0, Lk - 4 - 3 * b));
    bool_mask allowed({1, 1, s.q_len, Lk});
    for (index_t i = 0; i < s.q_len; ++i)
      for (index_t j = 0; j < Lk; ++j) allowed.data.get()[i * Lk + j] = (i + j) % 3 != 1;
    auto bias = xattn_test::random_tensor<T, 4>({s.batch, 1, 1, Lk}, 9);
    bias.data[0] = -std::numeric_limits<T>::infinity();

    for (int c = 0; c < 6; ++c)
      for (const auto result : {xattn::shard_result::all_ranks, xattn::shard_result::root}) {
        xattn::attention_options<T> whole;  // the masks of the whole call
        if (c == 1 || c == 3) whole.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {s.batch});
        if (c == 2) whole.mask.causal = xattn::causal_mask::top_left;
        if (c == 3) whole.mask.causal = xattn::causal_mask::bottom_right;
        if (c == 4) whole.mask.allowed = allowed.cview();
        if (c == 5) whole.mask.bias = bias.cview();
        SCOPED_TRACE("mask case " + std::to_string(c) + ", Lq = " + std::to_string(s.q_len) +
                     (result == xattn::shard_result::root ? ", root" : ", all ranks"));

        xattn_test::problem<T> p(s, 3);
        auto opts = whole;  // this rank's: element masks cut to its columns
        if (whole.mask.allowed) opts.mask.allowed = key_columns(*whole.mask.allowed, offset, mine);
        if (whole.mask.bias) opts.mask.bias = key_columns(*whole.mask.bias, offset, mine);
        tensor<T, 4> weights({s.batch, s.num_heads, s.q_len, mine}, T(-7));
        opts.lse_out = p.lse.view();
        opts.weights_out = weights.view();
        xattn::shard_options sh;
        sh.result = result;
        sh.root = P - 1;
        xattn::tile_options tiles;
        tiles.kv_tile = 3;
        xattn::sharded_attention<T>(comm, p.q.cview(), rows_of(p.k, offset, mine),
                                    rows_of(p.v, offset, mine), p.out.view(), opts, tiles, sh);

        const auto want = xattn_test::reference_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), whole);
        const double tol = xattn_test::attention_tol<T>(s.head_dim, Lk, want.max_abs_score);
        if (result == xattn::shard_result::all_ranks || me == sh.root) {
          EXPECT_TRUE(xattn_test::all_close(p.out.data, want.out, tol)) << "output";
          EXPECT_TRUE(xattn_test::all_close(p.lse.data, want.lse, tol)) << "log-sum-exp";
        } else {
          EXPECT_TRUE(std::all_of(p.out.data.begin(), p.out.data.end(), [](T x) { return x == T(-7); }))
              << "a rank that does not receive the result keeps its out";
        }
        std::vector<long double> want_w;  // this rank's columns of the whole weights
        for (std::size_t row = 0; row < want.lse.size(); ++row)
          for (index_t j = 0; j < mine; ++j) want_w.push_back(want.weights[row * std::size_t(Lk) + std::size_t(offset + j)]);
        EXPECT_TRUE(xattn_test::all_close(weights.data, want_w, tol)) << "weights";
        if (result == xattn::shard_result::all_ranks) {
          EXPECT_TRUE(same_on_every_rank(p.out.data));
          tensor<T, 4> one(p.out.extents);  // tiled_attention in one process, whole context
          xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), one.view(), whole);
          EXPECT_TRUE(xattn_test::all_close(p.out.data, one.data, tol)) << "against one process";
        }
      }
  }
}

// Non-finite values cross the shards as in one process: a NaN key makes the rows that see it
// NaN on every rank, whichever rank holds it; a batch item with no real key anywhere gets zeros
// and a log-sum-exp of -inf.
TYPED_TEST(Distributed, NanKeysAndFullyMaskedRowsAsInOneProcess) {
  using T = TypeParam;
  const xattn::communicator comm(MPI_COMM_WORLD);
  const index_t Lk = context_len(), mine = shard_len(comm.rank()), offset = shard_offset(comm.rank());
  xattn_test::problem<T> p(xattn_test::shape(2, 2, 3, Lk, 4, 4), 23);
  p.k.data[std::size_t(((0 * 2 + 1) * Lk + (Lk - 1)) * 4 + 2)] = std::numeric_limits<T>::quiet_NaN();
  std::vector<index_t> lengths = {Lk, 0};  // batch item 1: every key is padding
  xattn::attention_options<T> opts;
  opts.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {2});
  opts.lse_out = p.lse.view();
  xattn::sharded_attention<T>(comm, p.q.cview(), rows_of(p.k, offset, mine), rows_of(p.v, offset, mine),
                              p.out.view(), opts);
  tensor<T, 4> one(p.out.extents);
  tensor<T, 3> one_lse(p.lse.extents);
  auto whole = opts;
  whole.lse_out = one_lse.view();
  xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), one.view(), whole);
  for (std::size_t n = 0; n < one.data.size(); ++n) {
    const bool b0h1 = n / (3 * 4) == 1;  // batch 0, head 1 reads the NaN key
    EXPECT_EQ(std::isnan(p.out.data[n]), b0h1) << "element " << n;
    EXPECT_EQ(std::isnan(one.data[n]), b0h1) << "element " << n;
    if (n >= 2 * 3 * 4) {
      EXPECT_EQ(p.out.data[n], T(0)) << "element " << n;
    }
  }
  for (std::size_t r = 6; r < 12; ++r) EXPECT_EQ(p.lse.data[r], -std::numeric_limits<T>::infinity());
  // Inputs in [-1, 1], Dk = 4, scale 1/2: every |score| is at most 2.
  const double tol = xattn_test::attention_tol<T>(4, Lk, 2.0);  // batch 0, head 0: finite
  for (std::size_t n = 0; n < 3 * 4; ++n)
    EXPECT_NEAR(double(p.out.data[n]), double(one.data[n]), tol * (1 + std::abs(double(one.data[n]))))
        << "element " << n;
  for (std::size_t r = 0; r < 3; ++r)
    EXPECT_NEAR(double(p.lse.data[r]), double(one_lse.data[r]), tol * (1 + std::abs(double(one_lse.data[r]))));
  for (std::size_t r = 3; r < 6; ++r) EXPECT_TRUE(std::isnan(p.lse.data[r])) << "row " << r;
}

// No queries, or no keys on any rank: nothing to merge, nothing hangs; a context with no keys at
// all gives zeros and a log-sum-exp of -inf, as in one process.
TEST(DistributedEdges, NoQueriesOrNoKeysAnywhere) {
  const xattn::communicator comm(MPI_COMM_WORLD);
  xattn_test::problem<float> none(xattn_test::shape(1, 2, 0, shard_len(comm.rank()), 4, 4), 1);
  xattn::attention_options<float> opts;
  opts.lse_out = none.lse.view();
  EXPECT_NO_THROW(xattn::sharded_attention<float>(comm, none.q.cview(), none.k.cview(), none.v.cview(),
                                                  none.out.view(), opts));
  xattn_test::problem<float> empty(xattn_test::shape(2, 2, 3, 0, 4, 5), 1);
  opts.lse_out = empty.lse.view();
  xattn::sharded_attention<float>(comm, empty.q.cview(), empty.k.cview(), empty.v.cview(), empty.out.view(), opts);
  EXPECT_EQ(empty.out.data, std::vector<float>(empty.out.data.size(), 0.0f));
  EXPECT_EQ(empty.lse.data, std::vector<float>(empty.lse.data.size(), -std::numeric_limits<float>::infinity()));
}

// The same call twice gives the same bytes (the merge order is fixed by rank, not by timing).
TYPED_TEST(Distributed, ShardedAttentionIsDeterministic) {
  using T = TypeParam;
  const xattn::communicator comm(MPI_COMM_WORLD);
  const index_t Lk = context_len(), mine = shard_len(comm.rank()), offset = shard_offset(comm.rank());
  xattn_test::problem<T> p(xattn_test::shape(2, 3, 20, Lk, 16, 16), 5);
  std::vector<T> first;
  for (int run = 0; run < 2; ++run) {
    xattn::tile_options tiles;
    tiles.num_threads = run + 1;
    xattn::sharded_attention<T>(comm, p.q.cview(), rows_of(p.k, offset, mine), rows_of(p.v, offset, mine),
                                p.out.view(), {}, tiles);
    if (run == 0) first = p.out.data;
  }
  EXPECT_EQ(first, p.out.data);
}

// The backward over shards: dq (summed over the ranks) and this rank's dk, dv against the
// backward of one process over the whole context.
TYPED_TEST(Distributed, ShardedBackwardMatchesOneProcess) {
  using T = TypeParam;
  const xattn::communicator comm(MPI_COMM_WORLD);
  const index_t Lk = context_len(), mine = shard_len(comm.rank()), offset = shard_offset(comm.rank());
  const auto s = xattn_test::shape(2, 4, 5, Lk, 4, 3, 2);
  std::vector<index_t> lengths = {Lk, std::max<index_t>(0, Lk - 6)};
  for (int c = 0; c < 2; ++c) {
    SCOPED_TRACE(c == 0 ? "no mask" : "key padding and causal");
    xattn_test::problem<T> p(s, 13);
    xattn::attention_options<T> opts;
    if (c == 1) {
      opts.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {2});
      opts.mask.causal = xattn::causal_mask::bottom_right;
    }
    opts.lse_out = p.lse.view();
    xattn::sharded_attention<T>(comm, p.q.cview(), rows_of(p.k, offset, mine), rows_of(p.v, offset, mine),
                                p.out.view(), opts);
    const auto dout = xattn_test::random_tensor<T, 4>(p.out.extents, 17);
    tensor<T, 4> dq(p.q.extents, T(-7)), dk({2, 2, mine, 4}, T(-7)), dv({2, 2, mine, 3}, T(-7));
    xattn::sharded_attention_backward<T>(comm, p.q.cview(), rows_of(p.k, offset, mine), rows_of(p.v, offset, mine),
                                         p.out.cview(), dout.cview(), {dq.view(), dk.view(), dv.view(), {}}, opts);

    tensor<T, 4> wq(p.q.extents), wk(p.k.extents), wv(p.v.extents), out(p.out.extents);
    tensor<T, 3> lse(p.lse.extents);
    auto whole = opts;
    whole.lse_out = lse.view();
    xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), out.view(), whole);
    xattn::naive_attention_backward<T>(p.q.cview(), p.k.cview(), p.v.cview(), out.cview(), dout.cview(),
                                       {wq.view(), wk.view(), wv.view(), {}}, whole);
    const double tol = xattn_test::backward_tol<T>(s, 2.0);  // |score| <= 1/2 · Dk = 2
    EXPECT_TRUE(xattn_test::all_close(dq.data, wq.data, tol)) << "dq";
    EXPECT_TRUE(xattn_test::all_close(dk.data, xattn_test::elements(rows_of(wk, offset, mine)), tol)) << "dk";
    EXPECT_TRUE(xattn_test::all_close(dv.data, xattn_test::elements(rows_of(wv, offset, mine)), tol)) << "dv";
    EXPECT_TRUE(same_on_every_rank(dq.data));
  }
}

/// A layer with grouped heads and the context the ranks share out.
template <class T>
struct layer_setup {
  xattn::cross_attention_config cfg;
  std::unique_ptr<xattn::multi_head_cross_attention<T>> layer;
  tensor<T, 3> query, context;
  layer_setup(index_t B, index_t Lq, index_t Lk) {
    cfg.model_dim = 12;
    cfg.context_dim = 10;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    layer = std::make_unique<xattn::multi_head_cross_attention<T>>(cfg, xattn::random_weights<T>(cfg, 7));
    query = xattn_test::random_tensor<T, 3>({B, Lq, 12}, 1);
    context = xattn_test::random_tensor<T, 3>({B, Lk, 10}, 2);
  }
  // Inputs in [-1, 1] and weights and biases in ±1/sqrt(in) (random_weights) bound each
  // projected feature by sqrt(in) + 1, so |score| <= sqrt(Dk) · (sqrt(Dm) + 1) · (sqrt(Dc) + 1).
  double score_bound() const {
    return std::sqrt(3.0) * (std::sqrt(12.0) + 1.0) * (std::sqrt(10.0) + 1.0);
  }
  xattn::tensor_view<const T, 3> context_rows(index_t begin, index_t n) const {
    const auto c = context.cview();
    return {c.data() + begin * c.stride(1), {c.extent(0), n, c.extent(2)}, c.strides()};
  }
};

// Context sharding in the module: each rank encodes only its shard; the result equals forward
// in one process over the whole context, with key padding and a causal mask across shards.
TYPED_TEST(Distributed, ModuleWithShardedContextMatchesOneProcess) {
  using T = TypeParam;
  const xattn::communicator comm(MPI_COMM_WORLD);
  const index_t Lk = context_len(), mine = shard_len(comm.rank()), offset = shard_offset(comm.rank());
  layer_setup<T> set(2, 7, Lk);
  std::vector<index_t> lengths = {Lk, std::max<index_t>(0, Lk - 5)};
  for (int c = 0; c < 2; ++c)
    for (const auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
      xattn::cross_attention_options<T> opts;
      if (c == 1) {
        opts.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {2});
        opts.mask.causal = xattn::causal_mask::bottom_right;
      }
      opts.kernel = kernel;
      tensor<T, 3> out({2, 7, 12}, T(-7)), want({2, 7, 12});
      tensor<T, 3> avg({2, 7, mine}, T(-7)), want_avg({2, 7, Lk});
      const auto shard = set.layer->encode_context(set.context_rows(offset, mine));
      auto o = opts;
      o.average_weights_out = avg.view();
      xattn::sharded_forward<T>(comm, *set.layer, set.query.cview(), shard, out.view(), o);
      o.average_weights_out = want_avg.view();
      set.layer->forward(set.query.cview(), set.context.cview(), want.view(), o);
      const double tol = xattn_test::module_tol<T>(set.cfg, Lk, set.score_bound());
      EXPECT_TRUE(xattn_test::all_close(out.data, want.data, tol)) << "case " << c;
      std::vector<T> want_cols;
      for (index_t row = 0; row < 14; ++row)
        for (index_t j = 0; j < mine; ++j) want_cols.push_back(want_avg.data[std::size_t(row * Lk + offset + j)]);
      EXPECT_TRUE(xattn_test::all_close(avg.data, want_cols, tol)) << "average weights, case " << c;
      EXPECT_TRUE(same_on_every_rank(out.data));
    }
}

// Query sharding: every rank holds the whole context and computes its share of the query
// positions; the gathered rows equal forward in one process, causal masks included. With one
// query, every rank but the last has none.
TYPED_TEST(Distributed, ModuleWithShardedQueriesMatchesOneProcess) {
  using T = TypeParam;
  const xattn::communicator comm(MPI_COMM_WORLD);
  for (const index_t Lq : {index_t(9), index_t(1)}) {
  SCOPED_TRACE("Lq = " + std::to_string(Lq));
  layer_setup<T> set(2, Lq, 11);
  const auto cache = set.layer->encode_context(set.context.cview());
  auto bias = xattn_test::random_tensor<T, 4>({1, 4, Lq, 11}, 3);
  for (int c = 0; c < 3; ++c)
    for (const auto result : {xattn::shard_result::all_ranks, xattn::shard_result::root}) {
      xattn::cross_attention_options<T> opts;
      if (c == 1) opts.mask.causal = xattn::causal_mask::top_left;
      if (c == 2) opts.mask.bias = bias.cview();
      tensor<T, 3> out({2, Lq, 12}, T(-7)), want({2, Lq, 12});
      xattn::shard_options sh;
      sh.result = result;
      xattn::query_sharded_forward<T>(comm, *set.layer, set.query.cview(), cache, out.view(), opts, sh);
      set.layer->forward(set.query.cview(), cache, want.view(), opts);
      if (result == xattn::shard_result::all_ranks || comm.rank() == 0)
        EXPECT_TRUE(xattn_test::all_close(out.data, want.data,
                                          xattn_test::module_tol<T>(set.cfg, 11, set.score_bound())))
            << "case " << c;
      else
        EXPECT_EQ(out.data, std::vector<T>(out.data.size(), T(-7)));
    }
  }
}

// ---- bad input: the same named error on every rank, no hang, nothing written ------------------

/// Runs f on every rank; true on every rank when it threw E on every rank with a message
/// containing `fragment`.
template <class E, class F>
bool throws_everywhere(F&& f, const std::string& fragment) {
  bool ok = false;
  try {
    f();
  } catch (const E& e) {
    ok = std::string(e.what()).find(fragment) != std::string::npos;
    if (!ok) ADD_FAILURE() << "rank " << world_rank() << ": " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "rank " << world_rank() << " threw the wrong type: " << e.what();
  }
  return everywhere(ok);
}

TEST(DistributedErrors, RanksThatDisagreeOnAShapeAllThrow) {
  const xattn::communicator comm(MPI_COMM_WORLD);
  if (comm.size() < 2) GTEST_SKIP() << "needs two ranks";
  const index_t lq = comm.rank() == 1 ? 4 : 3;  // rank 1 has one more query
  xattn_test::problem<float> p(xattn_test::shape(1, 2, lq, 5, 4, 4), 1);
  EXPECT_TRUE(throws_everywhere<xattn::shape_error>(
      [&] { xattn::sharded_attention<float>(comm, p.q.cview(), p.k.cview(), p.v.cview(), p.out.view()); },
      "sharded_attention: the ranks disagree on q.extent(2) (Lq): rank 0 has 3, rank 1 has 4"));
  EXPECT_TRUE(std::all_of(p.out.data.begin(), p.out.data.end(), [](float x) { return x == -7.0f; }));
}

TEST(DistributedErrors, OneRanksBadArgumentIsEveryRanksError) {
  const xattn::communicator comm(MPI_COMM_WORLD);
  const int bad = comm.size() - 1;
  xattn_test::problem<float> p(xattn_test::shape(1, 2, 3, 5, 4, 4), 1);
  tensor<float, 4> wrong_out({1, 2, 3, 5}, -7.0f);  // Dv is 4
  auto out = comm.rank() == bad ? wrong_out.view() : p.out.view();
  EXPECT_TRUE(throws_everywhere<xattn::shape_error>(
      [&] { xattn::sharded_attention<float>(comm, p.q.cview(), p.k.cview(), p.v.cview(), out); },
      "sharded_attention: out.extent(3) is 5, expected 4 (on rank " + std::to_string(bad) + ")"));
  EXPECT_TRUE(std::all_of(p.out.data.begin(), p.out.data.end(), [](float x) { return x == -7.0f; }));
}

TEST(DistributedErrors, ARankThatCannotHaveItsScratchFailsEveryRank) {
  // The last rank's shard is 2^40 keys (a zero stride) and kv_tile is 2^40: every argument
  // check passes, but its tiles' scratch cannot be had. That rank used to throw std::bad_alloc
  // after the exchange, while the others waited in MPI_Alltoallv for ever (CTest's timeout);
  // now the scratch is reserved before any data moves, and every rank throws.
  const xattn::communicator comm(MPI_COMM_WORLD);
  const int bad = comm.size() - 1;
  const index_t Lk = comm.rank() == bad ? index_t(1) << 40 : 5;
  xattn_test::problem<float> p(xattn_test::shape(1, 2, 32, 5, 4, 4), 1);
  const float kv[4] = {0.5f, -0.5f, 0.25f, 1.0f};
  const xattn::tensor_view<const float, 4> huge(kv, {1, 2, Lk, 4}, {0, 0, 0, 1});
  const auto k = comm.rank() == bad ? huge : p.k.cview();
  const auto v = comm.rank() == bad ? huge : p.v.cview();
  xattn::tile_options t;
  t.kv_tile = index_t(1) << 40;
  t.num_threads = 1;
  EXPECT_TRUE(throws_everywhere<std::bad_alloc>(
      [&] { xattn::sharded_attention<float>(comm, p.q.cview(), k, v, p.out.view(), {}, t); },
      "bad_alloc"));
  EXPECT_TRUE(std::all_of(p.out.data.begin(), p.out.data.end(), [](float x) { return x == -7.0f; }));
}

TEST(DistributedErrors, MasksScaleAndRootAreCheckedOnEveryRank) {
  const xattn::communicator comm(MPI_COMM_WORLD);
  const int me = comm.rank(), P = comm.size();
  xattn_test::problem<double> p(xattn_test::shape(2, 1, 3, shard_len(me), 4, 4), 1);
  const auto call = [&](const xattn::attention_options<double>& o, const xattn::shard_options& sh = {}) {
    xattn::sharded_attention<double>(comm, p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), o, {}, sh);
  };
  std::vector<index_t> lengths = {1, me == P - 1 && P > 1 ? 2 : 1};
  xattn::attention_options<double> o;
  o.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {2});
  if (P > 1) {
    EXPECT_TRUE(throws_everywhere<xattn::value_error>([&] { call(o); }, "the ranks disagree on mask.kv_lengths"));
  }
  std::vector<index_t> too_long = {context_len() + 1, 0};
  o.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(too_long.data(), {2});
  EXPECT_TRUE(throws_everywhere<xattn::value_error>(
      [&] { call(o); }, "mask.kv_lengths(0) is " + std::to_string(context_len() + 1) + ", expected a value in [0, " +
                            std::to_string(context_len()) + "]"));
  xattn::attention_options<double> scaled;
  scaled.scale = me == 0 ? 0.5 : 0.25;
  if (P > 1) {
    EXPECT_TRUE(throws_everywhere<xattn::value_error>([&] { call(scaled); }, "the ranks disagree on the scale"));
  }
  xattn::attention_options<double> causal;
  causal.mask.causal = me == 0 ? xattn::causal_mask::top_left : xattn::causal_mask::bottom_right;
  if (P > 1) {
    EXPECT_TRUE(throws_everywhere<xattn::value_error>([&] { call(causal); }, "the ranks disagree on mask.causal"));
  }
  xattn::shard_options sh;
  sh.result = xattn::shard_result::root;
  sh.root = P;
  EXPECT_TRUE(throws_everywhere<xattn::value_error>([&] { call({}, sh); }, "sharding.root is"));
  xattn::tile_options tiles;  // a bad tile option on one rank only: every rank throws
  if (me == P - 1) tiles.kv_tile = 0;
  EXPECT_TRUE(throws_everywhere<xattn::value_error>(
      [&] { xattn::sharded_attention<double>(comm, p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), {}, tiles); },
      "sharded_attention: tiles.kv_tile is 0, expected >= 1 (on rank " + std::to_string(P - 1) + ")"));
  xattn::attention_options<double> windowed;
  windowed.mask.window = xattn::position_window{};
  EXPECT_TRUE(throws_everywhere<xattn::value_error>([&] { call(windowed); }, "mask.window is set"));
  EXPECT_TRUE(std::all_of(p.out.data.begin(), p.out.data.end(), [](double x) { return x == -7.0; }));
  // After all of that the communicator still works.
  EXPECT_NO_THROW(call({}));
}

TEST(DistributedErrors, ModuleCallsCheckTheirArguments) {
  const xattn::communicator comm(MPI_COMM_WORLD);
  layer_setup<float> set(1, 4, 6);
  const auto cache = set.layer->encode_context(set.context.cview());
  tensor<float, 3> out({1, 4, 12}, -7.0f);
  tensor<float, 4> weights({1, 4, 4, 6});
  xattn::cross_attention_options<float> opts;
  opts.weights_out = weights.view();
  EXPECT_TRUE(throws_everywhere<xattn::value_error>(
      [&] { xattn::query_sharded_forward<float>(comm, *set.layer, set.query.cview(), cache, out.view(), opts); },
      "weights_out and average_weights_out are not gathered"));
  bool pad[6] = {};
  xattn::cross_attention_options<float> padded;
  padded.key_padding_mask = xattn::tensor_view<const bool, 2>(pad, {1, 6});
  EXPECT_TRUE(throws_everywhere<xattn::value_error>(
      [&] { xattn::sharded_forward<float>(comm, *set.layer, set.query.cview(), cache, out.view(), padded); },
      "key_padding_mask is per shard"));
  // The attention's own arguments, checked before the exchange: a bias of the wrong key count
  // on the last rank only.
  const int last = comm.size() - 1;
  tensor<float, 4> bias({1, 1, 1, comm.rank() == last ? 7 : 6});
  xattn::cross_attention_options<float> biased;
  biased.mask.bias = bias.cview();
  EXPECT_TRUE(throws_everywhere<xattn::shape_error>(
      [&] { xattn::sharded_forward<float>(comm, *set.layer, set.query.cview(), cache, out.view(), biased); },
      "sharded_forward: mask.bias.extent(3) is 7, expected 1 or 6 (on rank " + std::to_string(last) + ")"));
  const auto wrong_query = xattn_test::random_tensor<float, 3>({1, 4, comm.rank() == 0 ? 11 : 12}, 1);
  EXPECT_TRUE(throws_everywhere<xattn::shape_error>(
      [&] { xattn::sharded_forward<float>(comm, *set.layer, wrong_query.cview(), cache, out.view()); },
      "sharded_forward: query.extent(2) is 11, expected 12 (on rank 0)"));
  EXPECT_EQ(out.data, std::vector<float>(out.data.size(), -7.0f));
}

TEST(DistributedErrors, NullCommunicatorAndMpiFailuresAreNamed) {
  EXPECT_TRUE(xattn_test::throws_with<xattn::value_error>([] { xattn::communicator c(MPI_COMM_NULL); },
                                                          {"communicator: the communicator is MPI_COMM_NULL"}));
  EXPECT_TRUE(xattn_test::throws_with<xattn::mpi_error>(
      [] { xattn::detail::check_mpi(MPI_ERR_COUNT, "sharded_attention", "MPI_Alltoallv"); },
      {"sharded_attention: MPI_Alltoallv failed (error "}));
  xattn::communicator a(MPI_COMM_WORLD);
  xattn::communicator b(std::move(a));  // a move leaves one owner of the duplicate
  EXPECT_EQ(b.size(), world_size());
  EXPECT_EQ(a.get(), MPI_COMM_NULL);
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  if (world_rank() != 0) ::testing::GTEST_FLAG(brief) = true;  // failures only, from other ranks
  ::testing::InitGoogleTest(&argc, argv);
  const int failed = RUN_ALL_TESTS();
  MPI_Finalize();
  return failed;
}
