// SPDX-License-Identifier: MIT
// sharded_attention under mpiexec: Lq = 256 latents, H = 8, D = 64 against a context of Lk keys
// split evenly over the ranks. Run it as
//   mpiexec -n P ./bench_distributed [benchmark flags]
// Every rank runs the same benchmarks with a fixed iteration count (so all take part in every
// call); the time of a call is the slowest rank's (manual time), and only rank 0 reports.
// Counters: FLOPS of the whole problem (forward count, see bench_attention.cpp), ranks, the
// bytes each rank sent for the merge (MPI_Alltoallv + MPI_Allgatherv: 2·(P-1)/P·B·H·Lq·(Dv+1)
// numbers, whatever Lk is), and the memory of one rank's shard.
#include "xattn/distributed.hpp"

#include "bench_common.hpp"

#include <benchmark/benchmark.h>
#include <mpi.h>

#include <chrono>
#include <random>
#include <vector>

namespace {

using xattn::index_t;

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

const xattn::communicator& comm() {
  static const xattn::communicator c(MPI_COMM_WORLD);
  return c;
}

// Lq = 256 latents, H = 8, D = 64; the context's length is the argument, split evenly.
void run_sharded(benchmark::State& state) {
  xattn_bench::label_build(state);
  const int P = comm().size(), me = comm().rank();
  const index_t B = 1, H = 8, Lq = 256, D = 64, Lk = state.range(0);
  const index_t mine = Lk * (me + 1) / P - Lk * me / P;
  std::vector<float> q(std::size_t(B * H * Lq * D)), k(std::size_t(B * H * mine * D)),
      v(k.size()), out(q.size());
  std::mt19937 gen(unsigned(1 + me));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (auto* x : {&q, &k, &v})
    for (float& e : *x) e = dist(gen);
  const xattn::tensor_view<const float, 4> Q(q.data(), {B, H, Lq, D}), K(k.data(), {B, H, mine, D}),
      V(v.data(), {B, H, mine, D});
  const xattn::tensor_view<float, 4> O(out.data(), {B, H, Lq, D});
  for (auto _ : state) {
    MPI_Barrier(comm().get());
    const auto t0 = std::chrono::steady_clock::now();
    xattn::sharded_attention<float>(comm(), Q, K, V, O);
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    MPI_Allreduce(MPI_IN_PLACE, &seconds, 1, MPI_DOUBLE, MPI_MAX, comm().get());
    state.SetIterationTime(seconds);
    benchmark::DoNotOptimize(out.data());
  }
  const xattn::attention_shape s{B, H, Lq, Lk, D, D};
  state.counters["FLOPS"] = benchmark::Counter(xattn::attention_flops(s),
                                               benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ranks"] = P;
  state.counters["sent_KiB_per_rank"] =
      2.0 * double(P - 1) / P * double(B * H * Lq * (D + 1)) * sizeof(float) / 1024.0;
  state.counters["shard_MiB"] = double(2 * k.size() * sizeof(float)) / 1048576.0;
}
void BM_ShardedAttention(benchmark::State& state) { run_sharded(state); }
void BM_ShardedMerge(benchmark::State& state) { run_sharded(state); }

// 64K to 1M keys; each call is timed alone (fixed iterations, the same on every rank).
BENCHMARK(BM_ShardedAttention)
    ->ArgName("Lk")
    ->Arg(1 << 16)
    ->Arg(1 << 18)
    ->Arg(1 << 20)
    ->Iterations(2)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
// The merge alone: one key per rank, so the time is the exchange and the merge.
BENCHMARK(BM_ShardedMerge)
    ->ArgName("Lk")
    ->Arg(16)
    ->Iterations(50)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);

/// Prints nothing: the reporter of every rank but 0.
class quiet_reporter : public benchmark::BenchmarkReporter {
 public:
  bool ReportContext(const Context&) override { return true; }
  void ReportRuns(const std::vector<Run>&) override {}
};

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  xattn_bench::add_build_context();
  benchmark::AddCustomContext("mpi_ranks", std::to_string(world_size()));
  (void)comm();
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    benchmark::RunSpecifiedBenchmarks();
  } else {
    quiet_reporter quiet;
    benchmark::RunSpecifiedBenchmarks(&quiet);
  }
  benchmark::Shutdown();
  MPI_Finalize();
  return 0;
}
