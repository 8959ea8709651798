// SPDX-License-Identifier: MIT
// 11: the attention layers of a real checkpoint, found, loaded as they are and run.
//
// What you will learn:
//   - find_attention_layers: every attention layer in a safetensors file, with the layout its
//     model family names it in (Hugging Face Whisper/BART, diffusers, openai-whisper, T5, PyTorch)
//   - load_cross_attention(file, prefix, {num_heads}): one call, no renaming; the widths, the
//     biases and the score scale come from the file, the head count from you
//   - that the file is memory-mapped: loading one layer reads only that layer's tensors
//   - load_cross_attention<Eigen::bfloat16>: the same layer kept in bf16 (half the bytes of its
//     weights; F16/BF16 files load bit for bit), computing in float
// Run it:
//   cmake --build build --target 11_checkpoint_layers
//   ./build/examples/11_checkpoint_layers model.safetensors [prefix num_heads]
// With no arguments it reads tests/fixtures/layout_hf_whisper.safetensors (a Whisper decoder
// layer at toy size). What to expect: the layers found, the configuration read for one, and its
// output for the file's own "query" and "context" tensors when the file has them, compared with
// the file's "output" (written by the model's own attention in PyTorch), then the same in bf16;
// "all checks passed".
#include "xattn/checkpoints.hpp"
#include "xattn/cross_attention.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#ifndef XATTN_EXAMPLE_FIXTURE
#  define XATTN_EXAMPLE_FIXTURE "layout_hf_whisper.safetensors"
#endif

int main(int argc, char** argv) {
  using xattn::index_t;
  // A first argument that is not a .safetensors file (scripts/memcheck.sh gives every example
  // a folder for pictures) leaves the default.
  const std::string arg = argc > 1 ? argv[1] : "";
  const bool given = arg.size() > 12 && arg.compare(arg.size() - 12, 12, ".safetensors") == 0;
  const std::string path = given ? arg : XATTN_EXAMPLE_FIXTURE;
  const xattn::safetensors_file file = xattn::safetensors_file::load(path);

  // 1. Every attention layer in the file (self-attention layers load the same way).
  const std::vector<xattn::checkpoint_layer> layers = xattn::find_attention_layers(file);
  std::printf("%s: %zu tensors, %zu attention layers\n", path.c_str(), file.names().size(),
              layers.size());
  for (const auto& l : layers)
    std::printf("  %-48s %s\n", l.prefix.c_str(), xattn::layout_name(l.layout));
  if (layers.empty()) return 1;

  // 2. One layer: by name, or the one the fixture says, or the first found. The head count is
  //    the one thing a file does not say.
  const auto& meta = file.metadata();
  std::string prefix = layers.front().prefix;
  index_t heads = 1;
  if (given && argc > 3) {
    prefix = argv[2];
    heads = std::atol(argv[3]);
  } else if (meta.count("prefix") && meta.count("num_heads")) {
    prefix = meta.at("prefix");
    heads = std::atol(meta.at("num_heads").c_str());
  }
  auto attn = xattn::load_cross_attention<float>(file, prefix, {heads});
  const auto& c = attn.config();
  std::printf(
      "\n%s: model_dim %td, context_dim %td, %td heads of %td (%td key/value heads), "
      "scale %.4g\n  biases: q %s, k %s, v %s, out %s\n",
      prefix.c_str(), c.model_dim, c.context_dim, c.num_heads, c.head_dim, c.num_kv_heads, *c.scale,
      *c.q_bias ? "yes" : "no", *c.k_bias ? "yes" : "no", *c.v_bias ? "yes" : "no",
      *c.out_bias ? "yes" : "no");

  // 3. Run it on the file's inputs, when it has them, against the model's own output.
  if (!file.contains("query") || !file.contains("context") || !file.contains("output")) {
    std::printf("(no query/context/output tensors in the file to run it on)\n");
    return 0;
  }
  const auto q = file.read<float>("query"), ctx = file.read<float>("context");
  const auto want = file.read<double>("output");
  const index_t B = q.shape[0], Lq = q.shape[1], Lk = ctx.shape[1];
  std::vector<float> out(std::size_t(B * Lq * c.model_dim));
  attn.forward(xattn::make_view(q.values.data(), {B, Lq, c.model_dim}),
               xattn::make_view(ctx.values.data(), {B, Lk, c.context_dim}),
               xattn::make_view(out.data(), {B, Lq, c.model_dim}));
  double worst = 0;
  for (std::size_t n = 0; n < out.size(); ++n)
    worst = std::fmax(worst, std::fabs(double(out[n]) - want.values[n]));
  std::printf("\noutput [%td, %td, %td], first row: %.5f %.5f %.5f ...\n", B, Lq, c.model_dim,
              double(out[0]), double(out[1]), double(out[2]));
  std::printf("largest difference from the model's own output: %.2e\n", worst);
  const bool ok = worst < 1e-4;  // float against float64: a few ulp of the outputs (~0.5)

  // 4. The same layer in bf16: weights, inputs and output stored in it, the arithmetic float.
  //    bf16 keeps 8 significant bits (about 2 to 3 decimal digits), so expect differences of a
  //    few 1e-3 for outputs of about 0.5: its inputs and each stored result are rounded.
  using bf16 = Eigen::bfloat16;
  auto attn16 = xattn::load_cross_attention<bf16>(file, prefix, {heads});
  const auto q16 = file.read<bf16>("query"), ctx16 = file.read<bf16>("context");
  std::vector<bf16> out16(out.size());
  attn16.forward(xattn::make_view(q16.values.data(), {B, Lq, c.model_dim}),
                 xattn::make_view(ctx16.values.data(), {B, Lk, c.context_dim}),
                 xattn::make_view(out16.data(), {B, Lq, c.model_dim}));
  double worst16 = 0;
  for (std::size_t n = 0; n < out16.size(); ++n)
    worst16 = std::fmax(worst16, std::fabs(double(float(out16[n])) - want.values[n]));
  const auto& w = attn16.weights();
  const index_t params = w.q_proj.weight.size() + w.k_proj.weight.size() +
                         w.v_proj.weight.size() + w.out_proj.weight.size();
  std::printf("in bf16: weights %td bytes (float: %td), largest difference %.2e\n",
              params * index_t(sizeof(bf16)), params * index_t(sizeof(float)), worst16);
  const bool ok16 = worst16 < 3e-2;

  std::printf(ok && ok16 ? "all checks passed\n" : "CHECK FAILED\n");
  return ok && ok16 ? 0 : 1;
}
