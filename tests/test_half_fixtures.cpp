// SPDX-License-Identifier: MIT
// Half precision against PyTorch: naive_attention and tiled_attention in bf16 on the
// half_kernel_*.safetensors fixtures that tests/make_fixtures.py wrote, where PyTorch computed
// the same attention in bf16 as its math path does (every step rounded to bf16). xattn's output
// must hold the accuracy rule with PyTorch's own bf16 result as the yardstick: at most twice its
// error against the exact result on the same inputs. (PyTorch 1.13 multiplies no fp16 matrices
// on the CPU, so there are no fp16 fixtures; tests/test_half.cpp checks fp16 by the same rule.)
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/safetensors.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using bf16 = Eigen::bfloat16;
using xattn::index_t;

std::string fixture(const char* name) {
  return std::string(XATTN_TEST_FIXTURES_DIR) + "/" + name + ".safetensors";
}

// A BF16 tensor of the file, read as float (exact) and rounded back (exact too), packed.
std::vector<bf16> read_bf16(const xattn::safetensors_file& f, const char* name,
                            std::vector<index_t>* shape = nullptr) {
  const auto t = f.read<float>(name);
  if (shape) shape->assign(t.shape.begin(), t.shape.end());
  std::vector<bf16> out;
  for (float x : t.values) out.push_back(bf16(x));
  return out;
}

void check_fixture(const char* name) {
  SCOPED_TRACE(name);
  const auto f = xattn::safetensors_file::load(fixture(name));
  std::vector<index_t> qs, ks, vs;
  const std::vector<bf16> q = read_bf16(f, "q", &qs), k = read_bf16(f, "k", &ks),
                          v = read_bf16(f, "v", &vs), torch_out = read_bf16(f, "output");
  const index_t B = qs[0], H = qs[1], Lq = qs[2], Lk = ks[2], Dv = vs[3];
  const xattn::tensor_view<const bf16, 4> qv(q.data(), {B, H, Lq, qs[3]}),
      kv(k.data(), {B, ks[1], Lk, ks[3]}), vv(v.data(), {B, vs[1], Lk, Dv});

  xattn::attention_options<bf16> opts;
  std::vector<index_t> lengths;
  if (f.contains("kv_lengths")) {
    for (float x : f.read<float>("kv_lengths").values) lengths.push_back(index_t(x));
    opts.mask.kv_lengths = xattn::make_view(lengths.data(), {B});
  }
  xattn_test::bool_mask allowed({1, 1, Lq, Lk}, true);
  if (f.contains("attn_mask_bool")) {
    const auto m = f.read<float>("attn_mask_bool");
    for (std::size_t n = 0; n < m.values.size(); ++n) allowed.data[n] = m.values[n] != 0.0f;
    opts.mask.allowed = allowed.cview();
  }
  std::vector<bf16> bias;
  if (f.contains("attn_mask_float")) {
    bias = read_bf16(f, "attn_mask_float");
    opts.mask.bias = xattn::tensor_view<const bf16, 4>(bias.data(), {1, 1, Lq, Lk});
  }
  const std::string causal = f.metadata().at("causal");
  if (causal == "top_left") opts.mask.causal = xattn::causal_mask::top_left;
  if (causal == "bottom_right") opts.mask.causal = xattn::causal_mask::bottom_right;

  // The yardstick first: PyTorch's bf16 result is within a few bf16 roundings of the exact
  // result of these options, so the fixture means what the options say (masks, scale). (It is
  // less accurate than plain_half_attention, whose sums are exact before they are rounded.)
  const auto exact = xattn_test::reference_attention<bf16>(qv, kv, vv, opts);
  EXPECT_TRUE(xattn_test::all_close(torch_out, exact.out,
                                    4.0 * double(Eigen::NumTraits<bf16>::epsilon())))
      << "PyTorch";

  std::vector<bf16> out(std::size_t(B * H * Lq * Dv), bf16(-7.0f));
  const xattn::tensor_view<bf16, 4> ov(out.data(), {B, H, Lq, Dv});
  xattn::naive_attention<bf16>(qv, kv, vv, ov, opts);
  EXPECT_TRUE(
      xattn_test::check_half_rule_against<bf16>(out, torch_out, "PyTorch", qv, kv, vv, opts))
      << "naive_attention";
  for (const index_t kv_tile : {index_t(0), index_t(7)}) {
    xattn::tile_options tiles;
    if (kv_tile > 0) tiles.kv_tile = kv_tile;
    std::fill(out.begin(), out.end(), bf16(-7.0f));
    xattn::tiled_attention<bf16>(qv, kv, vv, ov, opts, tiles);
    EXPECT_TRUE(
        xattn_test::check_half_rule_against<bf16>(out, torch_out, "PyTorch", qv, kv, vv, opts))
        << "tiled_attention kv_tile " << kv_tile;
  }
}

TEST(HalfFixtures, Bf16KernelsHoldTheRuleAgainstPyTorch) {
  for (const char* name : {"half_kernel_plain", "half_kernel_decoder_gqa", "half_kernel_masks"})
    check_fixture(name);
}

}  // namespace
