// SPDX-License-Identifier: MIT
// 12: why a decoder step is bound by memory, and what storing its keys and values in 8 or 4 bits
// costs in accuracy.
//
// What you will learn:
//   - a decoder step (one query per head) does 4·Lk·D flops over 2·Lk·D cached values: in float
//     that is half a flop per byte, far below what a core computes per byte it reads, so the
//     step takes as long as reading the cache does
//   - quantize and dequantize (quantized.hpp): blocks of 32 values with one fp16 scale each,
//     8 bits (q8) or 4 bits (q4) per value, and how many bytes each format reads per step
//   - the error quantization leaves in the attention's output, on keys like a speech encoder's
//     (no outliers) and like a language model's (a few channels 10-20x larger than the rest)
//   - why keys with outlier channels are better quantized per channel, along the tokens (as
//     KIVI, 2024, proposes), and values per token
//   - tiled_attention reading q8 and q4 blocks in place (float queries and output): the same
//     result as the float kernel on the dequantized cache, to float's rounding, and a step's
//     time over a long context in each format
// The accuracy study runs the float kernel on dequantized keys and values, since per-channel
// blocks are not a layout the kernel reads; part 3 shows that for blocks along the head
// dimension the kernel's own result is the same, so the errors printed are the formats' own.
// Run it:
//   cmake --build build --target 12_quantized_cache
//   ./build/examples/12_quantized_cache
// What to expect: a table of bytes per step, then for each kind of keys the output's relative
// error with q8 and q4 blocks, along the head dimension and per channel, then the kernel on the
// blocks and the time of one step over 32768 cached tokens per format (in a release build),
// then "all checks passed" (the exit status is non-zero if a check fails).
#include "xattn/attention_tiled.hpp"
#include "xattn/quantized.hpp"
#include "xattn/tensor_view.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

using xattn::index_t;

constexpr index_t H = 4, Lk = 1500, D = 64;  // 4 heads of 64 over 1500 audio frames

struct tensors {
  std::vector<float> q, k, v;  // q [1, H, 1, D], k and v [1, H, Lk, D]
};

// Queries and values N(0, 1); keys N(0, 1) with `outliers` channels scaled by 15.
tensors make_inputs(int outliers, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  tensors t;
  t.q.resize(std::size_t(H * D));
  t.k.resize(std::size_t(H * Lk * D));
  t.v.resize(t.k.size());
  for (float& x : t.q) x = normal(gen);
  for (float& x : t.v) x = normal(gen);
  for (std::size_t i = 0; i < t.k.size(); ++i) {
    const index_t channel = index_t(i) % D;
    t.k[i] = normal(gen) * (channel % 16 == 5 && channel / 16 < outliers ? 15.0f : 1.0f);
  }
  return t;
}

// x after a round trip through blocks of type B: along the head dimension (each token's row of
// D values in blocks), or per channel (each channel's Lk values across the tokens in blocks).
template <class B>
std::vector<float> round_trip(const std::vector<float>& x, bool per_channel) {
  std::vector<float> back(x.size());
  if (!per_channel) {
    const index_t nb = xattn::quant_blocks_per_row(D);
    std::vector<B> blocks(std::size_t(H * Lk * nb));
    const auto blocks_view = xattn::make_view(blocks.data(), {H, Lk, nb});
    xattn::quantize(xattn::make_view(x.data(), {H, Lk, D}), blocks_view);
    xattn::dequantize(blocks_view, xattn::make_view(back.data(), {H, Lk, D}));
  } else {
    // The same buffer seen as [H, D, Lk]: a channel's values are D apart.
    const index_t nb = xattn::quant_blocks_per_row(Lk);
    std::vector<B> blocks(std::size_t(H * D * nb));
    const auto blocks_view = xattn::make_view(blocks.data(), {H, D, nb});
    xattn::quantize(xattn::make_view(x.data(), {H, D, Lk}, {Lk * D, 1, D}), blocks_view);
    xattn::dequantize(blocks_view, xattn::make_view(back.data(), {H, D, Lk}, {Lk * D, 1, D}));
  }
  return back;
}

// One decoder step: out [1, H, 1, D].
std::vector<float> step(const std::vector<float>& q, const std::vector<float>& k,
                        const std::vector<float>& v) {
  std::vector<float> out(std::size_t(H * D));
  xattn::tiled_attention<float>(
      xattn::make_view(q.data(), {1, H, 1, D}), xattn::make_view(k.data(), {1, H, Lk, D}),
      xattn::make_view(v.data(), {1, H, Lk, D}), xattn::make_view(out.data(), {1, H, 1, D}));
  return out;
}

// x [H, L, D] quantized into blocks along D.
template <class B>
std::vector<B> blocks_of(const std::vector<float>& x, index_t L) {
  const index_t nb = xattn::quant_blocks_per_row(D);
  std::vector<B> blocks(std::size_t(H * L * nb));
  xattn::quantize(xattn::make_view(x.data(), {1, H, L, D}),
                  xattn::make_view(blocks.data(), {1, H, L, nb}));
  return blocks;
}

// One decoder step whose kernel reads the blocks themselves: out [1, H, 1, D].
template <class B>
std::vector<float> step_on_blocks(const std::vector<float>& q, const std::vector<B>& k,
                                  const std::vector<B>& v, index_t L) {
  const index_t nb = xattn::quant_blocks_per_row(D);
  std::vector<float> out(std::size_t(H * D));
  xattn::tiled_attention<float>(
      xattn::make_view(q.data(), {1, H, 1, D}), xattn::make_view(k.data(), {1, H, L, nb}),
      xattn::make_view(v.data(), {1, H, L, nb}), xattn::make_view(out.data(), {1, H, 1, D}));
  return out;
}

// The median of `reps` timed calls of f, in microseconds.
template <class F>
double median_us(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// ||a - b|| / ||b||
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

int main() {
  int failures = 0;
  auto check = [&](bool ok, const char* what) {
    if (!ok) {
      std::printf("CHECK FAILED: %s\n", what);
      ++failures;
    }
  };

  // 1. Bytes per step. The step reads every cached key and value once and does 4·Lk·D flops
  //    per head (two dot products of D per key); everything else it touches is tiny.
  const double values = 2.0 * H * Lk * D, flops = 4.0 * H * Lk * D;
  const double f32 = values * 4, bf16 = values * 2;
  const double q8 = 2.0 * double(xattn::quantized_bytes<xattn::q8_block>(H * Lk, D));
  const double q4 = 2.0 * double(xattn::quantized_bytes<xattn::q4_block>(H * Lk, D));
  std::printf("decoder step, %d heads of %d over %d cached tokens: %.2f Mflop\n", int(H), int(D),
              int(Lk), flops / 1e6);
  std::printf("  %-6s %10s %8s %12s\n", "cache", "bytes", "vs f32", "flop / byte");
  const char* names[] = {"float", "bf16", "q8", "q4"};
  const double bytes[] = {f32, bf16, q8, q4};
  for (int i = 0; i < 4; ++i)
    std::printf("  %-6s %10.0f %8.3f %12.2f\n", names[i], bytes[i], bytes[i] / f32,
                flops / bytes[i]);
  std::printf(
      "  (a core does tens of flops in the time it reads one byte from memory: every\n"
      "  format here leaves the step waiting on memory, so its time follows the bytes)\n");
  check(q8 / f32 <= 0.27 && q4 / f32 <= 0.15, "q8 and q4 caches are 0.27x and 0.15x of float");

  // 2. Accuracy: the step on the quantized cache against the step on the float cache.
  struct kind {
    const char* name;
    int outliers;
  } kinds[] = {{"speech-like keys (no outlier channels)", 0},
               {"language-model-like keys (4 of 64 channels 15x larger)", 4}};
  double err[2][2][2];  // [kind][q8, q4][keys along D, keys per channel]
  for (int c = 0; c < 2; ++c) {
    const tensors t = make_inputs(kinds[c].outliers, 42u + unsigned(c));
    const std::vector<float> exact = step(t.q, t.k, t.v);
    // Values are always quantized per token (along D): their rows are what the step weights.
    const std::vector<float> v8 = round_trip<xattn::q8_block>(t.v, false);
    const std::vector<float> v4 = round_trip<xattn::q4_block>(t.v, false);
    for (int per_channel = 0; per_channel < 2; ++per_channel) {
      err[c][0][per_channel] =
          relative_error(step(t.q, round_trip<xattn::q8_block>(t.k, per_channel != 0), v8), exact);
      err[c][1][per_channel] =
          relative_error(step(t.q, round_trip<xattn::q4_block>(t.k, per_channel != 0), v4), exact);
    }
    std::printf("\n%s: the output's relative error\n", kinds[c].name);
    std::printf("  %-6s %18s %18s\n", "format", "keys along D", "keys per channel");
    std::printf("  %-6s %18.2e %18.2e\n", "q8", err[c][0][0], err[c][0][1]);
    std::printf("  %-6s %18.2e %18.2e\n", "q4", err[c][1][0], err[c][1][1]);
  }
  // q8 costs about a percent or less; q4 several percent, much more where outliers take the
  // scale of every block they fall in, unless the keys are quantized per channel.
  check(err[0][0][0] < 0.015 && err[1][0][1] < 0.015, "q8 keeps the output within 1.5%");
  check(err[1][1][1] < err[1][1][0], "per-channel keys beat per-token keys under outliers (q4)");

  // 3. The kernel reads the blocks in place. Its result is the float kernel's on the
  //    dequantized cache up to float rounding (the blocks' codes are multiplied in float and
  //    then scaled): the format's error is the only one.
  {
    const tensors t = make_inputs(0, 7u);
    const auto k8 = blocks_of<xattn::q8_block>(t.k, Lk), v8 = blocks_of<xattn::q8_block>(t.v, Lk);
    const auto k4 = blocks_of<xattn::q4_block>(t.k, Lk), v4 = blocks_of<xattn::q4_block>(t.v, Lk);
    const double d8 = relative_error(step_on_blocks(t.q, k8, v8, Lk),
                                     step(t.q, round_trip<xattn::q8_block>(t.k, false),
                                          round_trip<xattn::q8_block>(t.v, false)));
    const double d4 = relative_error(step_on_blocks(t.q, k4, v4, Lk),
                                     step(t.q, round_trip<xattn::q4_block>(t.k, false),
                                          round_trip<xattn::q4_block>(t.v, false)));
    std::printf(
        "\nthe kernel on the blocks against the float kernel on them dequantized: "
        "q8 %.1e, q4 %.1e\n",
        d8, d4);
    check(d8 < 1e-5 && d4 < 1e-5, "the kernel on blocks equals the float kernel on their values");
  }
#ifdef NDEBUG
  // XATTN_EXAMPLE_REPS=0 (scripts/memcheck.sh): no timing; under valgrind a time means nothing.
  const char* reps_env = std::getenv("XATTN_EXAMPLE_REPS");
  const int reps = reps_env ? std::max(0, std::atoi(reps_env)) : 21;
#else
  const int reps = 0;  // asserts on: slow, and a time would mean little
#endif
  if (reps > 0) {
    // A context of 32768 tokens: 64 MiB of float keys and values, far past the caches, so
    // each step reads its cache from memory and the times follow the bytes.
    constexpr index_t L = 32768;
    std::mt19937 gen(3);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> q(std::size_t(H * D)), k(std::size_t(H * L * D)), v(k.size());
    for (auto* x : {&q, &k, &v})
      for (float& e : *x) e = u(gen);
    const auto k8 = blocks_of<xattn::q8_block>(k, L), v8 = blocks_of<xattn::q8_block>(v, L);
    const auto k4 = blocks_of<xattn::q4_block>(k, L), v4 = blocks_of<xattn::q4_block>(v, L);
    std::vector<float> out(std::size_t(H * D));
    const double t32 = median_us(reps, [&] {
      xattn::tiled_attention<float>(
          xattn::make_view(q.data(), {1, H, 1, D}), xattn::make_view(k.data(), {1, H, L, D}),
          xattn::make_view(v.data(), {1, H, L, D}), xattn::make_view(out.data(), {1, H, 1, D}));
    });
    const double t8 = median_us(reps, [&] { (void)step_on_blocks(q, k8, v8, L); });
    const double t4 = median_us(reps, [&] { (void)step_on_blocks(q, k4, v4, L); });
    const double mib = 2.0 * H * L * D * 4 / double(1 << 20);
    std::printf(
        "\none step over %d cached tokens (median of %d calls, the kernel's default threads):\n",
        int(L), reps);
    std::printf("  float %8.0f us  (%.1f MiB)\n", t32, mib);
    std::printf("  q8    %8.0f us  (%.1f MiB)  %.2fx faster\n", t8, mib * 34 / 128, t32 / t8);
    std::printf("  q4    %8.0f us  (%.1f MiB)  %.2fx faster\n", t4, mib * 18 / 128, t32 / t4);
  }

  if (failures == 0)
    std::printf("\nall checks passed\n");
  else
    std::printf("\n%d checks failed\n", failures);
  return failures == 0 ? 0 : 1;
}
