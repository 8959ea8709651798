// SPDX-License-Identifier: MIT
// 07: the cross-attention block of a text-to-image model: 4096 image latents (a 64 x 64 grid)
// attend to 77 prompt-token embeddings, at the sizes of Stable Diffusion's first UNet level.
//
// What you will learn:
//   - that the query side and the context side have different widths (320 for latents, 768 for
//     the text encoder), and the module projects both to the same 8 heads of 40
//   - the residual form used in such blocks: latents + attention(latents, prompt)
//   - that the kernel is an option: the default (tiled) and the naive reference agree
//   - the cost split: projections vs attention at this shape
// Run it (a Release build; a Debug build is slow here):
//   cmake --build build --target 07_text_to_image_block
//   ./build/examples/07_text_to_image_block
// What to expect: the time of one block and its GFLOP/s, the largest difference between the two
// kernels on a slice of the latents, and "all checks passed" (non-zero exit status otherwise).
#include "xattn/cross_attention.hpp"
#include "xattn/shapes.hpp"
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

  const index_t B = 1, Lq = 64 * 64, Lk = 77, Dm = 320, Dc = 768, H = 8;
  xattn::cross_attention_config cfg;
  cfg.model_dim = Dm;
  cfg.context_dim = Dc;
  cfg.num_heads = H;
  cfg.bias = false;  // Stable Diffusion's to_q, to_k, to_v have no bias
  xattn::multi_head_cross_attention<float> attn(cfg, xattn::random_weights<float>(cfg, 3));

  const matrix latents = matrix::Random(B * Lq, Dm);  // [B, Lq, Dm]
  const matrix prompt = matrix::Random(B * Lk, Dc);   // [B, Lk, Dc]
  matrix attended(B * Lq, Dm);
  const auto q = xattn::make_view(latents.data(), {B, Lq, Dm});
  const auto ctx = xattn::make_view(prompt.data(), {B, Lk, Dc});

  // One warm-up call sizes the module's buffers; timed calls then allocate nothing of the module.
  attn.forward(q, ctx, xattn::make_view(attended.data(), {B, Lq, Dm}));
#ifdef NDEBUG
  // XATTN_EXAMPLE_REPS=0 (scripts/memcheck.sh): the warm-up call alone, not timed; under
  // valgrind a time means nothing.
  const char* reps_env = std::getenv("XATTN_EXAMPLE_REPS");
  const int reps = reps_env ? std::max(0, std::atoi(reps_env)) : 3;
#else
  const int reps = 1;  // asserts on: slow, and the time means little anyway
#endif
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r)
    attn.forward(q, ctx, xattn::make_view(attended.data(), {B, Lq, Dm}));
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
      std::max(reps, 1);
  const matrix block_out = latents + attended;  // the residual connection

  const double d = double(Dm / H);
  const double proj = 2.0 * B * (2.0 * Lq * Dm * Dm + 2.0 * Lk * Dc * Dm);
  const double att = xattn::attention_flops({B, H, Lq, Lk, Dm / H, Dm / H, H});
  std::printf("latents [%d, %d, %d] attend to prompt [%d, %d, %d], %d heads of %.0f\n", int(B),
              int(Lq), int(Dm), int(B), int(Lk), int(Dc), int(H), d);
  if (reps > 0)
    std::printf("one block: %.1f ms, %.1f GFLOP/s (%.0f%% of the FLOPs in projections)\n", ms,
                (proj + att) / (ms * 1e6), 100.0 * proj / (proj + att));
  else
    std::printf("one block: not timed (%.0f%% of the FLOPs in projections)\n",
                100.0 * proj / (proj + att));

  // Check: the naive kernel on the first 256 latents gives the same rows (each latent's output
  // depends on that latent and the prompt only).
  const index_t rows = 256;
  matrix naive_out(B * rows, Dm);
  xattn::cross_attention_options<float> opts;
  opts.kernel = xattn::attention_kernel::naive;
  attn.forward(xattn::make_view(latents.data(), {B, rows, Dm}), ctx,
               xattn::make_view(naive_out.data(), {B, rows, Dm}), opts);
  const float diff = (naive_out - attended.topRows(rows)).cwiseAbs().maxCoeff();
  std::printf("max |tiled - naive| on %d latents: %.2e\n", int(rows), double(diff));

  const bool finite = block_out.allFinite();
  if (diff > 1e-4f || !finite) {
    std::printf("CHECK FAILED\n");
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
