// SPDX-License-Identifier: MIT
// Uses xattn the way a downstream program would: Eigen matrices in, Eigen matrix out. Returns
// non-zero if the result differs from a softmax computed here by hand.
#include <xattn/xattn.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdio>
#include <string>

#define CONSUMER_STR2(x) #x
#define CONSUMER_STR(x) CONSUMER_STR2(x)

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  // Cross-attention shapes: Lq = 2 queries, Lk = 4 keys, Dk = 3, Dv = 2.
  Eigen::MatrixXd Q(2, 3), K(4, 3), V(4, 2);
  Q << 0.5, -1.0, 0.25, 1.0, 0.0, -0.5;
  K << 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.5, -0.5;
  V << 1.0, 2.0, -1.0, 0.0, 3.0, 1.0, 0.0, -2.0;

  // Reference: O = softmax(Q Kᵀ / sqrt(Dk)) V, one row at a time.
  const Eigen::MatrixXd S = (Q * K.transpose()) / std::sqrt(3.0);
  Eigen::MatrixXd P(S.rows(), S.cols());
  for (Eigen::Index i = 0; i < S.rows(); ++i) {
    const Eigen::ArrayXd e = (S.row(i).array() - S.row(i).maxCoeff()).exp().transpose();
    P.row(i) = (e / e.sum()).matrix().transpose();
  }
  const Eigen::MatrixXd want = P * V;

  const auto O = xattn::attention(Q, K, V);
  check(O.rows() == 2 && O.cols() == 2, "the output is [Lq, Dv] = [2, 2]");
  if (O.rows() == 2 && O.cols() == 2) {
    const double err = (O - want).cwiseAbs().maxCoeff();
    if (!(err <= 1e-12)) std::fprintf(stderr, "max |O - reference| = %g\n", err);
    check(err <= 1e-12, "attention(Q, K, V) matches the reference");
  }

  // A query of zeros scores every key 0, so its output is the mean of V's rows: (0.75, 0.25).
  const auto O_zero = xattn::attention(Eigen::MatrixXd::Zero(1, 3), K, V);
  check(O_zero.rows() == 1 && O_zero.cols() == 2 && std::abs(O_zero(0, 0) - 0.75) < 1e-12 &&
            std::abs(O_zero(0, 1) - 0.25) < 1e-12,
        "a zero query averages the values");

  // Mismatched Dk is reported as a shape_error.
  bool threw = false;
  try {
    (void)xattn::attention(Q, Eigen::MatrixXd::Zero(4, 2), V);
  } catch (const xattn::shape_error&) {
    threw = true;
  }
  check(threw, "a K with the wrong width throws xattn::shape_error");

#ifdef CONSUMER_EXPECTED_VERSION
  const std::string version = CONSUMER_STR(XATTN_VERSION_MAJOR) "." CONSUMER_STR(
      XATTN_VERSION_MINOR) "." CONSUMER_STR(XATTN_VERSION_PATCH);
  if (version != CONSUMER_EXPECTED_VERSION)
    std::fprintf(stderr, "headers say %s, expected %s\n", version.c_str(),
                 CONSUMER_EXPECTED_VERSION);
  check(version == CONSUMER_EXPECTED_VERSION, "the headers report the expected version");
#endif

  if (failures == 0) std::printf("xattn consumer: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
