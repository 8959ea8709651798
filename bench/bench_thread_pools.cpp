// SPDX-License-Identifier: MIT
// tiled_attention beside another library's thread pool in one process. OpenBLAS (the pthreads
// build) keeps its worker threads spinning for a while after each call; OpenMP threads that
// xattn starts then share the cores with them. Each iteration runs one cblas_sgemm on OpenBLAS's
// threads and then times one attention call (manual time: the GEMM is not counted).
//
//   threads:auto  the library's default: no fork for a call below min_flops_per_thread
//   threads:2     tile_options::num_threads = 2 (every call forks, as before that rule)
//   blas:0/1      without / with the OpenBLAS call before each attention call
//
// Run each case in its own process (--benchmark_filter=...), as every threaded benchmark here.
#include "xattn/attention_tiled.hpp"

#include "bench_common.hpp"

#include <benchmark/benchmark.h>
#include <cblas.h>

#include <chrono>
#include <vector>

namespace {

using xattn::index_t;

// args: Lq, Lk, threads (0 = the library's default), blas (0 or 1); one head, Dk = Dv = 64.
void BM_TiledBesideOpenBLAS(benchmark::State& state) {
  const index_t lq = state.range(0), lk = state.range(1);
  const xattn::attention_shape s{1, 1, lq, lk, 64, 64, 0};
  xattn_bench::attention_inputs<float> io(s);
  xattn::tile_options tiles;
  if (state.range(2) > 0) tiles.num_threads = int(state.range(2));
  const bool blas = state.range(3) != 0;
  const int n = 256;  // a GEMM big enough that OpenBLAS uses all its threads
  std::vector<float> a(std::size_t(n * n), 0.5f), b(a), c(a);
  for (auto _ : state) {
    if (blas)
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a.data(), n, b.data(),
                  n, 0.0f, c.data(), n);
    const auto t0 = std::chrono::steady_clock::now();
    xattn::tiled_attention<float>(io.q(), io.k(), io.v(), io.out(), {}, tiles);
    benchmark::DoNotOptimize(io.out().data());
    benchmark::ClobberMemory();
    state.SetIterationTime(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  const double flops = 2.0 * double(lq) * double(lk) * (64 + 64);
  state.counters["FLOPS"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads_used"] =
      double(xattn::detail::make_tiled_plan<float>(s, tiles, false).threads);
  xattn_bench::label_build(state);
}
BENCHMARK(BM_TiledBesideOpenBLAS)
    ->ArgNames({"Lq", "Lk", "threads", "blas"})
    ->ArgsProduct({{1}, {1500}, {0, 2}, {0, 1}})
    ->ArgsProduct({{1024}, {1024}, {0, 2}, {0, 1}})
    ->UseManualTime();

}  // namespace

int main(int argc, char** argv) { return xattn_bench::run_benchmarks(argc, argv); }
