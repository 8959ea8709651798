// SPDX-License-Identifier: MIT
// Attention benchmarks: naive_attention, the two Eigen GEMMs it is built on with nothing else,
// and one large Eigen SGEMM as the machine's ceiling. Run a Release build, e.g.
//   bench_attention --benchmark_filter=BM_NaiveAttention/Lq:1024
// The helpers are in bench_common.hpp.

#include "bench_common.hpp"

#include "xattn/attention_naive.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <benchmark/benchmark.h>
#include <Eigen/Core>

namespace {

using xattn::index_t;
using xattn_bench::attention_inputs;

// forward FLOPs = 2·B·H·Lq·Lk·Dk (Q Kᵀ) + 2·B·H·Lq·Lk·Dv (P V); softmax not counted
// (xattn::attention_flops). Reported per iteration as a rate, so "FLOPS" prints e.g. 41.7G/s.
void report_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["FLOPS"] =
      benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

// One (batch, head) slice, B = H = 1, Dk = Dv = 64, with Lq and Lk from the arguments.
xattn::attention_shape single_head(const benchmark::State& state) {
  xattn::attention_shape s;
  s.q_len = state.range(0);
  s.kv_len = state.range(1);
  s.head_dim = 64;
  s.value_dim = 64;
  return s;
}

// The reference kernel as users call it, so its per-call [Lq, Lk] score allocation is timed too.
void BM_NaiveAttention(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  attention_inputs<float> io(s);
  for (auto _ : state) {
    xattn::naive_attention<float>(io.q(), io.k(), io.v(), io.out());
    benchmark::DoNotOptimize(io.out().data());
    benchmark::ClobberMemory();
  }
  report_flops(state, xattn::attention_flops(s));
  state.counters["scratch_KiB"] = double(xattn::naive_attention_scratch_bytes<float>(s)) / 1024.0;
}

// The Eigen-only baseline: S = Q Kᵀ, then O = S V, into an S allocated once, with no scale and
// no softmax. The gap to BM_NaiveAttention is what the softmax and the allocation cost.
void BM_TwoGemms(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  const attention_inputs<float> io(s);
  using const_map = Eigen::Map<const xattn::row_matrix<float>>;
  const const_map Q(io.q().data(), s.q_len, s.head_dim);
  const const_map K(io.k().data(), s.kv_len, s.head_dim);
  const const_map V(io.v().data(), s.kv_len, s.value_dim);
  xattn::row_matrix<float> S(s.q_len, s.kv_len), O(s.q_len, s.value_dim);
  for (auto _ : state) {
    S.noalias() = Q * K.transpose();
    O.noalias() = S * V;
    benchmark::DoNotOptimize(O.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, xattn::attention_flops(s));
}

// One square n x n x n SGEMM (2·n³ FLOPs), single-threaded like the kernels above: the
// fastest this machine multiplies float matrices through Eigen.
void BM_EigenSgemm(benchmark::State& state) {
  xattn_bench::label_build(state);
  const index_t n = state.range(0);
  const auto A = xattn_bench::random_matrix<float>(n, n, /*seed=*/1);
  const auto B = xattn_bench::random_matrix<float>(n, n, /*seed=*/2);
  xattn::row_matrix<float> C(n, n);
  for (auto _ : state) {
    C.noalias() = A * B;
    benchmark::DoNotOptimize(C.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, 2.0 * double(n) * double(n) * double(n));
}

const auto lengths = benchmark::CreateRange(128, 8192, /*multi=*/2);  // 128, 256, ..., 8192

}  // namespace

BENCHMARK(BM_NaiveAttention)
    ->ArgNames({"Lq", "Lk"})
    ->ArgsProduct({lengths, lengths})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_TwoGemms)
    ->ArgNames({"Lq", "Lk"})
    ->ArgsProduct({lengths, lengths})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EigenSgemm)->ArgName("n")->Arg(2048)->Unit(benchmark::kMillisecond);

int main(int argc, char** argv) { return xattn_bench::run_benchmarks(argc, argv); }
