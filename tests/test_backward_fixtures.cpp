// SPDX-License-Identifier: MIT
// The backward pass against PyTorch's autograd, on the grad_*.safetensors fixtures that
// tests/make_fixtures.py wrote: naive_attention_backward and tiled_attention_backward on
// per-head tensors (key padding, grouped-query heads, bool and float masks, causal), and
// multi_head_cross_attention's training_backward against nn.MultiheadAttention (kdim/vdim,
// key padding, bool and float attn_mask, no bias, grouped-query heads), in float and double.
#include "xattn/attention_backward.hpp"
#include "xattn/checkpoints.hpp"
#include "xattn/cross_attention_backward.hpp"
#include "xattn/safetensors.hpp"

#include "test_support.hpp"
#include "torch_masks.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::all_close;

template <class T>
class BackwardFixtures : public ::testing::Test {};
TYPED_TEST_SUITE(BackwardFixtures, xattn_test::element_types, );

std::string fixture(const char* name) {
  return std::string(XATTN_TEST_FIXTURES_DIR) + "/" + name + ".safetensors";
}

index_t meta_int(const xattn::safetensors_file& f, const char* key) {
  return index_t(std::stoll(f.metadata().at(key)));
}

// A gradient computed in T from inputs exact in float: the forward's rounding (attention_tol)
// carried through the backward's products, which sum over Lq and Lk and, in the module, over
// projections as wide as `widest`.
template <class T>
double grad_tol(index_t widest, index_t len) {
  return 16.0 * xattn_test::attention_tol<T>(widest, len, 4.0) * std::sqrt(double(len));
}

template <class T>
xattn::tensor_view<const T, 4> view4(const xattn::safetensors_tensor<T>& t) {
  return {t.values.data(), {t.shape[0], t.shape[1], t.shape[2], t.shape[3]}};
}

template <class T>
void check_kernel_fixture(const char* name) {
  SCOPED_TRACE(name);
  const auto f = xattn::safetensors_file::load(fixture(name));
  const auto q = f.read<T>("q"), k = f.read<T>("k"), v = f.read<T>("v");
  const auto out = f.read<T>("output"), dout = f.read<T>("dout"), lse = f.read<T>("lse");
  const index_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], Dk = q.shape[3];
  const index_t Hkv = k.shape[1], Lk = k.shape[2], Dv = v.shape[3];
  xattn::attention_options<T> opts;
  std::vector<index_t> lengths;
  std::vector<T> lse_copy = lse.values;
  opts.lse_out = xattn::make_view(lse_copy.data(), {B, H, Lq});
  if (f.contains("kv_lengths"))
    for (double x : f.read<double>("kv_lengths", {B})) lengths.push_back(index_t(x));
  if (!lengths.empty()) opts.mask.kv_lengths = xattn::make_view<const index_t>(lengths.data(), {B});
  const xattn_test::torch_masks<T> masks(f, B, Lq, Lk);  // PyTorch's masks in xattn's terms
  masks.apply(opts.mask);
  const std::string causal = f.metadata().at("causal");
  if (causal == "top_left") opts.mask.causal = xattn::causal_mask::top_left;
  if (causal == "bottom_right") opts.mask.causal = xattn::causal_mask::bottom_right;

  const double tol = grad_tol<T>(std::max(Dk, Dv), std::max(Lq, Lk));
  for (int kernel = 0; kernel < 3; ++kernel) {
    SCOPED_TRACE(kernel == 0 ? "naive" : kernel == 1 ? "tiled" : "tiled 2 x 3 tiles, 2 threads");
    std::vector<T> dq(std::size_t(B * H * Lq * Dk), T(-7)),
        dk(std::size_t(B * Hkv * Lk * Dk), T(-7)), dv(std::size_t(B * Hkv * Lk * Dv), T(-7)),
        dbias(masks.bias.size(), T(-7));
    xattn::attention_grads<T> g{xattn::make_view(dq.data(), {B, H, Lq, Dk}),
                                xattn::make_view(dk.data(), {B, Hkv, Lk, Dk}),
                                xattn::make_view(dv.data(), {B, Hkv, Lk, Dv}), std::nullopt};
    if (!masks.bias.empty()) g.dbias = xattn::make_view(dbias.data(), {1, 1, Lq, Lk});
    if (kernel == 0)
      xattn::naive_attention_backward<T>(view4(q), view4(k), view4(v), view4(out), view4(dout), g,
                                         opts);
    else
      xattn::tiled_attention_backward<T>(
          view4(q), view4(k), view4(v), view4(out), view4(dout), g, opts,
          kernel == 1 ? xattn::tile_options{} : xattn::tile_options{2, 3, 2});
    EXPECT_TRUE(all_close(dq, f.read<double>("grad.q", q.shape), tol)) << "dq";
    EXPECT_TRUE(all_close(dk, f.read<double>("grad.k", k.shape), tol)) << "dk";
    EXPECT_TRUE(all_close(dv, f.read<double>("grad.v", v.shape), tol)) << "dv";
    if (!masks.bias.empty()) {
      EXPECT_TRUE(all_close(dbias, f.read<double>("grad.attn_mask_float", {Lq, Lk}), tol))
          << "dbias";
    }
  }
}

TYPED_TEST(BackwardFixtures, KernelsMatchAutogradWithGroupedHeadsAndKeyPadding) {
  check_kernel_fixture<TypeParam>("grad_kernel_gqa_key_padding");
}
TYPED_TEST(BackwardFixtures, KernelsMatchAutogradWithBoolMaskAndCausal) {
  check_kernel_fixture<TypeParam>("grad_kernel_bool_mask_causal");
}
TYPED_TEST(BackwardFixtures, KernelsMatchAutogradWithFloatMaskAndEmptyRows) {
  check_kernel_fixture<TypeParam>("grad_kernel_float_mask");
}

template <class T>
void check_module_fixture(const char* name) {
  SCOPED_TRACE(name);
  const auto f = xattn::safetensors_file::load(fixture(name));
  xattn::cross_attention_config cfg;
  cfg.model_dim = meta_int(f, "model_dim");
  cfg.context_dim = meta_int(f, "context_dim");
  cfg.value_context_dim = meta_int(f, "value_context_dim");
  cfg.num_heads = meta_int(f, "num_heads");
  cfg.num_kv_heads = meta_int(f, "num_kv_heads");
  cfg.bias = meta_int(f, "bias") != 0;
  cfg = cfg.resolved();
  const auto mha = xattn::load_cross_attention<T>(f, cfg, "attn.");
  const auto q = f.read<T>("query"), k = f.read<T>("key"), v = f.read<T>("value");
  const auto dout = f.read<T>("dout");
  const index_t B = q.shape[0], Lq = q.shape[1], Lk = k.shape[1];
  const auto view3 = [](const auto& t) {
    return xattn::tensor_view<const T, 3>(t.values.data(), {t.shape[0], t.shape[1], t.shape[2]});
  };
  xattn::cross_attention_options<T> opts;
  const xattn_test::torch_masks<T> masks(f, B, Lq, Lk);  // PyTorch's masks in xattn's terms
  if (masks.pad_view) opts.key_padding_mask = *masks.pad_view;
  masks.apply(opts.mask);
  const index_t widest = std::max({cfg.model_dim, cfg.context_dim, cfg.value_context_dim});
  const double tol = grad_tol<T>(widest, std::max(Lq, Lk));
  for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
    SCOPED_TRACE(kernel == xattn::attention_kernel::tiled ? "tiled" : "naive");
    opts.kernel = kernel;
    std::vector<T> out(std::size_t(B * Lq * cfg.model_dim)), dq(out.size()), dk(k.values.size()),
        dv(v.values.size());
    xattn::cross_attention_saved<T> saved;
    xattn::training_forward(mha, view3(q), view3(k), view3(v),
                            xattn::make_view(out.data(), {B, Lq, cfg.model_dim}), saved, opts);
    auto grads = xattn::zero_weights<T>(cfg);
    xattn::training_backward(mha, saved, view3(dout),
                             xattn::make_view(dq.data(), {B, Lq, cfg.model_dim}),
                             xattn::make_view(dk.data(), {B, Lk, cfg.context_dim}),
                             xattn::make_view(dv.data(), {B, Lk, cfg.value_context_dim}), grads);
    EXPECT_TRUE(all_close(out, f.read<double>("output", q.shape), tol)) << "output";
    EXPECT_TRUE(all_close(dq, f.read<double>("grad.query", q.shape), tol)) << "query";
    EXPECT_TRUE(all_close(dk, f.read<double>("grad.key", k.shape), tol)) << "key";
    EXPECT_TRUE(all_close(dv, f.read<double>("grad.value", v.shape), tol)) << "value";
    const std::pair<const char*, const xattn::linear<T>*> layers[] = {
        {"q_proj", &grads.q_proj},
        {"k_proj", &grads.k_proj},
        {"v_proj", &grads.v_proj},
        {"out_proj", &grads.out_proj}};
    for (const auto& [layer, g] : layers) {
      const std::string w = std::string("grad.") + layer + ".weight";
      const std::vector<T> gw(g->weight.data(), g->weight.data() + g->weight.size());
      EXPECT_TRUE(all_close(gw, f.read<double>(w, {g->weight.rows(), g->weight.cols()}), tol)) << w;
      if (g->has_bias()) {
        const std::string b = std::string("grad.") + layer + ".bias";
        const std::vector<T> gb(g->bias.data(), g->bias.data() + g->bias.size());
        EXPECT_TRUE(all_close(gb, f.read<double>(b, {g->bias.size()}), tol)) << b;
      }
    }
  }
}

TYPED_TEST(BackwardFixtures, ModuleMatchesAutogradKdimVdim) {
  check_module_fixture<TypeParam>("grad_mha_kdim_vdim");
}
TYPED_TEST(BackwardFixtures, ModuleMatchesAutogradPackedKeyPadding) {
  check_module_fixture<TypeParam>("grad_mha_packed_key_padding");
}
TYPED_TEST(BackwardFixtures, ModuleMatchesAutogradBoolAttnMask) {
  check_module_fixture<TypeParam>("grad_mha_bool_attn_mask");
}
TYPED_TEST(BackwardFixtures, ModuleMatchesAutogradFloatAttnMaskWithKeyPadding) {
  check_module_fixture<TypeParam>("grad_mha_float_attn_mask");
}
TYPED_TEST(BackwardFixtures, ModuleMatchesAutogradWithoutBias) {
  check_module_fixture<TypeParam>("grad_mha_no_bias");
}
TYPED_TEST(BackwardFixtures, ModuleMatchesAutogradGroupedQueryHeads) {
  check_module_fixture<TypeParam>("grad_gqa_hf_naming");
}

}  // namespace
