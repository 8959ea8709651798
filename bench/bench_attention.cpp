// SPDX-License-Identifier: MIT
// Attention benchmarks: tiled_attention (in float, bf16 and fp16: BM_TiledAttention_bf16, _fp16),
// one decoder step against a float, bf16 or fp16 context (BM_DecoderStep[_bf16|_fp16]), decoder
// steps over float, bf16, q8 and q4 caches as bytes per second against the memory's measured
// read bandwidth (BM_DecodeCache_*) beside the Eigen loop a user would write (BM_EigenDecodeLoop),
// naive_attention, the backward passes, the two Eigen GEMMs they are built on with nothing else,
// and one large Eigen SGEMM as the machine's ceiling, each at 1 and 2 threads. Run a Release
// build with -march=native (the bench preset), e.g.
//   bench_attention --benchmark_filter='/Lq:4096/Lk:4096/D:64/'
// Every case is named <kernel>/Lq:<Lq>/Lk:<Lk>/D:<Dk = Dv>/threads:<n> (the SGEMM n/threads,
// a decoder step Lk:<Lk>/threads:<n>), and reports FLOPS (a rate, counted as for float whatever
// the element type) and a num_threads counter. The helpers are in bench_common.hpp.

#include "bench_common.hpp"

#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/quantized.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <chrono>
#include <cmath>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using xattn::index_t;
using xattn_bench::attention_inputs;

// forward FLOPs = 2·B·H·Lq·Lk·Dk (Q Kᵀ) + 2·B·H·Lq·Lk·Dv (P V); softmax not counted
// (xattn::attention_flops). Reported per iteration as a rate, so "FLOPS" prints e.g. 41.7G/s.
void report_flops(benchmark::State& state, double flops_per_iteration) {
  state.counters["FLOPS"] =
      benchmark::Counter(flops_per_iteration, benchmark::Counter::kIsIterationInvariantRate);
}

// One (batch, head) slice, B = H = 1, with Lq, Lk and Dk = Dv = D from the arguments.
xattn::attention_shape single_head(const benchmark::State& state) {
  xattn::attention_shape s;
  s.q_len = state.range(0);
  s.kv_len = state.range(1);
  s.head_dim = state.range(2);
  s.value_dim = state.range(2);
  return s;
}

// The thread count of a case (its last argument), applied to Eigen's own GEMM threads too.
int use_threads(benchmark::State& state, std::size_t arg) {
  const int threads = int(state.range(arg));
  Eigen::setNbThreads(threads);
  state.counters["num_threads"] = threads;
  return threads;
}

// The memory-efficient kernel on elements of type T (float, or a half type: half.hpp). Its
// scratch is reused from call to call, so only the first (untimed warm-up) call allocates.
// FLOPs are counted as for float.
template <class T>
void BM_TiledAttention(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  xattn::tile_options tiles;
  tiles.num_threads = use_threads(state, 3);
  attention_inputs<T> io(s);
  xattn::tiled_attention<T>(io.q(), io.k(), io.v(), io.out(), {}, tiles);  // scratch, peaks
  (void)xattn_bench::peaks();
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    xattn::tiled_attention<T>(io.q(), io.k(), io.v(), io.out(), {}, tiles);
    benchmark::DoNotOptimize(io.out().data());
    benchmark::ClobberMemory();
  }
  const double seconds = xattn_bench::seconds_since(t0);
  report_flops(state, xattn::attention_flops(s));
  // the bf16-product path's lanes path runs on vdpbf16ps; its row path (Lq < 16) widens
  const bool products = std::is_same_v<T, Eigen::bfloat16> && s.q_len >= 16 &&
                        xattn::cpu_path_for<T>().find("+dpbf16") != std::string::npos;
  xattn_bench::report_peak_fraction(state, xattn::attention_flops(s), seconds, *tiles.num_threads,
                                    products);
  state.counters["scratch_KiB"] =
      double(xattn::tiled_attention_scratch_bytes<T>(s, tiles)) / 1024.0;
}

// One decoder step over a cached context: Lq = 1, H = 8 heads, D = 64, Lk keys (arguments Lk,
// threads). KV is the cache's element type; the query and output are float (the mixed call for
// a half KV). At Lk = 8192 and up K and V (2 to 8 MiB per head group in float) leave the L2
// cache, and the step is bound by the bytes it reads: kv_bytes counts them per call.
template <class KV>
void BM_DecoderStep(benchmark::State& state) {
  xattn_bench::label_build(state);
  xattn::attention_shape s;
  s.num_heads = 8;
  s.q_len = 1;
  s.kv_len = state.range(0);
  s.head_dim = s.value_dim = 64;
  xattn::tile_options tiles;
  tiles.num_threads = use_threads(state, 1);
  attention_inputs<float> queries(s);  // q and out
  attention_inputs<KV> cache(s);       // k and v
  for (auto _ : state) {
    xattn::tiled_attention<float>(queries.q(), cache.k(), cache.v(), queries.out(), {}, tiles);
    benchmark::DoNotOptimize(queries.out().data());
    benchmark::ClobberMemory();
  }
  report_flops(state, xattn::attention_flops(s));
  state.counters["kv_bytes"] =
      double(2 * s.num_heads * s.kv_len * s.head_dim * index_t(sizeof(KV)));
}

// A decoder's context cache in quantized blocks B (quantized.hpp): fixed-seed keys and values
// uniform in [-1, 1], quantized once.
template <class B>
struct quantized_cache {
  std::vector<B> k, v;
  xattn::attention_shape s;
  explicit quantized_cache(const xattn::attention_shape& shape) : s(shape) {
    const attention_inputs<float> f(s);
    const index_t nk = xattn::quant_blocks_per_row(s.head_dim);
    const index_t nv = xattn::quant_blocks_per_row(s.value_dim);
    k.resize(std::size_t(s.batch * s.kv_heads() * s.kv_len * nk));
    v.resize(std::size_t(s.batch * s.kv_heads() * s.kv_len * nv));
    xattn::quantize(f.k(), keys_out());
    xattn::quantize(f.v(), values_out());
  }
  xattn::tensor_view<const B, 4> keys() const {
    return xattn::make_view(
        k.data(), {s.batch, s.kv_heads(), s.kv_len, xattn::quant_blocks_per_row(s.head_dim)});
  }
  xattn::tensor_view<const B, 4> values() const {
    return xattn::make_view(
        v.data(), {s.batch, s.kv_heads(), s.kv_len, xattn::quant_blocks_per_row(s.value_dim)});
  }

 private:
  xattn::tensor_view<B, 4> keys_out() {
    return xattn::make_view(
        k.data(), {s.batch, s.kv_heads(), s.kv_len, xattn::quant_blocks_per_row(s.head_dim)});
  }
  xattn::tensor_view<B, 4> values_out() {
    return xattn::make_view(
        v.data(), {s.batch, s.kv_heads(), s.kv_len, xattn::quant_blocks_per_row(s.value_dim)});
  }
};

// One decoder step, Lq = 1, float queries, over a cache of element (or block) type KV: float,
// bf16, q8 or q4 (arguments Lk, H, Hkv, D, threads). It reads every key and value once, so its
// speed is the cache's bytes per second (kv_GBps), reported also as a fraction of the memory's
// measured read bandwidth at the same thread count (bw_frac; a cache that fits the L2 or L3
// cache can exceed 1).
template <class KV>
void BM_DecodeCache(benchmark::State& state) {
  xattn_bench::label_build(state);
  xattn::attention_shape s;
  s.kv_len = state.range(0);
  s.num_heads = state.range(1);
  s.num_kv_heads = state.range(2);
  s.q_len = 1;
  s.head_dim = s.value_dim = state.range(3);
  xattn::tile_options tiles;
  tiles.num_threads = use_threads(state, 4);
  attention_inputs<float> queries(s);  // q and out
  double bytes = 0;
  const auto measure = [&](const auto& k, const auto& v) {
    xattn::tiled_attention<float>(queries.q(), k, v, queries.out(), {}, tiles);  // warm-up
    const auto t0 = std::chrono::steady_clock::now();
    for (auto _ : state) {
      xattn::tiled_attention<float>(queries.q(), k, v, queries.out(), {}, tiles);
      benchmark::DoNotOptimize(queries.out().data());
      benchmark::ClobberMemory();
    }
    xattn_bench::report_bandwidth(state, bytes, xattn_bench::seconds_since(t0), *tiles.num_threads);
  };
  const double rows = double(s.kv_heads() * s.kv_len);
  if constexpr (xattn::is_quant_block_v<KV>) {
    const quantized_cache<KV> cache(s);
    bytes = 2 * rows * double(xattn::quantized_bytes<KV>(1, s.head_dim));
    measure(cache.keys(), cache.values());
  } else {
    const attention_inputs<KV> cache(s);
    bytes = 2 * rows * double(s.head_dim) * sizeof(KV);
    measure(cache.k(), cache.v());
  }
  report_flops(state, xattn::attention_flops(s));
  state.counters["kv_MiB"] = bytes / double(1 << 20);
}

// Quantizing a context's keys: Lk rows of D float values into blocks B (arguments Lk, D): the
// float bytes read per second, what encoding a long context costs once.
template <class B>
void BM_Quantize(benchmark::State& state) {
  xattn_bench::label_build(state);
  xattn::attention_shape s;
  s.kv_len = state.range(0);
  s.head_dim = s.value_dim = state.range(1);
  const attention_inputs<float> f(s);
  std::vector<B> blocks(std::size_t(s.kv_len * xattn::quant_blocks_per_row(s.head_dim)));
  const auto out =
      xattn::make_view(blocks.data(), {1, 1, s.kv_len, xattn::quant_blocks_per_row(s.head_dim)});
  for (auto _ : state) {
    xattn::quantize(f.k(), out);
    benchmark::DoNotOptimize(blocks.data());
    benchmark::ClobberMemory();
  }
  const double bytes = double(s.kv_len * s.head_dim) * sizeof(float);
  state.counters["float_GBps"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ns_per_value"] = benchmark::Counter(
      double(s.kv_len * s.head_dim) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// What a user writes with Eigen for one head's decoder step: the scores as a GEMV, a softmax,
// and a second GEMV (arguments Lk, D; one thread). The row path must beat it.
void BM_EigenDecodeLoop(benchmark::State& state) {
  xattn_bench::label_build(state);
  const index_t lk = state.range(0), d = state.range(1);
  Eigen::setNbThreads(1);
  const auto k = xattn_bench::random_matrix<float>(lk, d, 1);
  const auto v = xattn_bench::random_matrix<float>(lk, d, 2);
  const Eigen::RowVectorXf q = xattn_bench::random_matrix<float>(1, d, 3);
  Eigen::RowVectorXf s(lk), out(d);
  const float scale = 1.0f / std::sqrt(float(d));
  for (auto _ : state) {
    s.noalias() = (q * scale) * k.transpose();
    const float m = s.maxCoeff();
    s = (s.array() - m).exp();
    out.noalias() = (s / s.sum()) * v;
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  xattn::attention_shape sh;  // B = H = Lq = 1
  sh.batch = sh.num_heads = sh.q_len = 1;
  sh.kv_len = lk;
  sh.head_dim = sh.value_dim = d;
  report_flops(state, xattn::attention_flops(sh));
}

// The reference kernel as users call it, so its per-call [Lq, Lk] score allocation is timed too.
// With 2 threads Eigen runs its GEMMs on both; the softmax stays on one.
void BM_NaiveAttention(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  use_threads(state, 3);
  attention_inputs<float> io(s);
  for (auto _ : state) {
    xattn::naive_attention<float>(io.q(), io.k(), io.v(), io.out());
    benchmark::DoNotOptimize(io.out().data());
    benchmark::ClobberMemory();
  }
  report_flops(state, xattn::attention_flops(s));
  state.counters["scratch_KiB"] = double(xattn::naive_attention_scratch_bytes<float>(s)) / 1024.0;
}

// What a backward call reads besides q, k and v: the forward's output and log-sum-exp (computed
// once, untimed) and an upstream gradient dout; and the gradients it writes.
struct backward_io {
  explicit backward_io(const xattn::attention_shape& s)
      : io(s),
        dout(std::size_t(s.batch * s.num_heads * s.q_len * s.value_dim)),
        lse(std::size_t(s.batch * s.num_heads * s.q_len)),
        dq(std::size_t(s.batch * s.num_heads * s.q_len * s.head_dim)),
        dk(std::size_t(s.batch * s.kv_heads() * s.kv_len * s.head_dim)),
        dv(std::size_t(s.batch * s.kv_heads() * s.kv_len * s.value_dim)) {
    std::mt19937 rng(7);
    xattn_bench::fill_uniform(dout.data(), index_t(dout.size()), rng);
    opts.lse_out = xattn::make_view(lse.data(), {s.batch, s.num_heads, s.q_len});
    xattn::tiled_attention<float>(io.q(), io.k(), io.v(), io.out(), opts);
  }
  xattn::tensor_view<const float, 4> out() { return io.out(); }
  xattn::tensor_view<const float, 4> d_out() const {
    const auto& s = io.shape();
    return xattn::make_view(dout.data(), {s.batch, s.num_heads, s.q_len, s.value_dim});
  }
  xattn::attention_grads<float> grads() {
    const auto& s = io.shape();
    return {xattn::make_view(dq.data(), {s.batch, s.num_heads, s.q_len, s.head_dim}),
            xattn::make_view(dk.data(), {s.batch, s.kv_heads(), s.kv_len, s.head_dim}),
            xattn::make_view(dv.data(), {s.batch, s.kv_heads(), s.kv_len, s.value_dim}),
            std::nullopt};
  }

  attention_inputs<float> io;
  std::vector<float> dout, lse, dq, dk, dv;
  xattn::attention_options<float> opts;
};

// The backward passes. FLOPs are counted as FlashAttention counts them: 2.5 x the forward's
// (five GEMM-shaped products instead of two; xattn::attention_backward_flops), whatever a kernel
// recomputes (the tiled one recomputes P and dP in both of its passes).
void BM_TiledAttentionBackward(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  xattn::tile_options tiles;
  tiles.num_threads = use_threads(state, 3);
  backward_io b(s);
  for (auto _ : state) {
    xattn::tiled_attention_backward<float>(b.io.q(), b.io.k(), b.io.v(), b.out(), b.d_out(),
                                           b.grads(), b.opts, tiles);
    benchmark::DoNotOptimize(b.dq.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, xattn::attention_backward_flops(s));
  state.counters["scratch_KiB"] =
      double(xattn::tiled_attention_backward_scratch_bytes<float>(s, tiles)) / 1024.0;
}

void BM_NaiveAttentionBackward(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  use_threads(state, 3);
  backward_io b(s);
  for (auto _ : state) {
    xattn::naive_attention_backward<float>(b.io.q(), b.io.k(), b.io.v(), b.out(), b.d_out(),
                                           b.grads(), b.opts);
    benchmark::DoNotOptimize(b.dq.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, xattn::attention_backward_flops(s));
  state.counters["scratch_KiB"] =
      double(xattn::naive_attention_backward_scratch_bytes<float>(s)) / 1024.0;
}

// Forward and backward of one long head, as training runs them: Lq = Lk = 65536. Run it alone
// under /usr/bin/time -v: the peak resident memory should be q, k, v, out, dout, dq, dk and dv
// (8 x 16 MiB), the lse (256 KiB) and the scratch; P alone would be 16 GiB.
void BM_TiledForwardBackward(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  xattn::tile_options tiles;
  tiles.num_threads = use_threads(state, 3);
  backward_io b(s);
  for (auto _ : state) {
    xattn::tiled_attention<float>(b.io.q(), b.io.k(), b.io.v(), b.io.out(), b.opts, tiles);
    xattn::tiled_attention_backward<float>(b.io.q(), b.io.k(), b.io.v(), b.out(), b.d_out(),
                                           b.grads(), b.opts, tiles);
    benchmark::DoNotOptimize(b.dq.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, 3.5 * xattn::attention_flops(s));
}

// The Eigen-only baseline: S = Q Kᵀ, then O = S V, into an S allocated once, with no scale and
// no softmax. The gap to BM_NaiveAttention is what the softmax and the allocation cost.
void BM_TwoGemms(benchmark::State& state) {
  xattn_bench::label_build(state);
  const xattn::attention_shape s = single_head(state);
  use_threads(state, 3);
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

// One square n x n x n SGEMM (2·n³ FLOPs): the fastest this machine multiplies float matrices
// through Eigen, the ceiling the attention rates are read against.
void BM_EigenSgemm(benchmark::State& state) {
  xattn_bench::label_build(state);
  const index_t n = state.range(0);
  use_threads(state, 1);
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

// Square sweeps (Lq = Lk) at D = 64, and the cross-attention shapes that matter in practice:
// Stable Diffusion's UNet (4096 latents, 77 prompt tokens, D = 40 and 160), a Perceiver's
// latents over a long input, a short query block, and one decoder step over a Whisper-sized
// audio context.
void attention_cases(benchmark::internal::Benchmark* b) {
  b->ArgNames({"Lq", "Lk", "D", "threads"});
  for (int threads : {1, 2}) {
    for (index_t n = 128; n <= 8192; n *= 2) b->Args({n, n, 64, threads});
    b->Args({4096, 77, 40, threads});
    b->Args({4096, 77, 160, threads});
    b->Args({256, 16384, 64, threads});
    b->Args({64, 4096, 64, threads});
    b->Args({1, 1500, 64, threads});
  }
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

// Decoder steps over a Whisper-sized context (1500) and longer ones that leave the L2 cache.
void decoder_cases(benchmark::internal::Benchmark* b) {
  b->ArgNames({"Lk", "threads"});
  for (int threads : {1, 2})
    for (index_t lk : {1500, 8192, 32768}) b->Args({lk, threads});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

// Decoder steps over caches that fit the L2 (Lk 1500) or the L3 (8192), and that fit neither
// (32768, 131072: 64 and 256 MiB of float keys and values at D 64), 8 heads of 64 and 128, and
// grouped-query attention, 32 query heads over 8 cached.
void decode_cache_cases(benchmark::internal::Benchmark* b) {
  b->ArgNames({"Lk", "H", "Hkv", "D", "threads"});
  for (int threads : {1, 2})
    for (index_t d : {64, 128}) {
      for (index_t lk : {1500, 8192, 32768}) b->Args({lk, 8, 8, d, threads});
      if (d == 64) b->Args({131072, 8, 8, d, threads});
      b->Args({32768, 32, 8, d, threads});
    }
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_TiledAttention<float>)->Name("BM_TiledAttention")->Apply(attention_cases);
BENCHMARK(BM_DecodeCache<float>)->Name("BM_DecodeCache_f32")->Apply(decode_cache_cases);
BENCHMARK(BM_DecodeCache<Eigen::bfloat16>)->Name("BM_DecodeCache_bf16")->Apply(decode_cache_cases);
BENCHMARK(BM_DecodeCache<xattn::q8_block>)->Name("BM_DecodeCache_q8")->Apply(decode_cache_cases);
BENCHMARK(BM_DecodeCache<xattn::q4_block>)->Name("BM_DecodeCache_q4")->Apply(decode_cache_cases);
BENCHMARK(BM_Quantize<xattn::q8_block>)->Name("BM_Quantize_q8")->Args({32768, 64});
BENCHMARK(BM_Quantize<xattn::q4_block>)->Name("BM_Quantize_q4")->Args({32768, 64});
BENCHMARK(BM_EigenDecodeLoop)
    ->ArgNames({"Lk", "D"})
    ->Args({1500, 64})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_TiledAttention<Eigen::bfloat16>)
    ->Name("BM_TiledAttention_bf16")
    ->Apply(attention_cases);
BENCHMARK(BM_TiledAttention<Eigen::half>)->Name("BM_TiledAttention_fp16")->Apply(attention_cases);
BENCHMARK(BM_DecoderStep<float>)->Name("BM_DecoderStep")->Apply(decoder_cases);
BENCHMARK(BM_DecoderStep<Eigen::bfloat16>)->Name("BM_DecoderStep_bf16")->Apply(decoder_cases);
BENCHMARK(BM_DecoderStep<Eigen::half>)->Name("BM_DecoderStep_fp16")->Apply(decoder_cases);
// One long context, Lq = Lk = 65536 (1.1 TFLOP, seconds per call): the tiled kernel's memory
// stays at its inputs and output plus scratch, where the naive kernel would need a 16 GiB
// score matrix. Run alone under /usr/bin/time -v to read the peak resident memory:
//   bench_attention --benchmark_filter=Lq:65536
BENCHMARK(BM_TiledAttention<float>)
    ->Name("BM_TiledAttentionLong")
    ->ArgNames({"Lq", "Lk", "D", "threads"})
    ->Args({65536, 65536, 64, 2})
    ->Iterations(1)
    ->Unit(benchmark::kSecond)
    ->UseRealTime();
BENCHMARK(BM_NaiveAttention)->Apply(attention_cases);
BENCHMARK(BM_TiledAttentionBackward)->Apply(attention_cases);
BENCHMARK(BM_NaiveAttentionBackward)->Apply(attention_cases);
//   bench_attention --benchmark_filter=BM_TiledForwardBackwardLong
BENCHMARK(BM_TiledForwardBackward)
    ->Name("BM_TiledForwardBackwardLong")
    ->ArgNames({"Lq", "Lk", "D", "threads"})
    ->Args({65536, 65536, 64, 2})
    ->Iterations(1)
    ->Unit(benchmark::kSecond)
    ->UseRealTime();
BENCHMARK(BM_TwoGemms)->Apply(attention_cases);
BENCHMARK(BM_EigenSgemm)
    ->ArgNames({"n", "threads"})
    ->Args({2048, 1})
    ->Args({2048, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

int main(int argc, char** argv) { return xattn_bench::run_benchmarks(argc, argv); }
