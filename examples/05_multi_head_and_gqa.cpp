// SPDX-License-Identifier: MIT
// 05: multi-head and grouped-query attention. A projection's output [B, L, H·D] holds H heads
// of width D side by side; split_heads views it as [B, H, L, D] without copying. With grouped-
// query attention (GQA) there are fewer key/value heads than query heads, and each K/V head is
// shared by a group of query heads.
//
// What you will learn:
//   - how heads split the width: head h owns columns h·D .. h·D + D - 1 of every row
//   - the strides that make split_heads free: the same buffer, read in a different order
//   - which K/V head each query head reads: h / (H / Hkv) (Hkv = 1 is multi-query attention)
//   - that a multi-head call is exactly H single-head attention() calls, one per head
// Run it:
//   cmake -S . -B build && cmake --build build --target 05_multi_head_and_gqa
//   ./build/examples/05_multi_head_and_gqa
// What to expect: the views' shapes and strides, a table of query head -> K/V head -> columns,
// the output of all heads side by side, and "all checks passed" (non-zero exit on failure).
#include "xattn/attention.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <utility>

using matrix = xattn::row_matrix<float>;
using xattn::index_t;

template <class T>
void describe(const char* name, const xattn::tensor_view<T, 4>& v) {
  std::printf("  %-4s [%td, %td, %td, %td]  strides {%td, %td, %td, %td}\n", name, v.extent(0),
              v.extent(1), v.extent(2), v.extent(3), v.stride(0), v.stride(1), v.stride(2),
              v.stride(3));
}

int main() {
  // B = 1, Lq = 2 target tokens, Lk = 3 source tokens, H = 4 query heads sharing Hkv = 2 K/V
  // heads, head width D = 2. Projections are given here; a layer would compute them.
  const index_t B = 1, Lq = 2, Lk = 3, H = 4, Hkv = 2, D = 2;
  matrix q_proj(Lq, H * D), k_proj(Lk, Hkv * D), v_proj(Lk, Hkv * D);  // [Lq, 8], [Lk, 4], [Lk, 4]
  for (index_t i = 0; i < q_proj.size(); ++i) q_proj.data()[i] = std::sin(0.7f * float(i));
  for (index_t i = 0; i < k_proj.size(); ++i) k_proj.data()[i] = std::cos(1.1f * float(i));
  for (index_t i = 0; i < v_proj.size(); ++i) v_proj.data()[i] = float(i % 5) - 2.0f;
  const Eigen::IOFormat fmt(3, 0, "  ", "\n", "    [", "]");
  std::cout << "q_proj [Lq, H*D] = [2, 8], heads side by side:\n" << q_proj.format(fmt) << "\n\n";

  // ---- views: [B, L, H*D] -> [B, H, L, D], no copies ----------------------------------------
  const auto q =
      xattn::split_heads(xattn::make_view(std::as_const(q_proj).data(), {B, Lq, H * D}), H);
  const auto k =
      xattn::split_heads(xattn::make_view(std::as_const(k_proj).data(), {B, Lk, Hkv * D}), Hkv);
  const auto v =
      xattn::split_heads(xattn::make_view(std::as_const(v_proj).data(), {B, Lk, Hkv * D}), Hkv);
  matrix out_naive(Lq, H * D), out_tiled(Lq, H * D);
  const auto o_naive = xattn::split_heads(xattn::make_view(out_naive.data(), {B, Lq, H * D}), H);
  const auto o_tiled = xattn::split_heads(xattn::make_view(out_tiled.data(), {B, Lq, H * D}), H);
  std::cout
      << "views (strides in elements: the head dimension steps D columns, a row steps H*D):\n";
  describe("q", q);
  describe("k", k);
  describe("v", v);
  describe("out", o_naive);
  std::printf("  q(0, 1, 0, 0) is q_proj(0, 2): %g == %g\n\n", double(q(0, 1, 0, 0)),
              double(q_proj(0, 2)));

  // ---- which K/V head each query head reads --------------------------------------------------
  const index_t group = H / Hkv;  // query heads per K/V head
  std::printf("query head  q columns   K/V head  k, v columns\n");
  for (index_t h = 0; h < H; ++h)
    std::printf("%10td  %4td..%-4td %9td  %5td..%td\n", h, h * D, h * D + D - 1, h / group,
                (h / group) * D, (h / group) * D + D - 1);

  // ---- all heads in one call, two kernels ---------------------------------------------------
  xattn::naive_attention<float>(q, k, v, o_naive);
  xattn::tiled_attention<float>(q, k, v, o_tiled);
  std::cout
      << "\nout [Lq, H*D], the heads' outputs side by side (ready for the output projection):\n"
      << out_naive.format(fmt) << "\n\n";

  // ---- checks: each head is one single-head attention() on column blocks ---------------------
  float worst_head = 0.0f;
  for (index_t h = 0; h < H; ++h) {
    const index_t g = h / group;
    const matrix o_h = xattn::attention(q_proj.middleCols(h * D, D), k_proj.middleCols(g * D, D),
                                        v_proj.middleCols(g * D, D));
    worst_head = std::max(worst_head, (o_h - out_naive.middleCols(h * D, D)).cwiseAbs().maxCoeff());
  }
  const float worst_tiled = (out_tiled - out_naive).cwiseAbs().maxCoeff();
  std::printf("largest difference: per-head attention() vs naive %.2g, tiled vs naive %.2g\n",
              double(worst_head), double(worst_tiled));
  const bool ok = worst_head <= 1e-6f && worst_tiled <= 1e-5f;
  std::printf(ok ? "all checks passed\n" : "FAILED: the kernels and the per-head calls differ\n");
  return ok ? 0 : 1;
}
