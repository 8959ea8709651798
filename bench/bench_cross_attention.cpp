// SPDX-License-Identifier: MIT
// multi_head_cross_attention at three shapes models use, and where the time goes:
//   sd_unet      Stable Diffusion UNet cross-attention: B = 2, Lq = 4096 latents, Lk = 77 prompt
//                tokens, Dm = 320, Dc = 768, 8 heads (Dk = 40)
//   whisper_step Whisper-like decoder step: B = 1, Lq = 1, Lk = 1500 audio frames, Dm = Dc = 384,
//                6 heads (Dk = 64)
//   perceiver    Perceiver-like: B = 1, 256 latents, Lk = 16384 inputs, Dm = 512, Dc = 256, 8 heads
// BM_Forward is the whole layer (projecting the context every call); BM_Projections and
// BM_Kernel are its two parts alone, so their times give the share of each; BM_CachedStep runs
// against a context_cache (what a decoder does after its first step); both also run a module in
// bf16 and fp16 (weights, activations and cache in the half type); BM_ForwardBackward is a
// training step, training_forward then training_backward (its time over BM_Forward's is the
// cost of training relative to inference). Run a Release build:
//   bench_cross_attention --benchmark_min_time=0.2
#include "bench_common.hpp"
#include "bench_layers.hpp"

#include "xattn/attention_tiled.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/cross_attention_backward.hpp"
#include "xattn/half.hpp"
#include "xattn/projection.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <benchmark/benchmark.h>
#include <Eigen/Core>

#include <string>
#include <vector>

namespace {

using xattn::index_t;

using xattn_bench::layer_shape;
using xattn_bench::shapes;

// The operands of one layer call: weights, query [B, Lq, Dm], context [B, Lk, Dc], out, all
// in T (float, or a half type for the half module).
template <class T = float>
struct layer_inputs {
  explicit layer_inputs(const layer_shape& s)
      : shape(s),
        mha(s.config(), xattn::random_weights<T>(s.config(), 1)),
        query(xattn_bench::random_matrix<T>(s.batch * s.q_len, s.model_dim, 2)),
        context(xattn_bench::random_matrix<T>(s.batch * s.kv_len, s.context_dim, 3)),
        out(xattn::row_matrix<T>::Zero(s.batch * s.q_len, s.model_dim)) {}

  xattn::tensor_view<const T, 3> q() const {
    return xattn::make_view(query.data(), {shape.batch, shape.q_len, shape.model_dim});
  }
  xattn::tensor_view<const T, 3> ctx() const {
    return xattn::make_view(context.data(), {shape.batch, shape.kv_len, shape.context_dim});
  }
  xattn::tensor_view<T, 3> o() {
    return xattn::make_view(out.data(), {shape.batch, shape.q_len, shape.model_dim});
  }

  layer_shape shape;
  xattn::multi_head_cross_attention<T> mha;
  xattn::row_matrix<T> query, context, out;
};

// The shape's name, the element type and the projections' GEMM engine ("eigen", or "blas" in
// the bench_cross_attention_blas build).
template <class T = float>
void label(benchmark::State& state, const layer_shape& s) {
  const std::string text =
      std::string(s.name) + " " + xattn::element_name<T>() + " gemm=" + xattn::gemm_engine();
#ifdef NDEBUG
  state.SetLabel(text);
#else
  state.SetLabel(text + " asserts-on");
#endif
}

void report(benchmark::State& state, double flops) {
  state.counters["FLOPS"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

// The whole layer: K/V projections of the context, Q projection, attention, output projection.
// T: the module's element type; the half modules store weights, activations and the projected
// context in T and compute in float (FLOPs counted as for float).
template <class T>
void BM_Forward(benchmark::State& state) {
  const layer_shape& s = shapes[state.range(0)];
  label<T>(state, s);
  layer_inputs<T> io(s);
  for (auto _ : state) {
    io.mha.forward(io.q(), io.ctx(), io.o());
    benchmark::DoNotOptimize(io.out.data());
    benchmark::ClobberMemory();
  }
  report(state, s.projection_flops() + xattn::attention_flops(s.attention()));
  state.counters["proj_flop_share"] =
      s.projection_flops() / (s.projection_flops() + xattn::attention_flops(s.attention()));
}

// The four projections alone, as the module runs them.
void BM_Projections(benchmark::State& state) {
  const layer_shape& s = shapes[state.range(0)];
  label(state, s);
  layer_inputs<float> io(s);
  const auto& w = io.mha.weights();
  const index_t width = s.config().num_heads * s.config().head_dim;
  xattn::row_matrix<float> q(s.batch * s.q_len, width), k(s.batch * s.kv_len, width),
      v(s.batch * s.kv_len, width), scratch;
  auto view = [&](xattn::row_matrix<float>& m, index_t len) {
    return xattn::make_view(m.data(), {s.batch, len, width});
  };
  for (auto _ : state) {
    w.q_proj.forward(io.q(), view(q, s.q_len), scratch);
    w.k_proj.forward(io.ctx(), view(k, s.kv_len), scratch);
    w.v_proj.forward(io.ctx(), view(v, s.kv_len), scratch);
    w.out_proj.forward(xattn::tensor_view<const float, 3>(view(q, s.q_len)), io.o(), scratch);
    benchmark::DoNotOptimize(io.out.data());
    benchmark::ClobberMemory();
  }
  report(state, s.projection_flops());
}

// The attention kernel alone, reading heads in place from [B, L, H·Dk] buffers as the module does.
void BM_Kernel(benchmark::State& state) {
  const layer_shape& s = shapes[state.range(0)];
  label(state, s);
  const auto c = s.config();
  const index_t width = c.num_heads * c.head_dim;
  const auto q = xattn_bench::random_matrix<float>(s.batch * s.q_len, width, 4);
  const auto k = xattn_bench::random_matrix<float>(s.batch * s.kv_len, width, 5);
  const auto v = xattn_bench::random_matrix<float>(s.batch * s.kv_len, width, 6);
  xattn::row_matrix<float> o(s.batch * s.q_len, width);
  const auto heads = [&](auto& m, index_t len) {
    return xattn::split_heads(xattn::make_view(m.data(), {s.batch, len, width}), c.num_heads);
  };
  for (auto _ : state) {
    xattn::tiled_attention<float>(heads(q, s.q_len), heads(k, s.kv_len), heads(v, s.kv_len),
                                  heads(o, s.q_len));
    benchmark::DoNotOptimize(o.data());
    benchmark::ClobberMemory();
  }
  report(state, xattn::attention_flops(s.attention()));
}

// A step against a context projected once: Q projection, attention, output projection.
template <class T>
void BM_CachedStep(benchmark::State& state) {
  const layer_shape& s = shapes[state.range(0)];
  label<T>(state, s);
  layer_inputs<T> io(s);
  const auto cache = io.mha.encode_context(io.ctx());
  for (auto _ : state) {
    io.mha.forward(io.q(), cache, io.o());
    benchmark::DoNotOptimize(io.out.data());
    benchmark::ClobberMemory();
  }
  report(state, s.query_side_projection_flops() + xattn::attention_flops(s.attention()));
}

// A training step: training_forward, then training_backward from a fixed dL/dout, with every
// input and parameter gradient. FLOPs: the forward's, plus 2 x the projections' (dW and dx per
// projection) and 2.5 x the attention's.
void BM_ForwardBackward(benchmark::State& state) {
  const layer_shape& s = shapes[state.range(0)];
  label(state, s);
  layer_inputs<float> io(s);
  const auto c = io.mha.config();
  const xattn::row_matrix<float> dout =
      xattn_bench::random_matrix<float>(s.batch * s.q_len, s.model_dim, 4);
  std::vector<float> dq(std::size_t(s.batch * s.q_len * s.model_dim)),
      dc(std::size_t(s.batch * s.kv_len * s.context_dim)), dv(dc.size());
  auto grads = xattn::zero_weights<float>(c);
  xattn::cross_attention_saved<float> saved;
  for (auto _ : state) {
    xattn::training_forward(io.mha, io.q(), io.ctx(), io.ctx(), io.o(), saved);
    xattn::training_backward(
        io.mha, saved, xattn::make_view(dout.data(), {s.batch, s.q_len, s.model_dim}),
        xattn::make_view(dq.data(), {s.batch, s.q_len, s.model_dim}),
        xattn::make_view(dc.data(), {s.batch, s.kv_len, s.context_dim}),
        xattn::make_view(dv.data(), {s.batch, s.kv_len, s.context_dim}), grads);
    benchmark::DoNotOptimize(dq.data());
    benchmark::ClobberMemory();
  }
  report(state, 3.0 * s.projection_flops() + 3.5 * xattn::attention_flops(s.attention()));
}

BENCHMARK_TEMPLATE(BM_Forward, float)
    ->ArgName("shape")
    ->DenseRange(0, 2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_Forward, Eigen::bfloat16)
    ->ArgName("shape")
    ->DenseRange(0, 2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_Forward, Eigen::half)
    ->ArgName("shape")
    ->DenseRange(0, 2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_Projections)
    ->ArgName("shape")
    ->DenseRange(0, 2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_Kernel)
    ->ArgName("shape")
    ->DenseRange(0, 2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_ForwardBackward)
    ->ArgName("shape")
    ->DenseRange(0, 2)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CachedStep, float)
    ->ArgName("shape")
    ->Arg(1)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CachedStep, Eigen::bfloat16)
    ->ArgName("shape")
    ->Arg(1)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_CachedStep, Eigen::half)
    ->ArgName("shape")
    ->Arg(1)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace

int main(int argc, char** argv) { return xattn_bench::run_benchmarks(argc, argv); }
