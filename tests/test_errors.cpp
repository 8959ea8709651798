// SPDX-License-Identifier: MIT
// errors.hpp: the error types and the message format of the argument checks.
#include "xattn/errors.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <stdexcept>
#include <type_traits>

namespace {

using xattn_test::throws_with;

TEST(Errors, AreInvalidArguments) {
  static_assert(std::is_base_of_v<std::invalid_argument, xattn::shape_error>);
  static_assert(std::is_base_of_v<std::invalid_argument, xattn::value_error>);
  EXPECT_THROW(xattn::detail::fail_shape("x"), std::invalid_argument);
  EXPECT_THROW(xattn::detail::fail_value("x"), std::invalid_argument);
}

TEST(Errors, RequireExtentNamesFunctionArgumentDimensionFoundAndExpected) {
  EXPECT_NO_THROW(xattn::detail::require_extent("tiled_attention", "v", 2, 64, 64));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [] { xattn::detail::require_extent("tiled_attention", "v", 2, 77, 64); },
      {"tiled_attention: v.extent(2) is 77, expected 64"}));
}

TEST(Errors, RequireExtentOrOneAcceptsBroadcast) {
  EXPECT_NO_THROW(xattn::detail::require_extent_or_one("f", "mask", 0, 1, 8));
  EXPECT_NO_THROW(xattn::detail::require_extent_or_one("f", "mask", 0, 8, 8));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [] { xattn::detail::require_extent_or_one("f", "mask", 1, 3, 8); },
      {"f: mask.extent(1) is 3, expected 1 or 8"}));
}

TEST(Errors, MessageJoinsParts) {
  EXPECT_EQ(xattn::detail::message("a", 1, ' ', 2.5, "b"), "a1 2.5b");
}

}  // namespace
