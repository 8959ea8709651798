// SPDX-License-Identifier: MIT
// The three layer shapes the module benchmarks share (bench_cross_attention, bench_torch):
//   sd_unet      Stable Diffusion UNet cross-attention: B = 2, Lq = 4096 latents, Lk = 77 prompt
//                tokens, Dm = 320, Dc = 768, 8 heads (Dk = 40)
//   whisper_step Whisper-like decoder step: B = 1, Lq = 1, Lk = 1500 audio frames, Dm = Dc = 384,
//                6 heads (Dk = 64)
//   perceiver    Perceiver-like: B = 1, 256 latents, Lk = 16384 inputs, Dm = 512, Dc = 256, 8 heads
#pragma once

#include "xattn/cross_attention.hpp"
#include "xattn/shapes.hpp"

namespace xattn_bench {

using xattn::index_t;

struct layer_shape {
  const char* name;
  index_t batch, q_len, kv_len, model_dim, context_dim, num_heads;

  xattn::cross_attention_config config() const {
    xattn::cross_attention_config c;
    c.model_dim = model_dim;
    c.context_dim = context_dim;
    c.num_heads = num_heads;
    return c.resolved();
  }
  xattn::attention_shape attention() const {
    const auto c = config();
    return {batch, num_heads, q_len, kv_len, c.head_dim, c.head_dim, num_heads};
  }
  // 2·rows·in·out per projection: Q and the output over B·Lq rows, K and V over B·Lk rows.
  double projection_flops() const {
    const auto c = config();
    const double width = double(c.num_heads * c.head_dim);
    return 2.0 * double(batch) *
           (double(q_len) * 2.0 * double(model_dim) * width +
            double(kv_len) * 2.0 * double(context_dim) * width);
  }
  double query_side_projection_flops() const {  // Q and output projections only
    const auto c = config();
    return 2.0 * double(batch * q_len) * 2.0 * double(model_dim) * double(c.num_heads * c.head_dim);
  }
};

const layer_shape shapes[] = {
    {"sd_unet", 2, 4096, 77, 320, 768, 8},
    {"whisper_step", 1, 1, 1500, 384, 384, 6},
    {"perceiver", 1, 256, 16384, 512, 256, 8},
};

}  // namespace xattn_bench
