// SPDX-License-Identifier: MIT
// The cross-attention layer beside libtorch's torch::nn::MultiheadAttention, in one binary, at
// bench_cross_attention's three shapes (sd_unet, whisper_step, perceiver), float, inference:
//   BM_XattnLayer  multi_head_cross_attention<float>::forward (the context projected every call)
//   BM_TorchMHA    MultiheadAttention::forward under NoGradGuard, need_weights = false, with the
//                  same weights, query and context (sequence-first tensors, made contiguous
//                  before the timing); max_abs_diff is its largest difference from xattn's output
// Built only where CMake finds libtorch (find_package(Torch); Debian: libtorch-dev). Both run on
// OpenMP threads: run each thread count in its own process, e.g.
//   OMP_NUM_THREADS=1 bench_torch;  OMP_NUM_THREADS=2 bench_torch

#include "bench_common.hpp"
#include "bench_layers.hpp"

#include "xattn/cross_attention.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace {

using xattn::index_t;

using xattn_bench::layer_shape;
using xattn_bench::shapes;

int threads() {
  const char* env = std::getenv("OMP_NUM_THREADS");
  return env ? std::max(1, std::atoi(env)) : 1;
}

// The layer's operands: xattn's module and inputs, and the same in libtorch.
struct layer {
  explicit layer(const layer_shape& s)
      : shape(s),
        mha(s.config(), xattn::random_weights<float>(s.config(), 1)),
        query(xattn_bench::random_matrix<float>(s.batch * s.q_len, s.model_dim, 2)),
        context(xattn_bench::random_matrix<float>(s.batch * s.kv_len, s.context_dim, 3)),
        out(xattn::row_matrix<float>::Zero(s.batch * s.q_len, s.model_dim)),
        torch_mha(torch::nn::MultiheadAttentionOptions(s.model_dim, s.num_heads)
                      .kdim(s.context_dim)
                      .vdim(s.context_dim)) {
    torch::NoGradGuard no_grad;
    torch_mha->eval();
    const auto& w = mha.weights();
    const auto matrix = [](const xattn::row_matrix<float>& m) {
      return torch::from_blob(const_cast<float*>(m.data()), {m.rows(), m.cols()}).clone();
    };
    const auto vector = [](const Eigen::Matrix<float, 1, Eigen::Dynamic>& b) {
      return torch::from_blob(const_cast<float*>(b.data()), {b.size()}).clone();
    };
    if (s.context_dim == s.model_dim) {  // one packed in_proj_weight [3 Dm, Dm]
      torch_mha->in_proj_weight.copy_(
          torch::cat({matrix(w.q_proj.weight), matrix(w.k_proj.weight), matrix(w.v_proj.weight)}));
    } else {
      torch_mha->q_proj_weight.copy_(matrix(w.q_proj.weight));
      torch_mha->k_proj_weight.copy_(matrix(w.k_proj.weight));
      torch_mha->v_proj_weight.copy_(matrix(w.v_proj.weight));
    }
    if (w.q_proj.bias.size() > 0 && w.k_proj.bias.size() > 0 && w.v_proj.bias.size() > 0)
      torch_mha->in_proj_bias.copy_(
          torch::cat({vector(w.q_proj.bias), vector(w.k_proj.bias), vector(w.v_proj.bias)}));
    else
      throw std::runtime_error("bench_torch: the layers compared have biases");
    torch_mha->out_proj->weight.copy_(matrix(w.out_proj.weight));
    torch_mha->out_proj->bias.copy_(vector(w.out_proj.bias));
    // [B, L, D] row-major to libtorch's sequence-first [L, B, D], contiguous.
    tq = torch::from_blob(query.data(), {s.batch, s.q_len, s.model_dim})
             .transpose(0, 1)
             .contiguous();
    tc = torch::from_blob(context.data(), {s.batch, s.kv_len, s.context_dim})
             .transpose(0, 1)
             .contiguous();
  }

  void run_xattn() {
    mha.forward(xattn::make_view(static_cast<const float*>(query.data()),
                                 {shape.batch, shape.q_len, shape.model_dim}),
                xattn::make_view(static_cast<const float*>(context.data()),
                                 {shape.batch, shape.kv_len, shape.context_dim}),
                xattn::make_view(out.data(), {shape.batch, shape.q_len, shape.model_dim}));
  }
  torch::Tensor run_torch() {
    return std::get<0>(torch_mha->forward(tq, tc, tc, {}, /*need_weights=*/false));
  }

  layer_shape shape;
  xattn::multi_head_cross_attention<float> mha;
  xattn::row_matrix<float> query, context, out;
  torch::nn::MultiheadAttention torch_mha;
  torch::Tensor tq, tc;
};

void label(benchmark::State& state, const layer_shape& s) {
  state.SetLabel(std::string(s.name));
  state.counters["num_threads"] = threads();
}

void report(benchmark::State& state, const layer_shape& s) {
  state.counters["FLOPS"] =
      benchmark::Counter(s.projection_flops() + xattn::attention_flops(s.attention()),
                         benchmark::Counter::kIsIterationInvariantRate);
}

void BM_XattnLayer(benchmark::State& state) {
  const layer_shape& s = shapes[state.range(0)];
  label(state, s);
  layer io(s);
  io.run_xattn();  // warm-up
  for (auto _ : state) {
    io.run_xattn();
    benchmark::DoNotOptimize(io.out.data());
    benchmark::ClobberMemory();
  }
  report(state, s);
}

void BM_TorchMHA(benchmark::State& state) {
  const layer_shape& s = shapes[state.range(0)];
  label(state, s);
  torch::set_num_threads(threads());
  torch::NoGradGuard no_grad;
  layer io(s);
  io.run_xattn();
  torch::Tensor result = io.run_torch();  // warm-up, and the comparison with xattn's output
  const torch::Tensor mine =
      torch::from_blob(io.out.data(), {s.batch, s.q_len, s.model_dim}).transpose(0, 1);
  state.counters["max_abs_diff"] = (result - mine).abs().max().item<double>();
  for (auto _ : state) {
    result = io.run_torch();
    benchmark::DoNotOptimize(result.data_ptr());
    benchmark::ClobberMemory();
  }
  report(state, s);
}

// Each shape's two layers registered next to each other.
void register_cases() {
  for (int shape = 0; shape < 3; ++shape) {
    benchmark::RegisterBenchmark("BM_XattnLayer", BM_XattnLayer)
        ->ArgName("shape")
        ->Arg(shape)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
    benchmark::RegisterBenchmark("BM_TorchMHA", BM_TorchMHA)
        ->ArgName("shape")
        ->Arg(shape)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_cases();
  return xattn_bench::run_benchmarks(argc, argv);
}
