// SPDX-License-Identifier: MIT
// Attention maps as pictures: heatmap_svg draws a [Lq, Lk] matrix of weights as an SVG image
// with the source tokens across, the target tokens down and a colour scale, using nothing but
// the standard library. heatmap_png.hpp writes the same colours as a PNG.
#pragma once

#include "xattn/config.hpp"
#include "xattn/errors.hpp"
#include "xattn/tensor_view.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <ios>
#include <locale>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace xattn {

/// How heatmap_svg and heatmap_png draw a matrix.
struct heatmap_options {
  /// One label per row (the target tokens, down the left side); empty: 0, 1, 2, ...
  std::vector<std::string> row_labels;
  /// One label per column (the source tokens, across the top); empty: 0, 1, 2, ...
  std::vector<std::string> col_labels;
  std::string title;                          ///< drawn above the map (SVG); empty: none
  std::string row_axis = "target (queries)";  ///< the name of the vertical axis (SVG)
  std::string col_axis = "source (keys)";     ///< the name of the horizontal axis (SVG)
  double vmin = 0.0;   ///< the value drawn with the lightest colour; smaller values are clamped
  double vmax = 1.0;   ///< the value drawn with the darkest colour; larger values are clamped
  int cell_size = 32;  ///< pixels per cell side, >= 1
  bool show_values = true;  ///< print each value in its cell (SVG, when cell_size >= 28)
};

/// A colour with 8-bit red, green and blue channels.
struct heatmap_rgb {
  std::uint8_t r = 0;  ///< red
  std::uint8_t g = 0;  ///< green
  std::uint8_t b = 0;  ///< blue
};

namespace detail {

/// The colour scale: five colours from cream (0) to dark purple (1), interpolated linearly
/// between neighbours, darker as the value grows.
inline constexpr heatmap_rgb heatmap_scale[5] = {
    {255, 250, 235}, {252, 204, 138}, {238, 124, 78}, {183, 48, 92}, {62, 12, 84}};

inline void heatmap_check_options(const char* fn, const heatmap_options& opts, index_t rows,
                                  index_t cols) {
  if (rows < 1 || cols < 1)
    fail_shape(message(fn, ": values is [", rows, ", ", cols, "], expected at least one row and ",
                       "one column"));
  if (!opts.row_labels.empty() && index_t(opts.row_labels.size()) != rows)
    fail_shape(message(fn, ": opts.row_labels has ", opts.row_labels.size(), " labels, expected ",
                       rows, " (values.extent(0)) or none"));
  if (!opts.col_labels.empty() && index_t(opts.col_labels.size()) != cols)
    fail_shape(message(fn, ": opts.col_labels has ", opts.col_labels.size(), " labels, expected ",
                       cols, " (values.extent(1)) or none"));
  if (!(std::isfinite(opts.vmin) && std::isfinite(opts.vmax) && opts.vmin < opts.vmax))
    fail_value(message(fn, ": opts.vmin is ", opts.vmin, " and opts.vmax is ", opts.vmax,
                       ", expected finite values with vmin < vmax"));
  if (opts.cell_size < 1 || opts.cell_size > 4096)
    fail_value(message(fn, ": opts.cell_size is ", opts.cell_size, ", expected 1 to 4096"));
}

/// Text that may appear in XML character data and attribute values: the five special
/// characters become entities, control characters (invalid in XML 1.0) become spaces.
inline std::string xml_escape(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (const char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t' && c != '\n' && c != '\r')
          out += ' ';
        else
          out += c;
    }
  }
  return out;
}

/// Characters in UTF-8 text (continuation bytes are not counted), to estimate its width.
inline index_t utf8_length(const std::string& text) {
  index_t n = 0;
  for (const char c : text) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

/// A number in the "C" locale (a '.' decimal point whatever the global locale says).
inline std::string format_number(double x, int digits, bool fixed = true) {
  std::ostringstream out;
  out.imbue(std::locale::classic());
  if (fixed) out << std::fixed;
  out.precision(digits);
  out << x;
  return out.str();
}

inline std::string hex_colour(heatmap_rgb c) {
  const char* digits = "0123456789abcdef";
  std::string s = "#";
  for (const std::uint8_t v : {c.r, c.g, c.b}) {
    s += digits[v >> 4];
    s += digits[v & 15];
  }
  return s;
}

inline void write_file(const char* fn, const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary);
  if (!out) XATTN_THROW(io_error(message(fn, ": cannot open '", path, "' for writing")));
  out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  out.close();
  if (!out) XATTN_THROW(io_error(message(fn, ": writing '", path, "' failed")));
}

}  // namespace detail

/// The colour of `value` on the heatmap scale: vmin (and below, and -inf) is the lightest
/// colour, vmax (and above, and +inf) the darkest; NaN is mid grey.
inline heatmap_rgb heatmap_colour(double value, double vmin = 0.0, double vmax = 1.0) {
  if (std::isnan(value)) return {128, 128, 128};
  double t = (value - vmin) / (vmax - vmin);
  t = std::clamp(std::isnan(t) ? 0.0 : t, 0.0, 1.0);
  const double pos = t * 4.0;
  const int i = std::min(3, static_cast<int>(pos));
  const double f = pos - i;
  const heatmap_rgb a = detail::heatmap_scale[i], b = detail::heatmap_scale[i + 1];
  const auto mix = [f](std::uint8_t x, std::uint8_t y) {
    return static_cast<std::uint8_t>(std::lround(x + f * (y - x)));
  };
  return {mix(a.r, b.r), mix(a.g, b.g), mix(a.b, b.b)};
}

/// An SVG image of a matrix, typically attention weights (opts.weights_out of one batch item
/// and head):
///
///   values [Lq, Lk]   row i (target token i) down the left, column j (source token j) across
///
/// Each cell is coloured by heatmap_colour(values(i, j), opts.vmin, opts.vmax) and carries a
/// tooltip with its labels and value; a colour scale is drawn on the right. Labels may be any
/// UTF-8 text (XML characters are escaped). A shape_error if values is empty or a label list
/// has the wrong length, a value_error for a bad range or cell size.
template <class T>
std::string heatmap_svg(const tensor_view<T, 2>& values, const heatmap_options& opts = {}) {
  static_assert(std::is_floating_point_v<std::remove_const_t<T>>,
                "heatmap_svg needs a floating-point element type");
  const index_t rows = values.extent(0), cols = values.extent(1);
  detail::heatmap_check_options("heatmap_svg", opts, rows, cols);
  using detail::format_number;
  using detail::xml_escape;
  const auto label = [](const std::vector<std::string>& labels, index_t i) {
    return labels.empty() ? std::to_string(i) : labels[std::size_t(i)];
  };

  // Layout, in pixels. Text widths are estimates: 7 px per character of a 12 px sans-serif font.
  const double cell = opts.cell_size, char_w = 7.0, pad = 12.0, diag = 0.7071;
  index_t row_chars = 0, col_chars = 0;
  for (index_t i = 0; i < rows; ++i)
    row_chars = std::max(row_chars, detail::utf8_length(label(opts.row_labels, i)));
  for (index_t j = 0; j < cols; ++j)
    col_chars = std::max(col_chars, detail::utf8_length(label(opts.col_labels, j)));
  const double title_h = opts.title.empty() ? 0.0 : 24.0;
  const double left = pad + 18.0 + double(row_chars) * char_w + 8.0;  // axis name, labels
  const double top = pad + title_h + 18.0 + double(col_chars) * char_w * diag + 14.0;
  const double grid_w = double(cols) * cell, grid_h = double(rows) * cell;
  const double bar_x = left + grid_w + std::max(24.0, double(col_chars) * char_w * diag - cell);
  const double bar_w = 14.0, bar_h = std::max(grid_h, 80.0);
  const double row_axis_w = double(detail::utf8_length(opts.row_axis) + 2) * char_w;
  // The title is centred over the grid, moved right (and the image widened) if it is wider.
  const double title_w = double(detail::utf8_length(opts.title)) * 9.0;  // 15 px bold
  const double title_x = std::max(left + grid_w / 2, pad + title_w / 2);
  const double width = std::max(bar_x + bar_w + 6.0 + 7.0 * char_w, title_x + title_w / 2) + pad;
  const double height = std::max(top + bar_h, top + (grid_h + row_axis_w) / 2) + pad;
  const auto px = [](double x) { return format_number(x, 1); };

  std::ostringstream svg;
  svg.imbue(std::locale::classic());
  svg << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << px(width) << "\" height=\""
      << px(height) << "\" viewBox=\"0 0 " << px(width) << ' ' << px(height)
      << "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\" font-size=\"12\">\n";
  if (!opts.title.empty()) svg << "<title>" << xml_escape(opts.title) << "</title>\n";
  svg << "<defs><linearGradient id=\"xattn-heatmap-scale\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">";
  for (int s = 0; s < 5; ++s)
    svg << "<stop offset=\"" << format_number(s / 4.0, 2) << "\" stop-color=\""
        << detail::hex_colour(detail::heatmap_scale[s]) << "\"/>";
  svg << "</linearGradient></defs>\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  if (!opts.title.empty())
    svg << "<text x=\"" << px(title_x) << "\" y=\"" << px(pad + 14.0)
        << "\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">"
        << xml_escape(opts.title) << "</text>\n";
  svg << "<text x=\"" << px(left + grid_w / 2) << "\" y=\"" << px(pad + title_h + 12.0)
      << "\" text-anchor=\"middle\" font-style=\"italic\">" << xml_escape(opts.col_axis)
      << "</text>\n"
      << "<text transform=\"translate(" << px(pad + 12.0) << ',' << px(top + grid_h / 2)
      << ") rotate(-90)\" text-anchor=\"middle\" font-style=\"italic\">"
      << xml_escape(opts.row_axis) << "</text>\n";

  // Column labels slanted up and to the right from the top of their column, row labels
  // right-aligned against the grid.
  for (index_t j = 0; j < cols; ++j)
    svg << "<text transform=\"translate(" << px(left + (double(j) + 0.5) * cell) << ','
        << px(top - 6.0) << ") rotate(-45)\">" << xml_escape(label(opts.col_labels, j))
        << "</text>\n";
  for (index_t i = 0; i < rows; ++i)
    svg << "<text x=\"" << px(left - 6.0) << "\" y=\"" << px(top + (double(i) + 0.5) * cell + 4.0)
        << "\" text-anchor=\"end\">" << xml_escape(label(opts.row_labels, i)) << "</text>\n";

  // The cells, each with a tooltip, and their values when there is room.
  const bool numbers = opts.show_values && opts.cell_size >= 28;
  for (index_t i = 0; i < rows; ++i) {
    for (index_t j = 0; j < cols; ++j) {
      const double v = static_cast<double>(values(i, j));
      svg << "<rect x=\"" << px(left + double(j) * cell) << "\" y=\"" << px(top + double(i) * cell)
          << "\" width=\"" << px(cell) << "\" height=\"" << px(cell) << "\" fill=\""
          << detail::hex_colour(heatmap_colour(v, opts.vmin, opts.vmax))
          << "\" stroke=\"white\" stroke-width=\"1\"><title>"
          << xml_escape(label(opts.row_labels, i)) << " \xe2\x86\x92 "
          << xml_escape(label(opts.col_labels, j)) << ": " << format_number(v, 4, false)
          << "</title></rect>\n";
      if (numbers) {
        const double t = (v - opts.vmin) / (opts.vmax - opts.vmin);
        svg << "<text x=\"" << px(left + (double(j) + 0.5) * cell) << "\" y=\""
            << px(top + (double(i) + 0.5) * cell + 3.5) << "\" text-anchor=\"middle\" "
            << "font-size=\"10\" fill=\"" << (t > 0.55 ? "white" : "black") << "\">"
            << (std::isfinite(v) ? format_number(v, std::abs(v) < 10 ? 2 : 0) : format_number(v, 0))
            << "</text>\n";
      }
    }
  }

  // The colour scale: a bar from vmin (bottom) to vmax (top) with three ticks.
  svg << "<rect x=\"" << px(bar_x) << "\" y=\"" << px(top) << "\" width=\"" << px(bar_w)
      << "\" height=\"" << px(bar_h) << "\" fill=\"url(#xattn-heatmap-scale)\" stroke=\"#444\" "
      << "stroke-width=\"0.5\"/>\n";
  for (int s = 0; s <= 2; ++s) {
    const double value = opts.vmin + (opts.vmax - opts.vmin) * s / 2.0;
    const double y = top + bar_h * (1.0 - s / 2.0);
    svg << "<line x1=\"" << px(bar_x + bar_w) << "\" y1=\"" << px(y) << "\" x2=\""
        << px(bar_x + bar_w + 4.0) << "\" y2=\"" << px(y) << "\" stroke=\"#444\"/>"
        << "<text x=\"" << px(bar_x + bar_w + 6.0) << "\" y=\"" << px(y + 4.0) << "\">"
        << format_number(value, 3, false) << "</text>\n";
  }
  svg << "</svg>\n";
  return svg.str();
}

/// Writes heatmap_svg(values, opts) to the file at `path`; an io_error naming the path if it
/// cannot be written.
template <class T>
void write_heatmap_svg(const std::string& path, const tensor_view<T, 2>& values,
                       const heatmap_options& opts = {}) {
  detail::write_file("write_heatmap_svg", path, heatmap_svg(values, opts));
}

}  // namespace xattn
