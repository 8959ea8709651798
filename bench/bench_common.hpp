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

#include <cstdint>
#include <random>
#include <string>

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
