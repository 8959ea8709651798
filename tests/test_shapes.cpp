// SPDX-License-Identifier: MIT
// shapes.hpp: the FLOP count benchmarks report and the key/value head default.
#include "xattn/shapes.hpp"

#include <gtest/gtest.h>

namespace {

TEST(AttentionShape, FlopsCountBothGemms) {
  xattn::attention_shape s;
  s.batch = 2;
  s.num_heads = 8;
  s.q_len = 128;
  s.kv_len = 77;
  s.head_dim = 40;
  s.value_dim = 40;
  EXPECT_DOUBLE_EQ(xattn::attention_flops(s), 4.0 * 2 * 8 * 128 * 77 * 40);
  s.value_dim = 10;  // Q Kᵀ costs 2·Lq·Lk·Dk, P V costs 2·Lq·Lk·Dv
  EXPECT_DOUBLE_EQ(xattn::attention_flops(s), 2.0 * 2 * 8 * 128 * 77 * (40 + 10));
}

TEST(AttentionShape, KvHeadsDefaultToQueryHeads) {
  xattn::attention_shape s;
  s.num_heads = 8;
  EXPECT_EQ(s.kv_heads(), 8);
  s.num_kv_heads = 2;
  EXPECT_EQ(s.kv_heads(), 2);
}

}  // namespace
