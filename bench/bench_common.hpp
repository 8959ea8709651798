// SPDX-License-Identifier: MIT
// Helpers shared by the benchmarks: fixed-seed inputs that own their buffers, the run label and
// the report context that say how the binary was built. bench_attention.cpp shows their use.
#pragma once

#include "xattn/config.hpp"
#include "xattn/dispatch.hpp"
#include "xattn/half.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace xattn_bench {

using xattn::index_t;

/// Fills data[0, n) with values drawn uniformly from [-1, 1] (for the half types, drawn in
/// float and rounded).
template <class T>
void fill_uniform(T* data, index_t n, std::mt19937& rng) {
  using C = xattn::compute_t<T>;
  std::uniform_real_distribution<C> dist(C(-1), C(1));
  for (index_t i = 0; i < n; ++i) data[i] = static_cast<T>(dist(rng));
}

/// A [rows, cols] row-major matrix of fixed-seed values uniform in [-1, 1].
template <class T>
xattn::row_matrix<T> random_matrix(index_t rows, index_t cols, std::uint32_t seed) {
  xattn::row_matrix<T> m(rows, cols);
  std::mt19937 rng(seed);
  fill_uniform(m.data(), m.size(), rng);
  return m;
}

/// The operands of one attention call of shape s, packed row-major:
///
///   q [B, H, Lq, Dk]   k [B, Hkv, Lk, Dk]   v [B, Hkv, Lk, Dv]   out [B, H, Lq, Dv]
///
/// q, k and v hold fixed-seed values uniform in [-1, 1] (so scores stay small); out starts at 0.
/// Build it outside the timed loop.
template <class T>
class attention_inputs {
 public:
  explicit attention_inputs(const xattn::attention_shape& s, std::uint32_t seed = 42)
      : shape_(s),
        q_(s.batch * s.num_heads * s.q_len * s.head_dim),
        k_(s.batch * s.kv_heads() * s.kv_len * s.head_dim),
        v_(s.batch * s.kv_heads() * s.kv_len * s.value_dim),
        out_(buffer::Zero(s.batch * s.num_heads * s.q_len * s.value_dim)) {
    std::mt19937 rng(seed);
    fill_uniform(q_.data(), q_.size(), rng);
    fill_uniform(k_.data(), k_.size(), rng);
    fill_uniform(v_.data(), v_.size(), rng);
  }

  const xattn::attention_shape& shape() const noexcept { return shape_; }

  xattn::tensor_view<const T, 4> q() const {
    const auto& s = shape_;
    return xattn::make_view(q_.data(), {s.batch, s.num_heads, s.q_len, s.head_dim});
  }
  xattn::tensor_view<const T, 4> k() const {
    const auto& s = shape_;
    return xattn::make_view(k_.data(), {s.batch, s.kv_heads(), s.kv_len, s.head_dim});
  }
  xattn::tensor_view<const T, 4> v() const {
    const auto& s = shape_;
    return xattn::make_view(v_.data(), {s.batch, s.kv_heads(), s.kv_len, s.value_dim});
  }
  xattn::tensor_view<T, 4> out() {
    const auto& s = shape_;
    return xattn::make_view(out_.data(), {s.batch, s.num_heads, s.q_len, s.value_dim});
  }

 private:
  using buffer = Eigen::Array<T, Eigen::Dynamic, 1>;  // aligned for the widest SIMD in use

  xattn::attention_shape shape_;
  buffer q_, k_, v_, out_;
};

/// Labels the run "asserts-on" when NDEBUG is not defined: xattn's and Eigen's asserts are then
/// inside the timed loop and the numbers are not worth comparing. Call it from every benchmark.
inline void label_build(benchmark::State& state) {
#ifndef NDEBUG
  state.SetLabel("asserts-on");
#else
  (void)state;
#endif
}

// ---- the core's peak, measured once per process ------------------------------------------------
// Throughput loops of 12 independent accumulators (more than the FMA latency times the pipes on
// every core measured), written in assembly so that the compiler cannot shorten them: the
// widest FMA the CPU has (vfmadd231ps on zmm with AVX-512, on ymm with AVX2), 2 FLOPs per lane,
// and vdpbf16ps on zmm (AVX-512 BF16), 4 FLOPs per lane (two products, two additions).

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#  define XATTN_BENCH_PEAK_LOOP(isa, zero, op, reg)                                              \
    __attribute__((target(isa))) inline void peak_loop_##reg(long n) {                           \
      const float one = 1.0f, tiny = 1e-30f;                                                     \
      __asm__ volatile(zero "vbroadcastss %[one], %%" #reg "12\n"                              \
                       "vbroadcastss %[tiny], %%" #reg "13\n"                                  \
                       "1:\n" op(0) op(1) op(2) op(3) op(4) op(5) op(6) op(7) op(8) op(9)      \
                           op(10) op(11) "dec %[n]\n"                                          \
                       "jnz 1b\n"                                                              \
                       : [n] "+r"(n)                                                            \
                       : [one] "m"(one), [tiny] "m"(tiny)                                       \
                       : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",       \
                         "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "cc"); \
    }
#  define XATTN_BENCH_ZERO                                            \
    "vxorps %%xmm0, %%xmm0, %%xmm0\n vxorps %%xmm1, %%xmm1, %%xmm1\n" \
    "vxorps %%xmm2, %%xmm2, %%xmm2\n vxorps %%xmm3, %%xmm3, %%xmm3\n" \
    "vxorps %%xmm4, %%xmm4, %%xmm4\n vxorps %%xmm5, %%xmm5, %%xmm5\n" \
    "vxorps %%xmm6, %%xmm6, %%xmm6\n vxorps %%xmm7, %%xmm7, %%xmm7\n" \
    "vxorps %%xmm8, %%xmm8, %%xmm8\n vxorps %%xmm9, %%xmm9, %%xmm9\n" \
    "vxorps %%xmm10, %%xmm10, %%xmm10\n vxorps %%xmm11, %%xmm11, %%xmm11\n"
#  define XATTN_BENCH_FMA_ZMM(r) "vfmadd231ps %%zmm12, %%zmm13, %%zmm" #  r "\n"
#  define XATTN_BENCH_FMA_YMM(r) "vfmadd231ps %%ymm12, %%ymm13, %%ymm" #  r "\n"
#  define XATTN_BENCH_DPBF16(r) "vdpbf16ps %%zmm12, %%zmm13, %%zmm" #  r "\n"
XATTN_BENCH_PEAK_LOOP("avx512f", XATTN_BENCH_ZERO, XATTN_BENCH_FMA_ZMM, zmm)
XATTN_BENCH_PEAK_LOOP("avx2,fma", XATTN_BENCH_ZERO, XATTN_BENCH_FMA_YMM, ymm)
__attribute__((target("avx512f,avx512bf16"))) inline void peak_loop_dpbf16(long n) {
  const float one = 1.0f, tiny = 1e-30f;
  __asm__ volatile(XATTN_BENCH_ZERO
                   "vbroadcastss %[one], %%zmm12\n"
                   "vbroadcastss %[tiny], %%zmm13\n"
                   "1:\n" XATTN_BENCH_DPBF16(0) XATTN_BENCH_DPBF16(1) XATTN_BENCH_DPBF16(2)
                       XATTN_BENCH_DPBF16(3) XATTN_BENCH_DPBF16(4) XATTN_BENCH_DPBF16(5)
                           XATTN_BENCH_DPBF16(6) XATTN_BENCH_DPBF16(7) XATTN_BENCH_DPBF16(8)
                               XATTN_BENCH_DPBF16(9) XATTN_BENCH_DPBF16(10)
                                   XATTN_BENCH_DPBF16(11) "dec %[n]\n"
                   "jnz 1b\n"
                   : [n] "+r"(n)
                   : [one] "m"(one), [tiny] "m"(tiny)
                   : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                     "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "cc");
}
#endif

/// GFLOP/s of one of the loops above (the best of 3 runs of about 50 ms), 0 where the CPU or
/// the build has no such loop.
inline double measure_peak(void (*loop)(long), double flops_per_iteration) {
  double best = 0;
  const long n = 10'000'000;
  for (int run = 0; run < 3; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    loop(n);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(n) * flops_per_iteration / s * 1e-9);
  }
  return best;
}

/// The core's float FMA peak and its vdpbf16ps peak (GFLOP/s, one thread), measured on the
/// first call; 0 where not measurable.
struct core_peaks {
  double fma = 0, dpbf16 = 0;
  const char* fma_loop = "none";
};
inline const core_peaks& peaks() {
  static const core_peaks p = [] {
    core_peaks r;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
      r.fma = measure_peak(&peak_loop_zmm, 12 * 16 * 2);
      r.fma_loop = "vfmadd231ps zmm";
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      r.fma = measure_peak(&peak_loop_ymm, 12 * 8 * 2);
      r.fma_loop = "vfmadd231ps ymm";
    }
    if (xattn::detail::level_available(xattn::detail::cpu_level::avx512bf16))
      r.dpbf16 = measure_peak(&peak_loop_dpbf16, 12 * 16 * 4);
#endif
    return r;
  }();
  return p;
}

/// Sets the counter peak_frac: the case's FLOP rate (over `seconds`, the timed loop's wall
/// time) over the core's peak times its threads (the vdpbf16ps peak for bf16 calls on the
/// bf16-product path, else the FMA peak).
inline void report_peak_fraction(benchmark::State& state, double flops_per_iteration,
                                 double seconds, int threads, bool bf16_products = false) {
  const core_peaks& p = peaks();
  const double peak = (bf16_products && p.dpbf16 > 0 ? p.dpbf16 : p.fma) * 1e9 * threads;
  if (peak > 0 && seconds > 0)
    state.counters["peak_frac"] = flops_per_iteration * double(state.iterations()) / seconds / peak;
}

// ---- the memory's read bandwidth, measured once per thread count --------------------------------

/// Sums n floats (n a multiple of 64) as 8 streams read side by side, each an eighth of x: a
/// core reads memory fastest with several streams in flight (one stream reads about half as
/// fast on some server cores), so this is the rate a kernel could reach.
inline float sum_floats(const float* x, std::size_t n) {
  const std::size_t per = n / 8;
  float a[8][8] = {};
  for (std::size_t i = 0; i + 8 <= per; i += 8)
    for (int s = 0; s < 8; ++s)
      for (int r = 0; r < 8; ++r) a[s][r] += x[std::size_t(s) * per + i + std::size_t(r)];
  float t = 0;
  for (auto& row : a)
    for (float v : row) t += v;
  return t;
}

/// GB/s that `threads` threads read from memory together: each sums its share of a 512 MiB
/// buffer (far past any L3) in 8 streams, the best of 3 passes; measured on the first call per
/// count.
inline double read_bandwidth_gbps(int threads) {
  static std::map<int, double> measured;
  static std::mutex lock;
  const std::lock_guard<std::mutex> hold(lock);
  if (const auto it = measured.find(threads); it != measured.end()) return it->second;
  const std::size_t n = std::size_t(128) << 20;  // floats: 512 MiB
  std::vector<float> buf(n, 1.0f);
  const std::size_t share = n / std::size_t(threads) / 64 * 64;
  double best = 0;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  for (int pass = 0; pass < 3; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> team;
    for (int t = 1; t < threads; ++t)
      team.emplace_back([&, t] {
        sink[std::size_t(t)] = sum_floats(buf.data() + std::size_t(t) * share, share);
      });
    sink[0] = sum_floats(buf.data(), share);
    for (auto& th : team) th.join();
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(share) * double(threads) * sizeof(float) / sec * 1e-9);
  }
  benchmark::DoNotOptimize(sink.data());
  return measured[threads] = best;
}

/// Sets the counters of a case that reads `bytes` of keys and values per iteration: kv_GBps,
/// their rate, and bw_frac, that rate over read_bandwidth_gbps(threads).
inline void report_bandwidth(benchmark::State& state, double bytes, double seconds, int threads) {
  if (seconds <= 0) return;
  const double gbps = bytes * double(state.iterations()) / seconds * 1e-9;
  state.counters["kv_GBps"] = gbps;
  state.counters["bw_frac"] = gbps / read_bandwidth_gbps(threads);
}

/// Wall-clock seconds since t0.
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Adds how the binary was built to the report's context (the console header and the JSON
/// "context" object), so saved results say what they measured.
inline void add_build_context() {
  benchmark::AddCustomContext("eigen_version", std::to_string(EIGEN_WORLD_VERSION) + "." +
                                                   std::to_string(EIGEN_MAJOR_VERSION) + "." +
                                                   std::to_string(EIGEN_MINOR_VERSION));
  benchmark::AddCustomContext("eigen_simd", Eigen::SimdInstructionSetsInUse());
  benchmark::AddCustomContext("eigen_threads", std::to_string(Eigen::nbThreads()));
  // The tiled kernel's instruction-set path (dispatch.hpp): the fastest this CPU runs, or the
  // one XATTN_CPU_PATH names.
  benchmark::AddCustomContext("xattn_cpu_path", std::string(xattn::cpu_path()));
  benchmark::AddCustomContext("xattn_cpu_path_fp16", xattn::cpu_path_for<Eigen::half>());
  benchmark::AddCustomContext("xattn_cpu_path_bf16", xattn::cpu_path_for<Eigen::bfloat16>());
  const core_peaks& p = peaks();
  benchmark::AddCustomContext("fma_peak_gflops_1_thread",
                              std::to_string(int(p.fma)) + " (" + p.fma_loop + ")");
  if (p.dpbf16 > 0)
    benchmark::AddCustomContext("dpbf16_peak_gflops_1_thread", std::to_string(int(p.dpbf16)));
  const int all = int(std::max(1u, std::thread::hardware_concurrency()));
  benchmark::AddCustomContext("read_gbps_1_thread", std::to_string(read_bandwidth_gbps(1)));
  benchmark::AddCustomContext("read_gbps_" + std::to_string(all) + "_threads",
                              std::to_string(read_bandwidth_gbps(all)));
#ifdef NDEBUG
  benchmark::AddCustomContext("xattn_asserts", "off");
#else
  benchmark::AddCustomContext("xattn_asserts", "on");
#endif
}

/// The body of every benchmark executable's main(): Google Benchmark's usual main plus the
/// build context above.
inline int run_benchmarks(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_build_context();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}

}  // namespace xattn_bench
