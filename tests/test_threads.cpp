// SPDX-License-Identifier: MIT
// Threads: the kernels may be called from several threads at once (OpenMP or std::thread) on
// shared inputs and separate outputs, and tiled_attention gives the same bits on 1 to 4 threads
// for a problem large enough to give every thread several tiles. The tsan preset runs these
// under ThreadSanitizer.
#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/cross_attention.hpp"

#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <new>
#include <thread>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::random_tensor;
using xattn_test::tensor;

// Shared inputs: B = 2, H = 4, Hkv = 2, Lq = 37, Lk = 53, Dk = 16, Dv = 8, with key padding.
struct shared_inputs {
  tensor<float, 4> q = random_tensor<float, 4>({2, 4, 37, 16}, 1);
  tensor<float, 4> k = random_tensor<float, 4>({2, 2, 53, 16}, 2);
  tensor<float, 4> v = random_tensor<float, 4>({2, 2, 53, 8}, 3);
  index_t lengths[2] = {53, 20};
  xattn::attention_options<float> opts;
  shared_inputs() { opts.mask.kv_lengths = xattn::make_view(lengths, {2}); }
};

// Each call writes its own output; all must equal a call made alone, bit for bit.
void expect_all_equal(const std::vector<tensor<float, 4>>& outs, const tensor<float, 4>& alone) {
  for (std::size_t n = 0; n < outs.size(); ++n)
    EXPECT_EQ(
        std::memcmp(outs[n].data.data(), alone.data.data(), alone.data.size() * sizeof(float)), 0)
        << "call " << n;
}

TEST(Threads, KernelsRunConcurrentlyOnOpenMPThreads) {
  const shared_inputs in;
  for (const auto& kern : {xattn_test::naive_kernel<float>(),
                           xattn_test::tiled_kernel<float>(xattn::tile_options{4, 16, 1})}) {
    SCOPED_TRACE(kern.name);
    tensor<float, 4> alone({2, 4, 37, 8});
    kern.run(in.q.cview(), in.k.cview(), in.v.cview(), alone.view(), in.opts);
    std::vector<tensor<float, 4>> outs(8, tensor<float, 4>({2, 4, 37, 8}));
#ifdef _OPENMP
#  pragma omp parallel for num_threads(4) schedule(static, 1)
#endif
    for (int n = 0; n < 8; ++n)
      kern.run(in.q.cview(), in.k.cview(), in.v.cview(), outs[std::size_t(n)].view(), in.opts);
    expect_all_equal(outs, alone);
  }
}

TEST(Threads, KernelsRunConcurrentlyOnStdThreads) {
  const shared_inputs in;
  for (const auto& kern :
       {xattn_test::naive_kernel<float>(), xattn_test::tiled_kernel<float>({})}) {
    SCOPED_TRACE(kern.name);
    tensor<float, 4> alone({2, 4, 37, 8});
    kern.run(in.q.cview(), in.k.cview(), in.v.cview(), alone.view(), in.opts);
    std::vector<tensor<float, 4>> outs(4, tensor<float, 4>({2, 4, 37, 8}));
    std::vector<std::thread> threads;
    for (std::size_t n = 0; n < outs.size(); ++n)
      threads.emplace_back(
          [&, n] { kern.run(in.q.cview(), in.k.cview(), in.v.cview(), outs[n].view(), in.opts); });
    for (auto& t : threads) t.join();
    expect_all_equal(outs, alone);
  }
}

TEST(Threads, TiledGivesTheSameBitsOnEveryThreadCount) {
  // Lq = 37 and Lk = 53 in tiles of 4 x 16, 1 x 7 and 64 x 128, on 1 to 4 threads: identical
  // outputs, weights and log-sum-exp.
  const shared_inputs in;
  const std::pair<index_t, index_t> tiles[] = {{4, 16}, {1, 7}, {64, 128}};
  for (const auto& [qt, kt] : tiles) {
    tensor<float, 4> first_out, first_w;
    tensor<float, 3> first_lse;
    for (int t : xattn_test::thread_counts()) {
      SCOPED_TRACE(::testing::Message()
                   << "q_tile=" << qt << " kv_tile=" << kt << " threads=" << t);
      tensor<float, 4> out({2, 4, 37, 8}), w({2, 4, 37, 53});
      tensor<float, 3> lse({2, 4, 37});
      xattn::attention_options<float> opts = in.opts;
      opts.weights_out = w.view();
      opts.lse_out = lse.view();
      xattn::tiled_attention<float>(in.q.cview(), in.k.cview(), in.v.cview(), out.view(), opts,
                                    xattn::tile_options{qt, kt, t});
      if (t == 1) {
        first_out = out;
        first_w = w;
        first_lse = lse;
        const auto want =
            xattn_test::reference_attention<float>(in.q.cview(), in.k.cview(), in.v.cview(), opts);
        const double tol = xattn_test::attention_tol<float>(16, 53, want.max_abs_score);
        EXPECT_TRUE(xattn_test::all_close(out.data, want.out, tol));
        continue;
      }
      EXPECT_EQ(out.data, first_out.data);
      EXPECT_EQ(w.data, first_w.data);
      EXPECT_EQ(lse.data, first_lse.data);
    }
  }
}

TEST(Threads, TiledBackwardGivesTheSameBitsOnEveryThreadCount) {
  // The gradients of the problem above, with a bias broadcast over the batch (so its gradient
  // sums over batch items too), in tiles of 4 x 16, 1 x 7 and 64 x 128, on 1 to 4 threads.
  const shared_inputs in;
  const auto bias = random_tensor<float, 4>({1, 4, 37, 53}, 4);
  const auto dout = random_tensor<float, 4>({2, 4, 37, 8}, 5);
  tensor<float, 4> out({2, 4, 37, 8});
  tensor<float, 3> lse({2, 4, 37});
  xattn::attention_options<float> opts = in.opts;
  opts.mask.bias = bias.cview();
  opts.lse_out = lse.view();
  xattn::tiled_attention<float>(in.q.cview(), in.k.cview(), in.v.cview(), out.view(), opts);
  const std::pair<index_t, index_t> tiles[] = {{4, 16}, {1, 7}, {64, 128}};
  for (const auto& [qt, kt] : tiles) {
    std::vector<std::vector<float>> first;
    for (int t : xattn_test::thread_counts()) {
      SCOPED_TRACE(::testing::Message()
                   << "q_tile=" << qt << " kv_tile=" << kt << " threads=" << t);
      tensor<float, 4> dq({2, 4, 37, 16}), dk({2, 2, 53, 16}), dv({2, 2, 53, 8}),
          dbias({1, 4, 37, 53});
      xattn::tiled_attention_backward<float>(
          in.q.cview(), in.k.cview(), in.v.cview(), out.cview(), dout.cview(),
          {dq.view(), dk.view(), dv.view(), dbias.view()}, opts, xattn::tile_options{qt, kt, t});
      const std::vector<std::vector<float>> now = {dq.data, dk.data, dv.data, dbias.data};
      if (first.empty()) first = now;
      EXPECT_EQ(now, first);
    }
  }
}

// ---- defects found from outside (each failed before its fix) ----------------------------------

TEST(Threads, AllocationFailureIsAnExceptionOnEveryThreadCount) {
  // kv_tile = Lk = 2^40 keys (a zero stride) cannot be given scratch. On two threads this used
  // to throw inside the OpenMP region, which ends the program.
  const index_t Lk = index_t(1) << 40;
  const auto q = random_tensor<float, 4>({1, 1, 32, 4}, 1);
  const float kv[4] = {0.5f, -0.5f, 0.25f, 1.0f};
  const xattn::tensor_view<const float, 4> k(kv, {1, 1, Lk, 4}, {0, 0, 0, 1});
  tensor<float, 4> out({1, 1, 32, 4}, -7.0f);
  for (int threads : xattn_test::thread_counts()) {
    SCOPED_TRACE(threads);
    xattn::tile_options t;
    t.kv_tile = Lk;
    t.num_threads = threads;
    EXPECT_THROW(xattn::tiled_attention<float>(q.cview(), k, k, out.view(), {}, t), std::bad_alloc);
    for (float x : out.data) ASSERT_EQ(x, -7.0f);
  }
}

TEST(Threads, WorkerThreadsOwnNoScratch) {
  // The scratch of a threaded call belongs to the calling thread, so a worker thread that
  // outlives the call (OpenMP keeps its pool) holds no memory of xattn's. A new std::thread has
  // an OpenMP pool of its own whose workers have never called xattn themselves.
  const int threads = std::min(4, xattn_test::max_threads());
  std::size_t caller_scratch = 0;
  int owning_workers = -1;
  std::thread caller([&] {
    const shared_inputs in;
    tensor<float, 4> out({2, 4, 37, 8});
    xattn::tile_options t;
    t.q_tile = 4;
    t.num_threads = threads;
    xattn::tiled_attention<float>(in.q.cview(), in.k.cview(), in.v.cview(), out.view(), in.opts, t);
    caller_scratch = xattn::detail::calling_thread_scratch<float>().threads.size();
    int owning = 0;
#ifdef _OPENMP
#  pragma omp parallel num_threads(threads) reduction(+ : owning)
    if (omp_get_thread_num() != 0)
      owning += xattn::detail::calling_thread_scratch<float>().threads.empty() ? 0 : 1;
#endif
    owning_workers = owning;
  });
  caller.join();
  EXPECT_EQ(caller_scratch, std::size_t(threads));
  EXPECT_EQ(owning_workers, 0);
}

TEST(Threads, ModuleCopiesRunConcurrently) {
  // A copy shares the weights and owns its buffers: one copy per thread, all at once.
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.context_dim = 12;
  cfg.num_heads = 4;
  cfg.num_kv_heads = 2;
  const xattn::multi_head_cross_attention<float> mha(cfg, xattn::random_weights<float>(cfg, 4));
  const auto query = random_tensor<float, 3>({2, 9, 16}, 5);
  const auto context = random_tensor<float, 3>({2, 21, 12}, 6);
  const auto cache = mha.encode_context(context.cview());
  auto alone_module = mha;
  tensor<float, 3> alone({2, 9, 16});
  alone_module.forward(query.cview(), cache, alone.view());
  std::vector<tensor<float, 3>> outs(4, tensor<float, 3>({2, 9, 16})), full = outs;
  std::vector<std::thread> pool;
  for (std::size_t n = 0; n < outs.size(); ++n)
    pool.emplace_back([&, n] {
      auto mine = mha;  // cheap: shared weights
      mine.forward(query.cview(), cache, outs[n].view());
      mine.forward(query.cview(), context.cview(), full[n].view());
    });
  for (auto& th : pool) th.join();
  for (std::size_t n = 0; n < outs.size(); ++n) {
    EXPECT_EQ(outs[n].data, alone.data) << "thread " << n;
    EXPECT_EQ(full[n].data, alone.data) << "thread " << n;
  }
}

}  // namespace
