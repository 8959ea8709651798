// SPDX-License-Identifier: MIT
// 06: a translation-style decoder generating token by token against a cached encoder context.
//
// What you will learn:
//   - how to configure multi_head_cross_attention (decoder width, encoder width, heads)
//   - encode_context: project the encoder output to keys and values ONCE, then run any number of
//     decoder steps against the cache (no K/V projection per step)
//   - key padding for a batch of source sentences of different lengths (PyTorch's
//     key_padding_mask: true = padding)
//   - that generating step by step gives what one forward over all steps gives
// Run it:
//   cmake --build build --target 06_decoder_with_cached_context
//   ./build/examples/06_decoder_with_cached_context
// What to expect: for each step, the source position each sentence attends to most, the time of
// a cached step and of a step that re-projects the context, then "all checks passed" (the exit
// status is non-zero if a check fails).
#include "xattn/cross_attention.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>

int main() {
  using matrix = xattn::row_matrix<float>;
  using xattn::index_t;

  // Two source sentences of 12 and 7 tokens, encoded by some encoder into 96-wide vectors; the
  // second is padded to 12. The decoder is 64 wide with 4 heads of 16.
  const index_t B = 2, Lk = 12, steps = 8, Dm = 64, Dc = 96;
  xattn::cross_attention_config cfg;
  cfg.model_dim = Dm;
  cfg.context_dim = Dc;
  cfg.num_heads = 4;
  xattn::multi_head_cross_attention<float> attn(cfg, xattn::random_weights<float>(cfg, 7));

  const matrix encoder_out = matrix::Random(B * Lk, Dc);  // [B, Lk, Dc], rows b·Lk + j
  bool padding[B][Lk] = {};
  for (index_t j = 7; j < Lk; ++j) padding[1][j] = true;
  xattn::cross_attention_options<float> opts;
  opts.key_padding_mask = xattn::make_view<const bool>(&padding[0][0], {B, Lk});

  // Project the context once.
  const auto context = xattn::make_view(encoder_out.data(), {B, Lk, Dc});
  const xattn::context_cache<float> cache = attn.encode_context(context);

  // Generate: each step's query is made from the previous step's output (a stand-in for the
  // rest of a decoder layer), so the steps must run in order.
  matrix queries(B * steps, Dm), step_out(B * steps, Dm);  // [B, steps, Dm]
  matrix q = matrix::Random(B, Dm), out(B, Dm), weights(B, Lk);
  for (index_t t = 0; t < steps; ++t) {
    opts.average_weights_out = xattn::make_view(weights.data(), {B, 1, Lk});
    attn.forward(xattn::make_view(q.data(), {B, 1, Dm}), cache,
                 xattn::make_view(out.data(), {B, 1, Dm}), opts);
    std::printf("step %d:", int(t));
    for (index_t b = 0; b < B; ++b) {
      index_t best;
      weights.row(b).maxCoeff(&best);
      std::printf("  sentence %d looks at source token %2d (weight %.2f)", int(b), int(best),
                  double(weights(b, best)));
      queries.row(b * steps + t) = q.row(b);
      step_out.row(b * steps + t) = out.row(b);
    }
    std::printf("\n");
    q = (out.array().tanh() + 0.1f * float(t + 1)).matrix();
  }
  opts.average_weights_out.reset();

  // Check 1: one forward over all steps at once (same queries) gives the same outputs.
  matrix full(B * steps, Dm);
  attn.forward(xattn::make_view(queries.data(), {B, steps, Dm}), context,
               xattn::make_view(full.data(), {B, steps, Dm}), opts);
  const float diff = (full - step_out).cwiseAbs().maxCoeff();
  std::printf("\nmax |step by step - full forward| = %.2e\n", double(diff));
  const bool same = diff <= 1e-5f;

  // Check 2: padding keys of sentence 1 got no weight at all.
  opts.average_weights_out = xattn::make_view(weights.data(), {B, 1, Lk});
  attn.forward(xattn::make_view(q.data(), {B, 1, Dm}), cache,
               xattn::make_view(out.data(), {B, 1, Dm}), opts);
  const bool padding_ignored = weights.row(1).tail(Lk - 7).maxCoeff() == 0.0f;
  opts.average_weights_out.reset();

  // What the cache saves: a step without it projects all Lk context rows again.
  using clock = std::chrono::steady_clock;
  // XATTN_EXAMPLE_REPS (scripts/memcheck.sh sets 0, taken as 1): under valgrind a time means
  // nothing.
  const char* reps_env = std::getenv("XATTN_EXAMPLE_REPS");
  const int reps = reps_env ? std::max(1, std::atoi(reps_env)) : 2000;
  auto t0 = clock::now();
  for (int r = 0; r < reps; ++r)
    attn.forward(xattn::make_view(q.data(), {B, 1, Dm}), cache,
                 xattn::make_view(out.data(), {B, 1, Dm}), opts);
  auto t1 = clock::now();
  for (int r = 0; r < reps; ++r)
    attn.forward(xattn::make_view(q.data(), {B, 1, Dm}), context,
                 xattn::make_view(out.data(), {B, 1, Dm}), opts);
  auto t2 = clock::now();
  const double cached = std::chrono::duration<double, std::micro>(t1 - t0).count() / reps;
  const double reproject = std::chrono::duration<double, std::micro>(t2 - t1).count() / reps;
  std::printf("one step: %.1f us with the cache, %.1f us re-projecting the context\n", cached,
              reproject);

  if (!same || !padding_ignored) {
    std::printf("CHECK FAILED: %s\n", same ? "padding got weight" : "steps differ from full");
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
