// SPDX-License-Identifier: MIT
// 04: the online softmax, the trick behind memory-efficient attention. One query row meets its
// keys a tile at a time; a running max, a running sum and an unnormalised output are enough to
// end with exactly the softmax-weighted sum, without ever holding all the scores at once.
//
// What you will learn:
//   - the update for each tile of keys with scores s_j (tiled_attention's kernel idea):
//       m_new = max(m, max_j s_j),  c = exp(m - m_new)
//       l   = c·l   + Σ_j exp(s_j - m_new)
//       acc = c·acc + Σ_j exp(s_j - m_new) · v_j          out = acc / l at the end
//   - why subtracting the running max matters: two scores here are 100 and 99, and exp(100)
//     does not fit in a float, yet every exp() above is at most 1
//   - that acc / l after each tile is already the attention over the keys seen so far
//   - that log(l) + m is the row's log-sum-exp (what opts.lse_out returns)
// Run it:
//   cmake -S . -B build && cmake --build build --target 04_online_softmax
//   ./build/examples/04_online_softmax
// What to expect: a table with one line per tile (m, c, l, acc / l), then the final output next
// to naive_attention's and tiled_attention's, and "all checks passed" (non-zero exit on failure).
#include "xattn/attention.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <utility>

using matrix = xattn::row_matrix<float>;
using xattn::index_t;

int main() {
  const index_t kv_len = 10, head_dim = 4, value_dim = 3, kv_tile = 4;  // tiles of 4, 4 and 2
  matrix q(1, head_dim), K(kv_len, head_dim), V(kv_len, value_dim);
  for (index_t d = 0; d < head_dim; ++d) q(0, d) = float(d + 1);  // q = [1, 2, 3, 4]
  for (index_t j = 0; j < kv_len; ++j) {
    for (index_t d = 0; d < head_dim; ++d) K(j, d) = std::cos(0.8f * float(j) + 1.3f * float(d));
    for (index_t d = 0; d < value_dim; ++d) V(j, d) = std::sin(0.5f * float(j) - float(d));
  }
  const float scale = 1.0f / std::sqrt(float(head_dim));  // 1/sqrt(Dk) = 0.5
  // Two keys that match q very well: keys 6 and 9 point along q, with scores 100 and 99.
  K.row(6) = q * (100.0f / (scale * q.squaredNorm()));
  K.row(9) = q * (99.0f / (scale * q.squaredNorm()));
  std::printf("scores s_j = q·k_j / sqrt(Dk):");
  for (index_t j = 0; j < kv_len; ++j) std::printf(" %.2f", double(scale * q.row(0).dot(K.row(j))));
  std::printf("\nexp(100) in float is %g: without the max, the sum would overflow\n\n",
              double(std::exp(100.0f)));

  // ---- by hand, tile by tile ---------------------------------------------------------------
  float m = -std::numeric_limits<float>::infinity();             // running max of the scores seen
  float l = 0.0f;                                                // running sum of exp(s_j - m)
  Eigen::RowVectorXf acc = Eigen::RowVectorXf::Zero(value_dim);  // running Σ exp(s_j - m) v_j
  bool prefix_ok = true;
  std::printf("tile  keys    max_j s_j        m        c          l   acc / l\n");
  for (index_t start = 0; start < kv_len; start += kv_tile) {
    const index_t n = std::min(kv_tile, kv_len - start);
    const Eigen::RowVectorXf s = scale * q * K.middleRows(start, n).transpose();  // [1, n]
    const float m_new = std::max(m, s.maxCoeff());
    const float c = std::exp(m - m_new);  // rescales the sums made against the old max (0 at first)
    const Eigen::RowVectorXf e = (s.array() - m_new).exp().matrix();  // each <= 1
    l = c * l + e.sum();
    acc = c * acc + e * V.middleRows(start, n);
    m = m_new;
    const Eigen::RowVectorXf partial = acc / l;
    std::printf("%4td  %2td..%-2td %9.3f %8.3f %8.2g %10.4f   [%.4f, %.4f, %.4f]\n",
                start / kv_tile, start, start + n - 1, double(s.maxCoeff()), double(m), double(c),
                double(l), double(partial(0)), double(partial(1)), double(partial(2)));
    // acc / l is the attention of q over keys 0 .. start + n - 1: check it with the library
    const matrix seen = xattn::attention(q, K.topRows(start + n), V.topRows(start + n));
    prefix_ok &= (seen.row(0) - partial).cwiseAbs().maxCoeff() <= 1e-5f;
  }
  const Eigen::RowVectorXf out = acc / l;
  const float lse = m + std::log(l);

  // ---- the library: naive (all scores at once) and tiled --------------------------------------
  matrix naive(1, value_dim), tiled(1, value_dim);
  float naive_lse = 0.0f;
  xattn::attention_options<float> opts;
  opts.lse_out = xattn::make_view(&naive_lse, {1, 1, 1});
  const auto q4 = xattn::to_rank<4>(xattn::make_view(std::as_const(q)));
  const auto k4 = xattn::to_rank<4>(xattn::make_view(std::as_const(K)));
  const auto v4 = xattn::to_rank<4>(xattn::make_view(std::as_const(V)));
  xattn::naive_attention<float>(q4, k4, v4, xattn::to_rank<4>(xattn::make_view(naive)), opts);
  xattn::tile_options tiles;
  tiles.kv_tile = kv_tile;
  xattn::tiled_attention<float>(q4, k4, v4, xattn::to_rank<4>(xattn::make_view(tiled)), {}, tiles);
  std::printf("\nout = acc / l          [%.6f, %.6f, %.6f]   lse = m + log(l) = %.5f\n",
              double(out(0)), double(out(1)), double(out(2)), double(lse));
  std::printf("naive_attention        [%.6f, %.6f, %.6f]   lse_out          = %.5f\n",
              double(naive(0, 0)), double(naive(0, 1)), double(naive(0, 2)), double(naive_lse));
  std::printf("tiled_attention        [%.6f, %.6f, %.6f]\n\n", double(tiled(0, 0)),
              double(tiled(0, 1)), double(tiled(0, 2)));

  // ---- checks ------------------------------------------------------------------------------
  const float tol = 1e-5f;  // float rounding over 10 keys, with outputs of size about 1
  bool ok = true;
  const auto check = [&ok](bool pass, const char* what) {
    std::printf("%s: %s\n", pass ? "ok    " : "FAILED", what);
    ok &= pass;
  };
  check(prefix_ok, "after each tile, acc / l is the attention over the keys seen so far");
  check((out - naive.row(0)).cwiseAbs().maxCoeff() <= tol,
        "the online result equals naive_attention");
  check((tiled - naive).cwiseAbs().maxCoeff() <= tol, "tiled_attention agrees with both");
  check(std::abs(lse - naive_lse) <= tol * std::abs(naive_lse), "m + log(l) is the log-sum-exp");
  check(std::isfinite(l) && l >= 1.0f, "l stayed finite: the largest term is exp(0) = 1");
  std::printf(ok ? "all checks passed\n" : "some checks FAILED\n");
  return ok ? 0 : 1;
}
