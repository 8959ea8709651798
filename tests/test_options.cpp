// SPDX-License-Identifier: MIT
// options.hpp: what the defaults mean, and that owned buffers drop into the option fields.
#include "xattn/options.hpp"

#include "xattn/attention_naive.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace {

using xattn::index_t;

TEST(AttentionOptions, DefaultsAskForNothing) {
  const xattn::attention_options<float> opts;
  EXPECT_FALSE(opts.scale.has_value());
  EXPECT_FALSE(opts.mask.kv_lengths.has_value());
  EXPECT_FALSE(opts.mask.allowed.has_value());
  EXPECT_FALSE(opts.mask.bias.has_value());
  EXPECT_EQ(opts.mask.causal, xattn::causal_mask::none);
  EXPECT_FALSE(opts.weights_out.has_value());
  EXPECT_FALSE(opts.lse_out.has_value());
}

TEST(AttentionOptions, UnsetScaleMeansOneOverSqrtHeadDim) {
  const auto q = xattn_test::random_tensor<double, 4>({1, 2, 3, 9}, 1);
  const auto k = xattn_test::random_tensor<double, 4>({1, 2, 5, 9}, 2);
  const auto v = xattn_test::random_tensor<double, 4>({1, 2, 5, 4}, 3);
  xattn_test::tensor<double, 4> by_default({1, 2, 3, 4}), explicit_scale({1, 2, 3, 4});
  xattn::naive_attention<double>(q.view(), k.view(), v.view(), by_default.view());
  xattn::attention_options<double> opts;
  opts.scale = 1.0 / 3.0;  // 1/sqrt(9)
  xattn::naive_attention<double>(q.view(), k.view(), v.view(), explicit_scale.view(), opts);
  // Equal up to the last bits only: Eigen may vectorise the two small products differently
  // when their buffers are aligned differently.
  EXPECT_TRUE(xattn_test::all_close(by_default.data, explicit_scale.data,
                                    4 * std::numeric_limits<double>::epsilon()));
}

TEST(AttentionOptions, MutableBuffersFillTheConstMaskFields) {
  // Masks are read-only to the kernels, but callers usually own mutable buffers.
  std::vector<index_t> lengths = {3, 1};
  std::vector<float> bias(2 * 4, 0.5f);
  std::unique_ptr<bool[]> allowed(new bool[4]{true, false, true, true});
  xattn::attention_options<float> opts;
  opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
  opts.mask.bias = xattn::make_view(bias.data(), {2, 1, 1, 4});
  opts.mask.allowed = xattn::make_view(allowed.get(), {1, 1, 1, 4});
  opts.mask.causal = xattn::causal_mask::bottom_right;
  EXPECT_EQ((*opts.mask.kv_lengths)(1), 1);
  EXPECT_EQ((*opts.mask.bias)(1, 0, 0, 3), 0.5f);
  EXPECT_FALSE((*opts.mask.allowed)(0, 0, 0, 1));
}

}  // namespace
