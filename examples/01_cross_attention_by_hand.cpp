// SPDX-License-Identifier: MIT
// 01: cross-attention by hand. The English words "the cat sleeps" look up their translations
// in the French sentence "le chat dort sur un lit".
//
// What you will learn:
//   - where Q, K and V come from in cross-attention, and their shapes [Lq, Dk], [Lk, Dk], [Lk, Dv]
//   - how scaled scores become attention weights (a softmax along each row)
//   - how to call xattn::attention and get the weights back through opts.weights_out
//   - that the library computes exactly the formula, by redoing it with plain Eigen
//   - how to draw the weights as an attention map (heatmap.hpp, heatmap_png.hpp)
// Run it:
//   cmake -S . -B build && cmake --build build --target 01_cross_attention_by_hand
//   ./build/examples/01_cross_attention_by_hand [output directory, default: the current one]
// What to expect: Q, K, V, the scores, a table of weights in which each English word puts most
// of its weight on its translation (the -> le, cat -> chat, sleeps -> dort), the output, the
// attention map written to 01_attention_map.svg (and .png), and "all checks passed" (the exit
// status is non-zero if a check fails).
#include "xattn/attention.hpp"
#include "xattn/heatmap.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"
#if XATTN_EXAMPLE_PNG  // set by examples/CMakeLists.txt where stb_image_write.h is installed
#  define STB_IMAGE_WRITE_IMPLEMENTATION  // stb's functions are compiled in this one file
#  include "xattn/heatmap_png.hpp"
#endif

#include <Eigen/Core>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <string>

namespace {

using matrix = xattn::row_matrix<float>;  // row-major: row i is word i

void print(const char* name, const matrix& m) {
  const Eigen::IOFormat fmt(3, 0, "  ", "\n", "    [", "]");
  std::cout << name << "  [" << m.rows() << ", " << m.cols() << "]\n" << m.format(fmt) << "\n\n";
}

}  // namespace

int main(int argc, char** argv) {
  // Every word is a vector of Dk = 4 hand-made "meaning" features:
  //   article, animal, sleeping, furniture
  // A real model learns such vectors (and projections to Q, K, V); here we write them down.
  const char* target[] = {"the", "cat", "sleeps"};                    // Lq = 3: it asks
  const char* source[] = {"le", "chat", "dort", "sur", "un", "lit"};  // Lk = 6: it is asked
  const Eigen::Index expected[] = {0, 1, 2};  // the -> le, cat -> chat, sleeps -> dort

  // Q: one query per target word, "what am I looking for?"         [Lq, Dk] = [3, 4]
  const matrix Q{
      {2, 0, 0, 0},  // the
      {0, 2, 0, 0},  // cat
      {0, 0, 2, 0},  // sleeps
  };
  // K: one key per source word, "what do I offer to be found by?"  [Lk, Dk] = [6, 4]
  const matrix K{
      {2, 0, 0, 0},        // le
      {0, 2, 0, 0},        // chat
      {0, 0, 2, 0},        // dort
      {0, 0, 0.5f, 0.5f},  // sur  (on: a little about places to sleep)
      {1, 0, 0, 0},        // un   (an article too, but "a", not "the": a weaker match)
      {0, 0, 0.5f, 2},     // lit  (bed: furniture, and a little about sleeping)
  };
  // V: what each source word hands over once it is attended to. It need not look like K; here
  // it is its part of speech (article, noun, verb), so Dv = 3 differs from Dk = 4.  [Lk, Dv]
  const matrix V{
      {1, 0, 0},  // le
      {0, 1, 0},  // chat
      {0, 0, 1},  // dort
      {0, 0, 0},  // sur (a preposition: none of the three)
      {1, 0, 0},  // un
      {0, 1, 0},  // lit
  };
  print("Q (target: the cat sleeps)", Q);
  print("K (source: le chat dort sur un lit)", K);
  print("V (source parts of speech: article, noun, verb)", V);

  // ---- with the library ------------------------------------------------------------------
  // attention() returns O = softmax(Q Kᵀ / sqrt(Dk)) V. To see the weights P as well, point
  // opts.weights_out at a [Lq, Lk] matrix; kernels take [B, H, Lq, Lk], and to_rank<4> views
  // our matrix as [1, 1, Lq, Lk] without copying.
  matrix P(Q.rows(), K.rows());
  xattn::attention_options<float> opts;
  opts.weights_out = xattn::to_rank<4>(xattn::make_view(P));
  const matrix O = xattn::attention(Q, K, V, opts);

  // ---- by hand, with Eigen -----------------------------------------------------------------
  const float scale = 1.0f / std::sqrt(float(Q.cols()));  // 1/sqrt(Dk) = 0.5
  const matrix S = scale * Q * K.transpose();             // scores [Lq, Lk]
  matrix P_hand(S.rows(), S.cols());
  for (Eigen::Index i = 0; i < S.rows(); ++i) {
    // softmax of row i; subtracting the row max first keeps exp() from overflowing
    const Eigen::RowVectorXf e = (S.row(i).array() - S.row(i).maxCoeff()).exp().matrix();
    P_hand.row(i) = e / e.sum();
  }
  const matrix O_hand = P_hand * V;

  print("S = Q K^T / sqrt(Dk), the scaled scores", S);
  std::cout << "P = softmax of each row of S, the attention weights  [" << P.rows() << ", "
            << P.cols() << "]\n        ";
  for (const char* word : source) std::printf("%7s", word);
  std::cout << "   expected peak\n";
  for (Eigen::Index i = 0; i < P.rows(); ++i) {
    std::printf("%8s", target[i]);
    for (Eigen::Index j = 0; j < P.cols(); ++j) std::printf("%7.3f", double(P(i, j)));
    std::printf("   %s\n", source[expected[i]]);
  }
  std::cout << "\n";
  // Each output row blends the V rows of the source words by their weights: "the" comes out
  // mostly article, "cat" mostly noun, "sleeps" mostly verb.
  print("O = P V, one row per target word (article, noun, verb)", O);

  // ---- the attention map: source words across, target words down ---------------------------
  const std::string dir = argc > 1 ? std::string(argv[1]) + "/" : "";
  xattn::heatmap_options map;
  map.row_labels = {std::begin(target), std::end(target)};
  map.col_labels = {std::begin(source), std::end(source)};
  map.title = "English words attending to French words";
  xattn::write_heatmap_svg(dir + "01_attention_map.svg", xattn::make_view(P), map);
#if XATTN_EXAMPLE_PNG
  xattn::write_heatmap_png(dir + "01_attention_map.png", xattn::make_view(P), map);
#endif
  std::cout << "attention map written to " << dir << "01_attention_map.svg\n\n";

  // ---- checks ------------------------------------------------------------------------------
  bool ok = true;
  for (Eigen::Index i = 0; i < P.rows(); ++i) {
    Eigen::Index peak = 0;
    P.row(i).maxCoeff(&peak);
    if (peak != expected[i]) {
      std::printf("FAILED: '%s' peaks on '%s', expected '%s'\n", target[i], source[peak],
                  source[expected[i]]);
      ok = false;
    }
    if (std::abs(P.row(i).sum() - 1.0f) > 1e-5f) {
      std::printf("FAILED: the weights of '%s' sum to %f, expected 1\n", target[i],
                  double(P.row(i).sum()));
      ok = false;
    }
  }
  const float p_err = (P - P_hand).cwiseAbs().maxCoeff();
  const float o_err = (O - O_hand).cwiseAbs().maxCoeff();
  std::printf("largest difference, library vs by hand: weights %.2g, output %.2g\n", double(p_err),
              double(o_err));
  if (!(p_err <= 1e-5f && o_err <= 1e-5f)) {
    std::printf("FAILED: the library and the hand computation differ by more than 1e-5\n");
    ok = false;
  }
  std::cout << (ok ? "all checks passed\n" : "some checks FAILED\n");
  return ok ? 0 : 1;
}
