// SPDX-License-Identifier: MIT
// config.hpp and version.hpp (one file for both). This file is compiled with -fno-exceptions: a bad
// argument then prints the error's message and aborts, which a death test observes.
#include "xattn/attention_naive.hpp"
#include "xattn/config.hpp"
#include "xattn/version.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

TEST(Config, IndexTypeIsSignedPointerDifference) {
  static_assert(std::is_same_v<xattn::index_t, std::ptrdiff_t>);
}

TEST(Config, VersionMacrosMatchThePackageVersion) {
  const std::string v = std::to_string(XATTN_VERSION_MAJOR) + "." +
                        std::to_string(XATTN_VERSION_MINOR) + "." +
                        std::to_string(XATTN_VERSION_PATCH);
  EXPECT_EQ(v, XATTN_TEST_EXPECTED_VERSION);
  EXPECT_EQ(XATTN_VERSION,
            XATTN_VERSION_MAJOR * 10000 + XATTN_VERSION_MINOR * 100 + XATTN_VERSION_PATCH);
}

void call_with_mismatched_head_dim() {
  float q[4] = {}, k[3] = {}, v[1] = {}, out[1] = {};
  xattn::naive_attention<float>(
      xattn::make_view(q, {1, 1, 1, 4}), xattn::make_view(k, {1, 1, 1, 3}),
      xattn::make_view(v, {1, 1, 1, 1}), xattn::make_view(out, {1, 1, 1, 1}));
}

TEST(ConfigDeathTest, WithoutExceptionsABadArgumentAbortsWithTheMessage) {
  EXPECT_DEATH(call_with_mismatched_head_dim(),
               "xattn: naive_attention: k.extent\\(3\\) is 3, expected 4");
}

}  // namespace
