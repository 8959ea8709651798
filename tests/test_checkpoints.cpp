// SPDX-License-Identifier: MIT
// checkpoints.hpp: the attention layers of real model families load with one call, under their
// own names and shapes, and match each model's own attention forward (transcribed in
// tests/make_fixtures.py and saved in tests/fixtures/layout_*.safetensors) with both kernels;
// listing the layers of a file; naming a layout; the errors for an unknown layout and for a
// head count the shapes do not allow; memory-mapped loading reads only the layer's tensors.
#include "xattn/checkpoints.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

using xattn::checkpoint_layout;
using xattn::index_t;
using xattn_test::all_close;
using xattn_test::throws_with;

template <class T>
class Checkpoints : public ::testing::Test {};
TYPED_TEST_SUITE(Checkpoints, xattn_test::element_types, );

xattn::safetensors_file fixture(const char* name) {
  return xattn::safetensors_file::load(std::string(XATTN_TEST_FIXTURES_DIR) + "/" + name +
                                       ".safetensors");
}

// Projections around the attention: three roundings in a row (see test_cross_attention.cpp);
// fp16 weights are exact in T, so the tolerance is T's.
template <class T>
double module_tol(const xattn::cross_attention_config& c, index_t kv_len) {
  const index_t widest =
      std::max({c.model_dim, c.context_dim, c.value_context_dim, c.head_dim * c.num_heads});
  return xattn_test::attention_tol<T>(c.head_dim, kv_len, 4.0) +
         2.0 * xattn_test::attention_tol<T>(widest, 1, 0.0);
}

// Loads the fixture's layer by prefix and head count only, checks the layout found, and runs
// both kernels against the model's own output. Returns the module's configuration.
template <class T>
xattn::cross_attention_config check_layout(const char* name, checkpoint_layout want) {
  SCOPED_TRACE(name);
  const auto f = fixture(name);
  const std::string prefix = f.metadata().at("prefix");
  const index_t heads = std::stoll(f.metadata().at("num_heads"));
  const auto layers = xattn::find_attention_layers(f);
  EXPECT_TRUE(std::any_of(
      layers.begin(), layers.end(),
      [&](const xattn::checkpoint_layer& l) { return l.prefix == prefix && l.layout == want; }))
      << "not listed: " << prefix;

  auto mha = xattn::load_cross_attention<T>(f, prefix, {heads});
  const auto& c = mha.config();
  const auto q = f.read<T>("query"), ctx = f.read<T>("context");
  const index_t B = q.shape[0], Lq = q.shape[1], Lk = ctx.shape[1];
  const auto view3 = [](const auto& t) {
    return xattn::tensor_view<const T, 3>(t.values.data(), {t.shape[0], t.shape[1], t.shape[2]});
  };
  const auto want_out = f.read<double>("output", {B, Lq, c.model_dim});
  std::vector<T> out(want_out.size(), T(-7));
  for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
    xattn::cross_attention_options<T> opts;
    opts.kernel = kernel;
    mha.forward(view3(q), view3(ctx), xattn::make_view(out.data(), {B, Lq, c.model_dim}), opts);
    EXPECT_TRUE(all_close(out, want_out, module_tol<T>(c, Lk)))
        << (kernel == xattn::attention_kernel::naive ? "naive" : "tiled");
  }
  return c;
}

TYPED_TEST(Checkpoints, HuggingFaceWhisperWithoutKeyBias) {
  const auto c = check_layout<TypeParam>("layout_hf_whisper", checkpoint_layout::hugging_face);
  EXPECT_TRUE(*c.q_bias);
  EXPECT_FALSE(*c.k_bias);  // Whisper's k_proj has none
  EXPECT_TRUE(*c.v_bias);
  EXPECT_TRUE(*c.out_bias);
  EXPECT_EQ(c.head_dim, 4);
}

TYPED_TEST(Checkpoints, HuggingFaceBart) {
  const auto c = check_layout<TypeParam>("layout_hf_bart", checkpoint_layout::hugging_face);
  EXPECT_TRUE(*c.k_bias);
}

TYPED_TEST(Checkpoints, DiffusersAttn2InFp16) {
  const auto c = check_layout<TypeParam>("layout_diffusers_fp16", checkpoint_layout::diffusers);
  EXPECT_FALSE(*c.q_bias || *c.k_bias || *c.v_bias);
  EXPECT_TRUE(*c.out_bias);  // to_out.0 only
  EXPECT_EQ(c.context_dim, 12);
  EXPECT_EQ(c.head_dim, 8);
}

TYPED_TEST(Checkpoints, OpenAIWhisperCrossAttn) {
  const auto c =
      check_layout<TypeParam>("layout_openai_whisper", checkpoint_layout::openai_whisper);
  EXPECT_FALSE(*c.k_bias);
  EXPECT_TRUE(*c.q_bias);
}

TYPED_TEST(Checkpoints, T5EncDecAttentionUnscaledWithInnerWidthUnlikeModelWidth) {
  const auto c = check_layout<TypeParam>("layout_t5", checkpoint_layout::t5);
  EXPECT_EQ(*c.scale, 1.0);  // T5 does not scale its scores
  EXPECT_EQ(c.model_dim, 16);
  EXPECT_EQ(c.head_dim * c.num_heads, 24);  // inner width 24 != d_model 16
  EXPECT_FALSE(c.bias);
}

TYPED_TEST(Checkpoints, TorchTransformerDecoderLayerMultiheadAttn) {
  const auto c =
      check_layout<TypeParam>("layout_torch_decoder_layer", checkpoint_layout::torch_packed);
  EXPECT_TRUE(c.bias);
}

TEST(Checkpoints, ListsEveryAttentionLayerOfAFile) {
  const auto layers = xattn::find_attention_layers(fixture("layout_hf_whisper"));
  ASSERT_EQ(layers.size(), 2u);
  EXPECT_EQ(layers[0].prefix, "model.decoder.layers.0.encoder_attn");
  EXPECT_EQ(layers[1].prefix, "model.decoder.layers.0.self_attn");
  EXPECT_EQ(layers[1].layout, checkpoint_layout::hugging_face);
  const auto t5 = xattn::find_attention_layers(fixture("layout_t5"));
  ASSERT_EQ(t5.size(), 2u);
  EXPECT_EQ(t5[0].prefix, "decoder.block.0.layer.0.SelfAttention");
  EXPECT_EQ(t5[1].prefix, "decoder.block.0.layer.1.EncDecAttention");
  const auto torch = xattn::find_attention_layers(fixture("layout_torch_decoder_layer"));
  ASSERT_EQ(torch.size(), 2u);
  EXPECT_EQ(torch[0].prefix, "decoder.layers.0.multihead_attn");
  EXPECT_EQ(torch[1].prefix, "decoder.layers.0.self_attn");
}

TEST(Checkpoints, ALayoutCanBeNamed) {
  const auto f = fixture("layout_t5");
  xattn::checkpoint_options o;
  o.num_heads = 3;
  o.layout = checkpoint_layout::t5;
  EXPECT_EQ(xattn::checkpoint_config(f, "decoder.block.0.layer.1.EncDecAttention", o).head_dim, 8);
  o.layout = checkpoint_layout::hugging_face;  // not what the file holds
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)xattn::checkpoint_config(f, "decoder.block.0.layer.1.EncDecAttention", o); },
      {"tensor 'decoder.block.0.layer.1.EncDecAttention.out_proj.weight' is missing"}));
  o.layout = checkpoint_layout::t5;
  o.scale = 0.125;  // the caller's scale wins over the layout's
  EXPECT_EQ(*xattn::checkpoint_config(f, "decoder.block.0.layer.1.EncDecAttention", o).scale,
            0.125);
}

TEST(Checkpoints, UnknownLayoutListsWhatItFoundAndWhatItTried) {
  xattn::safetensors_writer w;
  const float x[4] = {1, 2, 3, 4};
  w.add("enc.attn.Wq", {2, 2}, x, xattn::safetensors_dtype::f32);
  w.add("enc.attn.Wk", {2, 2}, x, xattn::safetensors_dtype::f32);
  w.add("other.weight", {4}, x, xattn::safetensors_dtype::f32);
  const xattn::safetensors_file f(w.bytes(), "odd.safetensors");
  EXPECT_TRUE(xattn::find_attention_layers(f).empty());
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)xattn::load_cross_attention<float>(f, "enc.attn", {2}); },
      {"odd.safetensors", "no attention layer under prefix 'enc.attn'",
       "found 'enc.attn.Wk', 'enc.attn.Wq'", "diffusers (to_q.weight)", "t5 (q.weight)"}));
}

TEST(Checkpoints, TwoLayoutsUnderOnePrefixAreAnErrorNamingBoth) {
  // Hugging Face and diffusers names side by side: the first layout tried used to win silently.
  xattn::safetensors_writer w;
  const float x[4] = {1, 2, 3, 4};
  for (const char* n : {"q_proj", "k_proj", "v_proj", "out_proj", "to_q", "to_k", "to_v", "to_out.0"})
    w.add(std::string("blk.attn.") + n + ".weight", {2, 2}, x, xattn::safetensors_dtype::f32);
  const xattn::safetensors_file f(w.bytes(), "both.safetensors");
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)xattn::load_cross_attention<float>(f, "blk.attn", {1}); },
      {"both.safetensors", "two attention layers under prefix 'blk.attn'", "hugging_face",
       "diffusers", "checkpoint_options::layout"}));
  xattn::checkpoint_options o;
  o.num_heads = 1;
  o.layout = checkpoint_layout::diffusers;  // naming one loads it
  EXPECT_EQ(xattn::checkpoint_config(f, "blk.attn", o).head_dim, 2);
}

TEST(Checkpoints, HeadCountsTheShapesDoNotAllowAreValueErrors) {
  const auto f = fixture("layout_t5");  // inner width 24
  const std::string p = "decoder.block.0.layer.1.EncDecAttention";
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { (void)xattn::checkpoint_config(f, p, {5}); },
                                              {"num_heads = 5 does not divide", "24"}));
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { (void)xattn::checkpoint_config(f, p, {0}); },
                                              {"num_heads is 0"}));
  EXPECT_EQ(xattn::checkpoint_config(f, p, {6}).head_dim, 4);  // any divisor is a valid reading
}

TEST(Checkpoints, FullConfigLoadsWhisperTakingItsBiasesFromTheFile) {
  // A config given in full (as before per-projection biases): bias = true and a file without a
  // k_proj bias load, the module then has no k bias.
  const auto f = fixture("layout_hf_whisper");
  xattn::cross_attention_config cfg;
  cfg.model_dim = 16;
  cfg.num_heads = 4;
  const auto m = xattn::load_cross_attention<float>(f, cfg, "model.decoder.layers.0.encoder_attn");
  EXPECT_FALSE(m.weights().k_proj.has_bias());
  EXPECT_TRUE(m.weights().q_proj.has_bias());
  cfg.k_bias = true;  // asked for explicitly, but the file has none
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] {
        (void)xattn::load_cross_attention<float>(f, cfg, "model.decoder.layers.0.encoder_attn");
      },
      {"tensor 'model.decoder.layers.0.encoder_attn.k_proj.bias' is missing"}));
  cfg.k_bias.reset();
  cfg.q_bias = false;  // ruled out, but the file has one: never dropped silently
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] {
        (void)xattn::load_cross_attention<float>(f, cfg, "model.decoder.layers.0.encoder_attn");
      },
      {"tensor 'model.decoder.layers.0.encoder_attn.q_proj.bias' is in the file"}));
}

}  // namespace
