// SPDX-License-Identifier: MIT
// Attention maps as PNG images, in the colours of heatmap.hpp, encoded by stb_image_write
// (Debian: libstb-dev). Optional: xattn.hpp does not include this header.
//
// stb_image_write's functions must be defined exactly once in your program. Either define
// STB_IMAGE_WRITE_IMPLEMENTATION in one .cpp file before it includes this header (the examples
// do that), or link a library that already has them (Debian's libstb: `pkg-config --libs stb`).
#pragma once

#include "xattn/config.hpp"
#include "xattn/errors.hpp"
#include "xattn/heatmap.hpp"
#include "xattn/tensor_view.hpp"

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

// stb_image_write is C code that our warning flags (-Wconversion and friends) do not suit.
#if defined(__GNUC__) || defined(__clang__)
#  pragma GCC diagnostic push
#  pragma GCC diagnostic ignored "-Wconversion"
#  pragma GCC diagnostic ignored "-Wsign-conversion"
#  pragma GCC diagnostic ignored "-Wsign-compare"
#  pragma GCC diagnostic ignored "-Wunused-parameter"
#  pragma GCC diagnostic ignored "-Wunused-function"
#  pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#  pragma GCC diagnostic ignored "-Wimplicit-fallthrough"
#  pragma GCC diagnostic ignored "-Wcast-qual"
#  pragma GCC diagnostic ignored "-Wold-style-cast"
#  pragma GCC diagnostic ignored "-Wpedantic"
#elif defined(_MSC_VER)
#  pragma warning(push, 0)
#endif
#if __has_include(<stb/stb_image_write.h>)
#  include <stb/stb_image_write.h>
#else
#  include <stb_image_write.h>
#endif
#if defined(__GNUC__) || defined(__clang__)
#  pragma GCC diagnostic pop
#elif defined(_MSC_VER)
#  pragma warning(pop)
#endif

namespace xattn {

/// The size in pixels of heatmap_png's image for a [rows, cols] matrix: each cell is
/// opts.cell_size pixels square, and the colour scale takes a gap and a bar on the right.
struct heatmap_png_size {
  index_t width = 0;   ///< cols · cell + gap + bar, where gap = bar = max(4, cell / 2)
  index_t height = 0;  ///< rows · cell
};

/// The image size heatmap_png draws for a [rows, cols] matrix with opts.cell_size.
inline heatmap_png_size heatmap_png_dimensions(index_t rows, index_t cols,
                                               const heatmap_options& opts = {}) {
  const index_t cell = opts.cell_size, bar = std::max<index_t>(4, cell / 2);
  return {detail::checked_mul("heatmap_png", cols, cell) + 2 * bar,
          detail::checked_mul("heatmap_png", rows, cell)};
}

namespace detail {

/// The RGB pixels heatmap_png encodes, row by row, 3 bytes each; white where nothing is drawn.
template <class T>
std::vector<std::uint8_t> heatmap_pixels(const tensor_view<T, 2>& values,
                                         const heatmap_options& opts, heatmap_png_size size) {
  const index_t cell = opts.cell_size, bar = std::max<index_t>(4, cell / 2);
  const index_t grid_w = values.extent(1) * cell;
  std::vector<std::uint8_t> pixels(std::size_t(size.width * size.height * 3), 255);
  const auto put = [&](index_t x, index_t y, heatmap_rgb c) {
    std::uint8_t* p = &pixels[std::size_t((y * size.width + x) * 3)];
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  };
  const bool lines = cell >= 8;
  for (index_t y = 0; y < size.height; ++y) {
    const index_t i = y / cell;
    for (index_t x = 0; x < grid_w; ++x) {
      if (lines && (x % cell == cell - 1 || y % cell == cell - 1)) continue;
      put(x, y, heatmap_colour(static_cast<double>(values(i, x / cell)), opts.vmin, opts.vmax));
    }
    // the colour scale: the top row is vmax, the bottom row vmin
    const double t = size.height > 1 ? 1.0 - double(y) / double(size.height - 1) : 1.0;
    for (index_t x = grid_w + bar; x < size.width; ++x) put(x, y, heatmap_colour(t));
  }
  return pixels;
}

}  // namespace detail

/// A PNG image (the bytes of a .png file) of a matrix, in the colours heatmap_svg uses:
///
///   values [Lq, Lk]   row i (target token i) down, column j (source token j) across
///
/// Cells are opts.cell_size pixels square, separated by white lines when cells are at least 8
/// pixels; the colour scale runs from opts.vmin (bottom) to opts.vmax (top) on the right. PNG
/// pixels carry no text: labels and numbers are in the SVG. A shape_error if values is empty
/// or the image would be larger than 32767 pixels a side.
template <class T>
std::vector<std::uint8_t> heatmap_png(const tensor_view<T, 2>& values,
                                      const heatmap_options& opts = {}) {
  static_assert(std::is_floating_point_v<std::remove_const_t<T>>,
                "heatmap_png needs a floating-point element type");
  const index_t rows = values.extent(0), cols = values.extent(1);
  detail::heatmap_check_options("heatmap_png", opts, rows, cols);
  const heatmap_png_size size = heatmap_png_dimensions(rows, cols, opts);
  if (size.width > 32767 || size.height > 32767)
    detail::fail_shape(detail::message("heatmap_png: the image would be ", size.width, " x ",
                                       size.height, " pixels, more than 32767 a side"));
  const std::vector<std::uint8_t> pixels = detail::heatmap_pixels(values, opts, size);

  std::vector<std::uint8_t> png;
  const auto append = [](void* context, void* data, int bytes) {
    auto* out = static_cast<std::vector<std::uint8_t>*>(context);
    const auto* first = static_cast<const std::uint8_t*>(data);
    out->insert(out->end(), first, first + bytes);
  };
  const int ok = stbi_write_png_to_func(append, &png, static_cast<int>(size.width),
                                        static_cast<int>(size.height), 3, pixels.data(),
                                        static_cast<int>(size.width * 3));
  if (!ok || png.empty()) XATTN_THROW(io_error("heatmap_png: stb_image_write could not encode"));
  return png;
}

/// Writes heatmap_png(values, opts) to the file at `path`; an io_error naming the path if it
/// cannot be written.
template <class T>
void write_heatmap_png(const std::string& path, const tensor_view<T, 2>& values,
                       const heatmap_options& opts = {}) {
  const std::vector<std::uint8_t> png = heatmap_png(values, opts);
  detail::write_file("write_heatmap_png", path,
                     std::string(reinterpret_cast<const char*>(png.data()), png.size()));
}

}  // namespace xattn
