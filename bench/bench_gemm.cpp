// SPDX-License-Identifier: MIT
// The projections' matrix product, C = X Wᵀ (+ bias) with a PyTorch weight W [out, in], at the
// shapes of bench_cross_attention's layers, on every engine this binary has, in one run:
//   engine:0  xattn   detail/gemm.hpp on the level dispatch chose (what the module runs)
//   engine:1  eigen   Eigen's GEMM as this binary was compiled (SSE2 in a build without
//                     -march; bench_gemm_native is the same source built with -march=native)
//   engine:2  blas    cblas_sgemm of the OpenBLAS linked (where one was found at configure)
// Each case reports GFLOP/s (FLOPS) and peak_frac, its rate over the core's measured FMA peak
// times the threads. Threads each in its own process for numbers worth quoting:
//   bench_gemm --benchmark_filter=threads:1
#include "bench_common.hpp"

#include "xattn/detail/gemm.hpp"
#include "xattn/dispatch.hpp"

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <chrono>
#include <string>

#if XATTN_BENCH_HAVE_BLAS
#  include <cblas.h>
#endif
#ifdef _OPENMP
#  include <omp.h>
#endif

namespace {

using xattn::index_t;

struct gemm_shape {
  const char* name;
  index_t rows, in, out;
};

// rows x in times Wᵀ [in, out]: the layers of bench_cross_attention, and a square reference.
const gemm_shape shapes[] = {
    {"sd_unet q/out (2x4096 latents, 320 -> 320)", 8192, 320, 320},
    {"sd_unet k/v (2x77 tokens, 768 -> 320)", 154, 768, 320},
    {"whisper k/v (1500 frames, 384 -> 384)", 1500, 384, 384},
    {"perceiver k/v (16384 inputs, 256 -> 512)", 16384, 256, 512},
    {"perceiver q (256 latents, 512 -> 512)", 256, 512, 512},
    {"square 2048", 2048, 2048, 2048},
};

const char* const engines[] = {"xattn", "eigen", "blas"};

void BM_Gemm(benchmark::State& state) {
  const gemm_shape& s = shapes[state.range(0)];
  const int engine = int(state.range(1)), threads = int(state.range(2));
#if !XATTN_BENCH_HAVE_BLAS
  if (engine == 2) {
    state.SkipWithError("no BLAS in this build");
    return;
  }
#endif
  std::string label = std::string(engines[engine]) + " " + s.name;
  if (engine == 0) label += std::string(" level=") + std::string(xattn::cpu_path());
  if (engine == 1) label += std::string(" eigen_simd=") + Eigen::SimdInstructionSetsInUse();
#ifndef NDEBUG
  label += " asserts-on";
#endif
  state.SetLabel(label);
  Eigen::setNbThreads(threads);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  state.counters["num_threads"] = threads;
  const auto X = xattn_bench::random_matrix<float>(s.rows, s.in, 1);
  const auto W = xattn_bench::random_matrix<float>(s.out, s.in, 2);
  const auto bias = xattn_bench::random_matrix<float>(1, s.out, 3);
  xattn::row_matrix<float> Y(s.rows, s.out);
  const auto& kern = xattn::detail::gemm_kernels_for<float>(xattn::detail::active_level());
  const xattn::detail::gemm_args<float> g{s.rows, s.out, s.in,    X.data(), s.in,        1,
                                          W.data(), 1,     s.in,  Y.data(), s.out,       false,
                                          bias.data()};
  const auto run = [&] {
    switch (engine) {
      case 0:
        xattn::detail::gemm_with(kern, g, threads);
        break;
      case 1:
        Y.noalias() = X * W.transpose();
        Y.rowwise() += bias.row(0);
        break;
      default:
#if XATTN_BENCH_HAVE_BLAS
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(s.rows), int(s.out), int(s.in),
                    1.0f, X.data(), int(s.in), W.data(), int(s.in), 0.0f, Y.data(), int(s.out));
        Y.rowwise() += bias.row(0);
#endif
        break;
    }
  };
  run();  // warm-up: first-touch of Y, the packing buffers' pages
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    run();
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  const double seconds = xattn_bench::seconds_since(t0);
  const double flops = 2.0 * double(s.rows) * double(s.in) * double(s.out);
  state.counters["FLOPS"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  xattn_bench::report_peak_fraction(state, flops, seconds, threads);
}

void gemm_cases(benchmark::internal::Benchmark* b) {
  b->ArgNames({"shape", "engine", "threads"});
  for (int threads : {1, 2})
    for (index_t s = 0; s < index_t(std::size(shapes)); ++s)
      for (int e = 0; e < 3; ++e) b->Args({s, e, threads});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_Gemm)->Apply(gemm_cases);

int main(int argc, char** argv) { return xattn_bench::run_benchmarks(argc, argv); }
