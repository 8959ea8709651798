// SPDX-License-Identifier: MIT
// heatmap.hpp: the colour scale, well-formed SVG with escaped labels, and the argument errors.
#include "xattn/heatmap.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::throws_with;

// A small well-formedness check, enough for what heatmap_svg writes: tags nest and close in
// order, attribute values are quoted, '&' starts one of the five entities (or a numeric one),
// and no '<' or '>' appears in text. Returns an empty string or the first problem found.
std::string xml_problem(const std::string& xml) {
  std::vector<std::string> open;
  std::size_t n = 0;
  const auto entity_ok = [&](std::size_t at) {
    for (const char* e : {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;", "&#"})
      if (xml.compare(at, std::string(e).size(), e) == 0) return true;
    return false;
  };
  if (xml.compare(0, 5, "<?xml") == 0) n = xml.find("?>") + 2;
  while (n < xml.size()) {
    const char c = xml[n];
    if (c == '&' && !entity_ok(n)) return "bad entity at " + std::to_string(n);
    if (c == '>') return "stray '>' at " + std::to_string(n);
    if (c != '<') {
      ++n;
      continue;
    }
    const bool closing = n + 1 < xml.size() && xml[n + 1] == '/';
    std::size_t k = n + (closing ? 2 : 1);
    std::string name;
    while (k < xml.size() && (std::isalnum(static_cast<unsigned char>(xml[k])) || xml[k] == '-'))
      name += xml[k++];
    if (name.empty()) return "tag without a name at " + std::to_string(n);
    char quote = 0;  // scan to the end of the tag, skipping quoted attribute values
    for (; k < xml.size(); ++k) {
      if (quote) {
        if (xml[k] == quote)
          quote = 0;
        else if (xml[k] == '<')
          return "'<' in an attribute of <" + name + ">";
        else if (xml[k] == '&' && !entity_ok(k))
          return "bad entity in <" + name + ">";
      } else if (xml[k] == '"' || xml[k] == '\'') {
        if (xml[k - 1] != '=') return "unexpected quote in <" + name + ">";
        quote = xml[k];
      } else if (xml[k] == '=' && xml[k + 1] != '"' && xml[k + 1] != '\'') {
        return "unquoted attribute in <" + name + ">";
      } else if (xml[k] == '>') {
        break;
      }
    }
    if (k == xml.size()) return "unterminated <" + name + ">";
    const bool self_closing = xml[k - 1] == '/';
    if (closing) {
      if (open.empty() || open.back() != name) return "</" + name + "> closes nothing open";
      open.pop_back();
    } else if (!self_closing) {
      open.push_back(name);
    }
    n = k + 1;
  }
  return open.empty() ? "" : "<" + open.back() + "> is never closed";
}

std::size_t count(const std::string& text, const std::string& what) {
  std::size_t c = 0;
  for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++c;
  return c;
}

TEST(HeatmapColour, EndpointsAreTheEndsOfTheScale) {
  const xattn::heatmap_rgb lo = xattn::heatmap_colour(0.0), hi = xattn::heatmap_colour(1.0);
  const xattn::heatmap_rgb first = xattn::detail::heatmap_scale[0];
  const xattn::heatmap_rgb last = xattn::detail::heatmap_scale[4];
  EXPECT_EQ(lo.r, first.r);
  EXPECT_EQ(lo.g, first.g);
  EXPECT_EQ(lo.b, first.b);
  EXPECT_EQ(hi.r, last.r);
  EXPECT_EQ(hi.g, last.g);
  EXPECT_EQ(hi.b, last.b);
  // a custom range maps its ends the same way
  EXPECT_EQ(xattn::heatmap_colour(-3.0, -3.0, 5.0).g, first.g);
  EXPECT_EQ(xattn::heatmap_colour(5.0, -3.0, 5.0).g, last.g);
}

TEST(HeatmapColour, ClampsOutOfRangeAndInfinities) {
  const double inf = std::numeric_limits<double>::infinity();
  EXPECT_EQ(xattn::heatmap_colour(-0.5).r, xattn::heatmap_colour(0.0).r);
  EXPECT_EQ(xattn::heatmap_colour(-inf).g, xattn::heatmap_colour(0.0).g);
  EXPECT_EQ(xattn::heatmap_colour(7.0).g, xattn::heatmap_colour(1.0).g);
  EXPECT_EQ(xattn::heatmap_colour(inf).b, xattn::heatmap_colour(1.0).b);
  const xattn::heatmap_rgb nan = xattn::heatmap_colour(std::nan(""));
  EXPECT_EQ(nan.r, 128);
  EXPECT_EQ(nan.g, 128);
}

TEST(HeatmapColour, DarkensAsTheValueGrows) {
  double previous = 1e9;
  for (int s = 0; s <= 20; ++s) {
    const xattn::heatmap_rgb c = xattn::heatmap_colour(s / 20.0);
    const double luma = 0.299 * c.r + 0.587 * c.g + 0.114 * c.b;
    EXPECT_LT(luma, previous) << "at " << s / 20.0;
    previous = luma;
  }
}

TEST(HeatmapSvg, IsWellFormedWithOneCellPerValue) {
  std::vector<float> w = {0.1f, 0.7f, 0.2f, 0.0f, 0.5f, 0.5f};
  xattn::heatmap_options opts;
  opts.row_labels = {"the", "cat"};
  opts.col_labels = {"le", "chat", "dort"};
  opts.title = "weights";
  const std::string svg = xattn::heatmap_svg(xattn::make_view(w.data(), {2, 3}), opts);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_EQ(svg.rfind("<?xml", 0), 0u);
  EXPECT_NE(svg.find("xmlns=\"http://www.w3.org/2000/svg\""), std::string::npos);
  EXPECT_EQ(count(svg, "<title>the"), 3u);  // a tooltip per cell of row "the"
  EXPECT_EQ(count(svg, "</rect>"), 6u);     // the cells (the background and bar self-close)
  for (const char* word : {">le<", ">chat<", ">dort<", ">the<", ">cat<", "source (keys)"})
    EXPECT_NE(svg.find(word), std::string::npos) << word;
  EXPECT_NE(svg.find("0.70"), std::string::npos);  // values printed in the cells
}

TEST(HeatmapSvg, EscapesLabels) {
  std::vector<double> w = {0.25, 0.75};
  xattn::heatmap_options opts;
  opts.row_labels = {"<b>&\"x\"'"};
  opts.col_labels = {"a<b",
                     "c\x01"
                     "d"};
  opts.title = "A & B";
  const std::string svg = xattn::heatmap_svg(xattn::make_view(w.data(), {1, 2}), opts);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("&lt;b&gt;&amp;&quot;x&quot;&apos;"), std::string::npos);
  EXPECT_NE(svg.find("a&lt;b"), std::string::npos);
  EXPECT_NE(svg.find("c d"), std::string::npos);  // a control character becomes a space
  EXPECT_NE(svg.find("A &amp; B"), std::string::npos);
  EXPECT_EQ(xattn::detail::xml_escape("x<y && 'z'"), "x&lt;y &amp;&amp; &apos;z&apos;");
}

TEST(HeatmapSvg, DefaultLabelsAreIndicesAndStridedViewsWork) {
  // a column-major 2 x 3 matrix read as [2, 3] through strides
  const std::vector<float> w = {0.0f, 1.0f, 0.5f, 0.5f, 1.0f, 0.0f};
  const auto v = xattn::make_view(w.data(), {2, 3}, {1, 2});
  xattn::heatmap_options opts;
  opts.show_values = true;
  const std::string svg = xattn::heatmap_svg(v, opts);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("<title>1 \xe2\x86\x92 2: 0</title>"), std::string::npos);  // v(1, 2)
  EXPECT_NE(svg.find("<title>0 \xe2\x86\x92 2: 1</title>"), std::string::npos);  // v(0, 2)
}

TEST(HeatmapSvg, NonFiniteValuesStayWellFormed) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> s = {-inf, 2.0, std::nan(""), inf};
  xattn::heatmap_options opts;
  opts.vmin = -4;
  opts.vmax = 4;
  const std::string svg = xattn::heatmap_svg(xattn::make_view(s.data(), {2, 2}), opts);
  EXPECT_EQ(xml_problem(svg), "");
  EXPECT_NE(svg.find("-inf"), std::string::npos);
}

TEST(HeatmapSvg, RejectsBadArguments) {
  std::vector<float> w(6, 0.5f);
  const auto v = xattn::make_view(w.data(), {2, 3});
  xattn::heatmap_options opts;
  opts.col_labels = {"a", "b"};
  EXPECT_TRUE(
      throws_with<xattn::shape_error>([&] { (void)xattn::heatmap_svg(v, opts); },
                                      {"heatmap_svg: opts.col_labels has 2 labels, expected 3"}));
  opts = {};
  opts.row_labels = {"a", "b", "c"};
  EXPECT_TRUE(throws_with<xattn::shape_error>([&] { (void)xattn::heatmap_svg(v, opts); },
                                              {"opts.row_labels has 3 labels, expected 2"}));
  EXPECT_TRUE(throws_with<xattn::shape_error>(
      [&] {
        (void)xattn::heatmap_svg(xattn::make_view(w.data(), {0, 3}));
      },
      {"heatmap_svg: values is [0, 3]"}));
  opts = {};
  opts.vmin = 1.0;
  opts.vmax = 1.0;
  EXPECT_TRUE(
      throws_with<xattn::value_error>([&] { (void)xattn::heatmap_svg(v, opts); }, {"vmin < vmax"}));
  opts = {};
  opts.cell_size = 0;
  EXPECT_TRUE(throws_with<xattn::value_error>([&] { (void)xattn::heatmap_svg(v, opts); },
                                              {"opts.cell_size is 0"}));
}

TEST(HeatmapSvg, WritesTheFileAndNamesAnUnwritablePath) {
  std::vector<float> w = {0.25f, 0.75f};
  const auto v = xattn::make_view(w.data(), {1, 2});
  const std::string path = "test_heatmap_out.svg";
  xattn::write_heatmap_svg(path, v);
  std::ifstream in(path, std::ios::binary);
  std::stringstream read;
  read << in.rdbuf();
  EXPECT_EQ(read.str(), xattn::heatmap_svg(v));
  std::remove(path.c_str());

  EXPECT_TRUE(throws_with<xattn::io_error>(
      [&] { xattn::write_heatmap_svg("no-such-directory/map.svg", v); },
      {"write_heatmap_svg: cannot open 'no-such-directory/map.svg' for writing"}));
}

}  // namespace
