// SPDX-License-Identifier: MIT
// 02: self-attention and cross-attention are the same computation. What differs is where the
// keys and values come from: from the sequence itself, or from another sequence.
//
// What you will learn:
//   - one function, attend(x_query, x_context), does both: self-attention is attend(x, x)
//   - in self-attention the weights are square [L, L]; in cross-attention they are [Lq, Lk]
//     and the output has one row per query whatever the length of the context
//   - queries do not see each other: each output row depends only on its own query
//   - without position information the context is a set: shuffling it changes nothing
// Run it:
//   cmake -S . -B build && cmake --build build --target 02_self_vs_cross_attention
//   ./build/examples/02_self_vs_cross_attention
// What to expect: the shapes of Q, K, V, P and O for both cases, the two weight matrices, and
// "all checks passed" (the exit status is non-zero if a check fails).
#include "xattn/attention.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <cmath>
#include <cstdio>
#include <iostream>

namespace {

using matrix = xattn::row_matrix<double>;

// Deterministic "embeddings" and projection weights, so every run prints the same numbers.
matrix filled(Eigen::Index rows, Eigen::Index cols, double seed) {
  matrix m(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i)
    for (Eigen::Index j = 0; j < cols; ++j)
      m(i, j) = std::sin(seed + 0.9 * double(i) + 1.7 * double(j));
  return m;
}

const Eigen::Index model_dim = 6, head_dim = 4, value_dim = 3;
const matrix W_q = filled(model_dim, head_dim, 0.1);   // [Dm, Dk]
const matrix W_k = filled(model_dim, head_dim, 0.2);   // [Dm, Dk]
const matrix W_v = filled(model_dim, value_dim, 0.3);  // [Dm, Dv]

// The attention layer. Queries are projected from x_query; keys and values from x_context.
// Returns O [Lq, Dv] and writes the weights P [Lq, Lk].
matrix attend(const matrix& x_query, const matrix& x_context, matrix& P, bool verbose) {
  const matrix Q = x_query * W_q, K = x_context * W_k, V = x_context * W_v;
  P.resize(Q.rows(), K.rows());
  xattn::attention_options<double> opts;
  opts.weights_out = xattn::to_rank<4>(xattn::make_view(P));
  matrix O = xattn::attention(Q, K, V, opts);
  if (verbose)
    std::printf("  Q [%td, %td]  K [%td, %td]  V [%td, %td]  ->  P [%td, %td]  O [%td, %td]\n",
                Q.rows(), Q.cols(), K.rows(), K.cols(), V.rows(), V.cols(), P.rows(), P.cols(),
                O.rows(), O.cols());
  return O;
}

void print(const char* name, const matrix& m) {
  const Eigen::IOFormat fmt(3, 0, "  ", "\n", "    [", "]");
  std::cout << name << "  [" << m.rows() << ", " << m.cols() << "]\n" << m.format(fmt) << "\n\n";
}

bool check(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok    " : "FAILED", what);
  return ok;
}

}  // namespace

int main() {
  const matrix x = filled(4, model_dim, 1.0);  // a sequence of L = 4 tokens     [L, Dm]
  const matrix y = filled(2, model_dim, 2.0);  // another one, of Lq = 2 tokens  [Lq, Dm]

  // ---- self-attention: x attends to x ------------------------------------------------------
  std::cout << "self-attention, attend(x, x):\n";
  matrix P_self;
  const matrix O_self = attend(x, x, P_self, true);
  print("P: every token of x weighs every token of x (square)", P_self);

  // ---- cross-attention: y attends to x -----------------------------------------------------
  std::cout << "cross-attention, attend(y, x):\n";
  matrix P_cross;
  const matrix O_cross = attend(y, x, P_cross, true);
  print("P: each token of y weighs the tokens of x (Lq rows, Lk columns)", P_cross);
  print("O: one row per token of y, made of values of x", O_cross);

  // ---- checks ------------------------------------------------------------------------------
  bool ok = true;
  matrix P_tmp;
  ok &= check(O_self.rows() == x.rows() && O_cross.rows() == y.rows() && P_cross.cols() == x.rows(),
              "self gives [L, Dv], cross gives [Lq, Dv] with Lk = L weights per row");

  // Queries are independent: attending with y's second token alone gives O_cross's second row.
  const matrix O_one = attend(y.row(1), x, P_tmp, false);
  ok &= check((O_one.row(0) - O_cross.row(1)).cwiseAbs().maxCoeff() < 1e-12,
              "one query on its own gets the same output row as in the batch of queries");

  // The context is a set: reversing x's tokens reverses P's columns and leaves O unchanged.
  const matrix x_reversed = x.colwise().reverse();
  matrix P_rev;
  const matrix O_rev = attend(y, x_reversed, P_rev, false);
  ok &= check((O_rev - O_cross).cwiseAbs().maxCoeff() < 1e-12,
              "shuffling the context leaves the output unchanged");
  ok &= check((P_rev.rowwise().reverse() - P_cross).cwiseAbs().maxCoeff() < 1e-12,
              "... and moves the weights with the keys");

  // Self-attention is not order-blind on its query side: reversing x reverses O's rows.
  const matrix O_self_rev = attend(x_reversed, x_reversed, P_tmp, false);
  ok &= check((O_self_rev.colwise().reverse() - O_self).cwiseAbs().maxCoeff() < 1e-12,
              "reversing x in self-attention reverses the output rows");

  std::cout << (ok ? "all checks passed\n" : "some checks FAILED\n");
  return ok ? 0 : 1;
}
