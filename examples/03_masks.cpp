// SPDX-License-Identifier: MIT
// 03: masks decide which keys each query may look at. Three you will meet everywhere: key
// padding (a batch of sources of different lengths), causal (no peeking at later tokens), and
// the corner case of a query with nothing left to see.
//
// What you will learn:
//   - key padding: opts.mask.kv_lengths, one real length per batch item, padded keys get weight 0
//     and the result equals running the short source on its own
//   - causal masks: top_left (query i sees keys 0..i) and bottom_right (for Lq < Lk, the last
//     query sees every key, as when a decoder continues after a prompt)
//   - a fully masked row gives zeros and a log-sum-exp of -inf, never NaN
// Run it:
//   cmake -S . -B build && cmake --build build --target 03_masks
//   ./build/examples/03_masks [output directory, default: the current one]
// What to expect: three tables of weights with zeros where the masks forbid, the causal map
// written to 03_causal.svg (and .png), and "all checks passed" (non-zero exit if a check fails).
#include "xattn/attention_naive.hpp"
#include "xattn/heatmap.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"
#if XATTN_EXAMPLE_PNG  // set by examples/CMakeLists.txt where stb_image_write.h is installed
#  define STB_IMAGE_WRITE_IMPLEMENTATION  // stb's functions are compiled in this one file
#  include "xattn/heatmap_png.hpp"
#endif

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace {

using xattn::index_t;

// A tensor that owns its numbers: data, plus a [B, H, L, D] view of them (H = 1 here).
struct tensor4 {
  std::vector<float> data;
  xattn::tensor_view<float, 4> view;
  tensor4(index_t b, index_t l, index_t d, float seed) : data(std::size_t(b * l * d)) {
    for (std::size_t n = 0; n < data.size(); ++n) data[n] = std::sin(seed + 0.37f * float(n));
    view = xattn::make_view(data.data(), {b, 1, l, d});
  }
};

// q attends to kv (keys and values alike) under opts' masks: weights [B, 1, Lq, Lk], output
// [B, 1, Lq, D], and each row's log-sum-exp [B, 1, Lq].
struct result {
  tensor4 weights, out;
  std::vector<float> lse;
};
result run(const tensor4& q, const tensor4& kv, xattn::attention_options<float> opts) {
  const index_t b = q.view.extent(0), lq = q.view.extent(2), lk = kv.view.extent(2);
  result r{tensor4(b, lq, lk, 0), tensor4(b, lq, kv.view.extent(3), 0),
           std::vector<float>(std::size_t(b * lq))};
  opts.weights_out = r.weights.view;
  opts.lse_out = xattn::make_view(r.lse.data(), {b, 1, lq});
  xattn::naive_attention<float>(q.view, kv.view, kv.view, r.out.view, opts);
  return r;
}

void print(const char* title, const xattn::tensor_view<float, 2>& p) {
  std::printf("%s  [%td, %td]\n", title, p.extent(0), p.extent(1));
  for (index_t i = 0; i < p.extent(0); ++i) {
    std::printf("    query %td:", i);
    for (index_t j = 0; j < p.extent(1); ++j) std::printf(" %6.3f", double(p(i, j)));
    std::printf("\n");
  }
  std::printf("\n");
}

bool check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok    " : "FAILED", what);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  bool ok = true;

  // ---- 1. key padding: two sources of 5 and 3 real tokens, padded to Lk = 5 ------------------
  const tensor4 q(2, 2, 4, 0.0f), kv(2, 5, 4, 1.0f);  // q [2, 1, 2, 4], k = v [2, 1, 5, 4]
  std::vector<index_t> lengths = {5, 3};
  xattn::attention_options<float> padded;
  padded.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
  const tensor4 p_pad = run(q, kv, padded).weights;
  print("key padding, batch item 0 (5 real keys)", p_pad.view.select(0, 0).select(0, 0));
  print("key padding, batch item 1 (3 real keys, 2 padding)", p_pad.view.select(0, 1).select(0, 0));

  // The same item 1, run on its own with only its 3 real keys: the weights must agree.
  tensor4 q1(1, 2, 4, 0.0f), kv1(1, 3, 4, 0.0f);
  for (index_t i = 0; i < 2; ++i)
    for (index_t d = 0; d < 4; ++d) q1.view(0, 0, i, d) = q.view(1, 0, i, d);
  for (index_t j = 0; j < 3; ++j)
    for (index_t d = 0; d < 4; ++d) kv1.view(0, 0, j, d) = kv.view(1, 0, j, d);
  const tensor4 p_short = run(q1, kv1, {}).weights;
  float worst = 0.0f;
  for (index_t i = 0; i < 2; ++i) {
    for (index_t j = 0; j < 5; ++j) {
      const float want = j < 3 ? p_short.view(0, 0, i, j) : 0.0f;  // padding: exactly 0
      worst = std::max(worst, std::abs(p_pad.view(1, 0, i, j) - want));
    }
  }
  ok &= check(worst <= 1e-6f, "padding gets weight 0; the rest equals the unpadded source alone");

  // ---- 2. causal: self-attention over 4 tokens, then Lq = 2 queries after a 2-token prompt ---
  const tensor4 x(1, 4, 4, 2.0f);
  xattn::attention_options<float> causal;
  causal.mask.causal = xattn::causal_mask::top_left;
  const tensor4 p_causal = run(x, x, causal).weights;
  const auto p_c = p_causal.view.select(0, 0).select(0, 0);
  print("causal top_left, self-attention (query i sees keys 0..i)", p_c);
  bool upper_zero = true;
  for (index_t i = 0; i < 4; ++i)
    for (index_t j = i + 1; j < 4; ++j) upper_zero &= p_c(i, j) == 0.0f;
  ok &=
      check(upper_zero && p_c(0, 0) == 1.0f, "no query sees a later key; query 0 sees only key 0");

  const tensor4 q_new(1, 2, 4, 3.0f);
  causal.mask.causal = xattn::causal_mask::bottom_right;
  const tensor4 p_br = run(q_new, x, causal).weights;
  const auto p_b = p_br.view.select(0, 0).select(0, 0);
  print("causal bottom_right, Lq = 2, Lk = 4 (query i sees keys 0..i+2)", p_b);
  ok &= check(p_b(0, 3) == 0.0f && p_b(1, 3) > 0.0f,
              "the last query sees every key, the first not the last");

  // The causal map as a picture: source across, target down, zeros above the diagonal.
  const std::string dir = argc > 1 ? std::string(argv[1]) + "/" : "";
  xattn::heatmap_options map;
  map.row_labels = {"x0", "x1", "x2", "x3"};
  map.col_labels = map.row_labels;
  map.title = "causal self-attention";
  xattn::write_heatmap_svg(dir + "03_causal.svg", p_c, map);
#if XATTN_EXAMPLE_PNG
  xattn::write_heatmap_png(dir + "03_causal.png", p_c, map);
#endif
  std::printf("causal map written to %s03_causal.svg\n\n", dir.c_str());

  // ---- 3. a fully masked row: query 1 may see no key at all ----------------------------------
  const bool allowed[2][5] = {{true, true, false, true, false},
                              {false, false, false, false, false}};
  xattn::attention_options<float> none;
  none.mask.allowed = xattn::to_rank<4>(xattn::make_view(&allowed[0][0], {2, 5}));
  const result r = run(q, kv, none);
  print("allowed mask, batch item 0 (query 1 allowed nothing)",
        r.weights.view.select(0, 0).select(0, 0));
  std::printf("log-sum-exp of each query of item 0: %g, %g\n", double(r.lse[0]), double(r.lse[1]));
  print("output of batch item 0", r.out.view.select(0, 0).select(0, 0));
  bool zero_row = std::isinf(r.lse[1]) && r.lse[1] < 0;
  for (index_t j = 0; j < 5; ++j) zero_row &= r.weights.view(0, 0, 1, j) == 0.0f;
  for (index_t d = 0; d < 4; ++d) zero_row &= r.out.view(0, 0, 1, d) == 0.0f;
  ok &= check(zero_row, "a fully masked row has weights 0 (and an output of 0) and lse -inf");

  std::printf(ok ? "all checks passed\n" : "some checks FAILED\n");
  return ok ? 0 : 1;
}
