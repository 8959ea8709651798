// SPDX-License-Identifier: MIT
// Decoder steps side by side with ggml's ggml_flash_attn_ext on the CPU, in one binary: the same
// shapes as bench_attention's BM_DecodeCache (Lq = 1, float queries; arguments Lk, H, Hkv, D,
// threads), the same fixed-seed keys and values uniform in [-1, 1], and the same counters
// (kv_GBps and bw_frac against the measured read bandwidth).
//
//   BM_Ggml_q8_0  ggml, keys and values in ggml's q8_0 (the query is quantized to q8_0 for the
//                 scores, as ggml does);  BM_Xattn_q8  xattn's q8 cache, float queries
//   BM_Ggml_f16   ggml, keys and values in fp16;  BM_Xattn_bf16  xattn's bf16 cache (2 bytes a
//                 value, like fp16)
//
// Built only where CMake finds an installed ggml (find_package(ggml)); see docs/performance.md.
// ggml runs on a thread pool of the benchmark's thread count, made once per case.

#include "bench_common.hpp"

#include "xattn/attention_tiled.hpp"
#include "xattn/quantized.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <benchmark/benchmark.h>
#include <ggml-cpu.h>
#include <ggml.h>
#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

namespace {

using xattn::index_t;

struct decode_shape {
  index_t lk, heads, kv_heads, dim;
  int threads;
};

decode_shape shape_of(const benchmark::State& state) {
  return {state.range(0), state.range(1), state.range(2), state.range(3), int(state.range(4))};
}

// Keys or values [Hkv, Lk, D] (ggml's [D, Lk, Hkv]), uniform in [-1, 1] from a fixed seed.
std::vector<float> random_values(index_t n, unsigned seed) {
  std::vector<float> x(std::size_t(n), 0.0f);
  std::mt19937 rng(seed);
  xattn_bench::fill_uniform(x.data(), n, rng);
  return x;
}

template <ggml_type Type>
void BM_Ggml(benchmark::State& state) {
  const decode_shape s = shape_of(state);
  const index_t rows = s.kv_heads * s.lk;
  const std::size_t cache_bytes = 2 * std::size_t(rows) * ggml_row_size(Type, s.dim);
  ggml_init_params params{};
  // The cache, the query and the output, and the graph.
  params.mem_size = cache_bytes + (std::size_t(16) << 20);
  params.mem_buffer = nullptr;
  params.no_alloc = false;
  ggml_context* ctx = ggml_init(params);
  if (!ctx) {
    state.SkipWithError("ggml_init failed");
    return;
  }
  ggml_tensor* q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, s.dim, 1, s.heads, 1);
  ggml_tensor* k = ggml_new_tensor_4d(ctx, Type, s.dim, s.lk, s.kv_heads, 1);
  ggml_tensor* v = ggml_new_tensor_4d(ctx, Type, s.dim, s.lk, s.kv_heads, 1);
  const auto qf = random_values(s.heads * s.dim, 1);
  std::copy(qf.begin(), qf.end(), static_cast<float*>(q->data));
  const auto fill = [&](ggml_tensor* t, unsigned seed) {
    const auto x = random_values(rows * s.dim, seed);
    if constexpr (Type == GGML_TYPE_F16)
      ggml_fp32_to_fp16_row(x.data(), static_cast<ggml_fp16_t*>(t->data), rows * s.dim);
    else
      ggml_quantize_chunk(Type, x.data(), t->data, 0, rows, s.dim, nullptr);
  };
  fill(k, 2);
  fill(v, 3);
  ggml_tensor* out =
      ggml_flash_attn_ext(ctx, q, k, v, nullptr, 1.0f / std::sqrt(float(s.dim)), 0.0f, 0.0f);
  ggml_cgraph* graph = ggml_new_graph(ctx);
  ggml_build_forward_expand(graph, out);
  // A thread pool of the benchmark's size, made once (as an application keeps one), and the
  // work buffer its plan asks for.
  ggml_threadpool_params pool_params = ggml_threadpool_params_default(s.threads);
  ggml_threadpool* pool = ggml_threadpool_new(&pool_params);
  ggml_cplan plan = ggml_graph_plan(graph, s.threads, pool);
  std::vector<std::uint8_t> work(plan.work_size);
  plan.work_data = work.data();
  if (ggml_graph_compute(graph, &plan) != GGML_STATUS_SUCCESS) {  // warm-up
    state.SkipWithError("ggml_graph_compute failed");
    ggml_threadpool_free(pool);
    ggml_free(ctx);
    return;
  }
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    ggml_graph_compute(graph, &plan);
    benchmark::DoNotOptimize(out->data);
    benchmark::ClobberMemory();
  }
  xattn_bench::report_bandwidth(state, double(cache_bytes), xattn_bench::seconds_since(t0),
                                s.threads);
  state.counters["kv_MiB"] = double(cache_bytes) / double(1 << 20);
  state.counters["num_threads"] = s.threads;
  ggml_threadpool_free(pool);
  ggml_free(ctx);
}

template <class KV>
void BM_Xattn(benchmark::State& state) {
  xattn_bench::label_build(state);
  const decode_shape s = shape_of(state);
  const index_t rows = s.kv_heads * s.lk;
  std::vector<float> q = random_values(s.heads * s.dim, 1), out(q.size());
  const auto kf = random_values(rows * s.dim, 2), vf = random_values(rows * s.dim, 3);
  const xattn::tensor_view<const float, 4> kfv =
      xattn::make_view(kf.data(), {1, s.kv_heads, s.lk, s.dim});
  const xattn::tensor_view<const float, 4> vfv =
      xattn::make_view(vf.data(), {1, s.kv_heads, s.lk, s.dim});
  xattn::tile_options tiles;
  tiles.num_threads = s.threads;
  const auto qv = xattn::make_view(static_cast<const float*>(q.data()), {1, s.heads, 1, s.dim});
  const auto ov = xattn::make_view(out.data(), {1, s.heads, 1, s.dim});
  const auto measure = [&](const auto& k, const auto& v, double bytes) {
    xattn::tiled_attention<float>(qv, k, v, ov, {}, tiles);  // warm-up
    const auto t0 = std::chrono::steady_clock::now();
    for (auto _ : state) {
      xattn::tiled_attention<float>(qv, k, v, ov, {}, tiles);
      benchmark::DoNotOptimize(out.data());
      benchmark::ClobberMemory();
    }
    xattn_bench::report_bandwidth(state, bytes, xattn_bench::seconds_since(t0), s.threads);
    state.counters["kv_MiB"] = bytes / double(1 << 20);
  };
  if constexpr (xattn::is_quant_block_v<KV>) {
    const index_t nb = xattn::quant_blocks_per_row(s.dim);
    std::vector<KV> kq(std::size_t(rows * nb)), vq(kq.size());
    xattn::quantize(kfv, xattn::make_view(kq.data(), {1, s.kv_heads, s.lk, nb}));
    xattn::quantize(vfv, xattn::make_view(vq.data(), {1, s.kv_heads, s.lk, nb}));
    measure(xattn::make_view(static_cast<const KV*>(kq.data()), {1, s.kv_heads, s.lk, nb}),
            xattn::make_view(static_cast<const KV*>(vq.data()), {1, s.kv_heads, s.lk, nb}),
            2.0 * double(rows) * double(xattn::quantized_bytes<KV>(1, s.dim)));
  } else {
    std::vector<KV> kh(kf.begin(), kf.end()), vh(vf.begin(), vf.end());
    measure(xattn::make_view(static_cast<const KV*>(kh.data()), {1, s.kv_heads, s.lk, s.dim}),
            xattn::make_view(static_cast<const KV*>(vh.data()), {1, s.kv_heads, s.lk, s.dim}),
            2.0 * double(rows * s.dim) * sizeof(KV));
  }
  state.counters["num_threads"] = s.threads;
}

// bench_attention's decode_cache_cases, each shape registered for the four caches in turn, so
// that the cells compared are measured next to each other.
void register_cases() {
  std::vector<std::vector<std::int64_t>> shapes;
  for (std::int64_t threads : {1, 2})
    for (std::int64_t d : {64, 128}) {
      for (std::int64_t lk : {1500, 8192, 32768}) shapes.push_back({lk, 8, 8, d, threads});
      if (d == 64) shapes.push_back({131072, 8, 8, d, threads});
      shapes.push_back({32768, 32, 8, d, threads});
    }
  for (const auto& args : shapes) {
    const auto add = [&](const char* name, void (*fn)(benchmark::State&)) {
      benchmark::RegisterBenchmark(name, fn)
          ->ArgNames({"Lk", "H", "Hkv", "D", "threads"})
          ->Args(args)
          ->Unit(benchmark::kMicrosecond)
          ->UseRealTime();
    };
    add("BM_Xattn_q8", BM_Xattn<xattn::q8_block>);
    add("BM_Ggml_q8_0", BM_Ggml<GGML_TYPE_Q8_0>);
    add("BM_Xattn_bf16", BM_Xattn<Eigen::bfloat16>);
    add("BM_Ggml_f16", BM_Ggml<GGML_TYPE_F16>);
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_cases();
  return xattn_bench::run_benchmarks(argc, argv);
}
