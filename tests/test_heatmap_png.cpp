// SPDX-License-Identifier: MIT
// heatmap_png.hpp: a valid PNG signature and header with the documented dimensions, cell
// colours from the shared scale, and the argument and file errors.
#define STB_IMAGE_WRITE_IMPLEMENTATION  // this test is the one translation unit that defines it
#include "xattn/heatmap_png.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::throws_with;

// A PNG file starts with an 8-byte signature, then the IHDR chunk: length (4 bytes), "IHDR",
// width and height (4 bytes each, big-endian), bit depth and colour type (1 byte each).
struct png_header {
  bool signature_ok = false;
  std::uint32_t width = 0, height = 0;
  int bit_depth = 0, colour_type = 0;
};

png_header read_header(const std::vector<std::uint8_t>& png) {
  png_header h;
  const std::uint8_t signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (png.size() < 26) return h;
  h.signature_ok = std::equal(signature, signature + 8, png.begin()) &&
                   std::string(png.begin() + 12, png.begin() + 16) == "IHDR";
  const auto be32 = [&](std::size_t at) {
    return std::uint32_t(png[at]) << 24 | std::uint32_t(png[at + 1]) << 16 |
           std::uint32_t(png[at + 2]) << 8 | std::uint32_t(png[at + 3]);
  };
  h.width = be32(16);
  h.height = be32(20);
  h.bit_depth = png[24];
  h.colour_type = png[25];
  return h;
}

TEST(HeatmapPng, HeaderHasTheDocumentedDimensions) {
  std::vector<float> w(3 * 7, 0.5f);
  const auto v = xattn::make_view(w.data(), {3, 7});
  for (const int cell : {1, 5, 16, 32}) {
    xattn::heatmap_options opts;
    opts.cell_size = cell;
    const xattn::heatmap_png_size size = xattn::heatmap_png_dimensions(3, 7, opts);
    const index_t bar = std::max(4, cell / 2);
    EXPECT_EQ(size.width, 7 * cell + 2 * bar);
    EXPECT_EQ(size.height, 3 * cell);
    const png_header h = read_header(xattn::heatmap_png(v, opts));
    EXPECT_TRUE(h.signature_ok);
    EXPECT_EQ(index_t(h.width), size.width) << "cell " << cell;
    EXPECT_EQ(index_t(h.height), size.height) << "cell " << cell;
    EXPECT_EQ(h.bit_depth, 8);
    EXPECT_EQ(h.colour_type, 2);  // RGB
  }
}

TEST(HeatmapPng, PixelsUseTheColourScale) {
  std::vector<float> w = {0.0f, 1.0f, 0.25f, 3.0f, -2.0f, 0.5f};  // [2, 3]
  const auto v = xattn::make_view(w.data(), {2, 3});
  xattn::heatmap_options opts;
  opts.cell_size = 10;
  const xattn::heatmap_png_size size = xattn::heatmap_png_dimensions(2, 3, opts);
  const std::vector<std::uint8_t> px = xattn::detail::heatmap_pixels(v, opts, size);
  ASSERT_EQ(px.size(), std::size_t(size.width * size.height * 3));
  const auto at = [&](index_t x, index_t y) {
    const std::uint8_t* p = &px[std::size_t((y * size.width + x) * 3)];
    return xattn::heatmap_rgb{p[0], p[1], p[2]};
  };
  const auto same = [](xattn::heatmap_rgb a, xattn::heatmap_rgb b) {
    return a.r == b.r && a.g == b.g && a.b == b.b;
  };
  for (index_t i = 0; i < 2; ++i)
    for (index_t j = 0; j < 3; ++j)  // the middle of each cell, clamped to [vmin, vmax]
      EXPECT_TRUE(same(at(j * 10 + 4, i * 10 + 4), xattn::heatmap_colour(double(v(i, j)))))
          << i << ", " << j;
  EXPECT_TRUE(same(at(9, 0), {255, 255, 255}));  // the white line between cells
  EXPECT_TRUE(same(at(size.width - 1, 0), xattn::heatmap_colour(1.0)));  // the scale's top
  EXPECT_TRUE(same(at(size.width - 1, size.height - 1), xattn::heatmap_colour(0.0)));
}

TEST(HeatmapPng, WritesTheFileAndNamesAnUnwritablePath) {
  std::vector<double> w = {0.0, 0.25, 0.5, 1.0};
  const auto v = xattn::make_view(w.data(), {2, 2});
  const std::string path = "test_heatmap_out.png";
  xattn::write_heatmap_png(path, v);
  std::ifstream in(path, std::ios::binary);
  const std::vector<std::uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                                        std::istreambuf_iterator<char>());
  EXPECT_EQ(bytes, xattn::heatmap_png(v));
  EXPECT_TRUE(read_header(bytes).signature_ok);
  std::remove(path.c_str());

  EXPECT_TRUE(throws_with<xattn::io_error>(
      [&] { xattn::write_heatmap_png("no-such-directory/map.png", v); },
      {"write_heatmap_png: cannot open 'no-such-directory/map.png'"}));
}

TEST(HeatmapPng, RejectsBadShapes) {
  std::vector<float> w(8, 0.5f);
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::heatmap_png(xattn::make_view(w.data(), {4, 0}));
      },
      {"heatmap_png: values is [4, 0]"}));
  xattn::heatmap_options opts;
  opts.cell_size = 4096;
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::heatmap_png(xattn::make_view(w.data(), {1, 8}), opts);
      },
      {"more than 32767 a side"}));
  opts = {};
  opts.row_labels = {"only one"};
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::heatmap_png(xattn::make_view(w.data(), {2, 2}), opts);
      },
      {"opts.row_labels has 1 labels, expected 2"}));
}

}  // namespace
