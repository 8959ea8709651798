// SPDX-License-Identifier: MIT
// detail/gemm.hpp, the projections' matrix product, on every level this machine runs and on
// the emulated avx512 level: each element of C against a long-double reference within the
// error bound of a sum of k products, on odd shapes (edges of the micro-kernel, more rows than
// one work item, more columns than one packed block of B, more depth than one panel), on every
// layout (A and B transposed or not, padded leading dimensions), with and without the bias and
// accumulation; the bits independent of the thread count; nothing outside C written.
#include "xattn/detail/gemm.hpp"
#include "xattn/dispatch.hpp"
#include "xattn/projection.hpp"

#include "emulated_levels.hpp"
#include "kernels.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace {

using xattn::index_t;
using xattn::detail::cpu_level;
using xattn::detail::gemm_args;
using xattn::detail::gemm_kernels;

struct named_loops {
  std::string name;
  const gemm_kernels<float>* floats;
  const gemm_kernels<double>* doubles;
};

// Every level of this build that this CPU runs natively, then the emulated one (on AVX2).
std::vector<named_loops> all_loops() {
  std::vector<named_loops> out;
  for (cpu_level l : xattn::detail::built_levels)
    if (xattn::detail::level_available(l) && l != cpu_level::avx512bf16)
      out.push_back({xattn::detail::level_name(l), &xattn::detail::gemm_kernels_for<float>(l),
                     &xattn::detail::gemm_kernels_for<double>(l)});
#if XATTN_DISPATCH
  if (xattn::detail::level_available(cpu_level::avx2))
    out.push_back({"avx512-emulated", &xattn::detail::cpu_avx512_emulated::gemm_loops<float>,
                   &xattn::detail::cpu_avx512_emulated::gemm_loops<double>});
#endif
  return out;
}

template <class T>
const gemm_kernels<T>& pick(const named_loops& n) {
  if constexpr (std::is_same_v<T, float>)
    return *n.floats;
  else
    return *n.doubles;
}

struct layout {
  index_t m, n, k;
  bool trans_a, trans_b, accumulate, bias;
  index_t pad;  // extra elements at the end of every row of A, B and C
};

template <class T>
struct problem {
  layout s;
  index_t lda, ldb, ldc;
  std::vector<T> a, b, c0, bias;

  explicit problem(const layout& l, unsigned seed) : s(l) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    lda = (s.trans_a ? s.m : s.k) + s.pad;
    ldb = (s.trans_b ? s.k : s.n) + s.pad;
    ldc = s.n + s.pad;
    a.resize(std::size_t((s.trans_a ? s.k : s.m) * lda + 1));
    b.resize(std::size_t((s.trans_b ? s.n : s.k) * ldb + 1));
    c0.resize(std::size_t(s.m * ldc + 1));
    bias.resize(std::size_t(s.n + 1));
    for (T& x : a) x = T(u(gen));
    for (T& x : b) x = T(u(gen));
    for (T& x : c0) x = T(u(gen));
    for (T& x : bias) x = T(u(gen));
  }
  T at_a(index_t i, index_t p) const { return s.trans_a ? a.data()[p * lda + i] : a.data()[i * lda + p]; }
  T at_b(index_t p, index_t j) const { return s.trans_b ? b.data()[j * ldb + p] : b.data()[p * ldb + j]; }
  gemm_args<T> args(std::vector<T>& c) const {
    return {s.m,
            s.n,
            s.k,
            a.data(),
            s.trans_a ? 1 : lda,
            s.trans_a ? lda : 1,
            b.data(),
            s.trans_b ? 1 : ldb,
            s.trans_b ? ldb : 1,
            c.data(),
            ldc,
            s.accumulate,
            s.bias ? bias.data() : nullptr};
  }
};

std::string describe(const layout& s) {
  return "m " + std::to_string(s.m) + " n " + std::to_string(s.n) + " k " + std::to_string(s.k) +
         (s.trans_a ? " Aᵀ" : "") + (s.trans_b ? " Bᵀ" : "") + (s.accumulate ? " +C" : "") +
         (s.bias ? " +bias" : "") + " pad " + std::to_string(s.pad);
}

// Each C element against Σ in long double: |error| <= (k + 2) u (Σ|a||b| + |C0| + |bias|),
// the bound of a recursive or blocked sum of k products and two additions.
template <class T>
void expect_near_reference(const problem<T>& p, const std::vector<T>& c) {
  const long double u = std::numeric_limits<T>::epsilon() / 2;
  int reported = 0;
  for (index_t i = 0; i < p.s.m; ++i) {
    for (index_t j = 0; j < p.s.n; ++j) {
      long double sum = 0, mag = 0;
      for (index_t q = 0; q < p.s.k; ++q) {
        const long double t = (long double)p.at_a(i, q) * p.at_b(q, j);
        sum += t;
        mag += std::fabs(t);
      }
      if (p.s.accumulate) {
        sum += p.c0.data()[i * p.ldc + j];
        mag += std::fabs((long double)p.c0.data()[i * p.ldc + j]);
      }
      if (p.s.bias) {
        sum += p.bias.data()[j];
        mag += std::fabs((long double)p.bias.data()[j]);
      }
      const long double err = std::fabs((long double)c.data()[i * p.ldc + j] - sum);
      if (!(err <= (p.s.k + 2) * u * mag) && reported++ < 5)
        ADD_FAILURE() << "C(" << i << ", " << j << ") = " << c.data()[i * p.ldc + j]
                      << ", reference " << (double)sum << ", bound "
                      << (double)((p.s.k + 2) * u * mag);
    }
    // The padding after each row is not C's: untouched.
    for (index_t j = p.s.n; j < p.ldc; ++j)
      if (c.data()[i * p.ldc + j] != p.c0.data()[i * p.ldc + j] && reported++ < 5)
        ADD_FAILURE() << "wrote the padding at (" << i << ", " << j << ")";
  }
  EXPECT_EQ(c.back(), p.c0.back()) << "wrote past C";
}

std::vector<layout> layouts() {
  std::vector<layout> out;
  const index_t sizes[][3] = {{1, 1, 1},   {7, 13, 5},   {6, 64, 256}, {37, 65, 300},
                              {150, 17, 3}, {5, 600, 70}, {289, 33, 513}, {2, 3, 1000}};
  int variant = 0;
  for (const auto& sz : sizes)
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        const bool acc = (variant & 1) != 0, bias = (variant & 2) != 0;
        const index_t pad = (variant % 3 == 0) ? 0 : 3;
        out.push_back({sz[0], sz[1], sz[2], ta, tb, acc, bias, pad});
        ++variant;
      }
  return out;
}

template <class T>
void check_every_level() {
  for (const named_loops& loops : all_loops()) {
    SCOPED_TRACE("level " + loops.name);
    unsigned seed = 1;
    for (const layout& s : layouts()) {
      SCOPED_TRACE(describe(s));
      const problem<T> p(s, seed++);
      std::vector<T> c = p.c0;
      xattn::detail::gemm_with(pick<T>(loops), p.args(c), 1);
      expect_near_reference(p, c);
      for (int threads : xattn_test::thread_counts()) {
        std::vector<T> ct = p.c0;
        xattn::detail::gemm_with(pick<T>(loops), p.args(ct), threads);
        EXPECT_EQ(ct, c) << threads << " threads";
      }
    }
  }
}

TEST(Gemm, EveryLevelEqualsTheLongDoubleReferenceOnOddShapesAndStridesFloat) {
  check_every_level<float>();
}

TEST(Gemm, EveryLevelEqualsTheLongDoubleReferenceOnOddShapesAndStridesDouble) {
  check_every_level<double>();
}

TEST(Gemm, ZeroDepthWritesTheBiasOrAddsNothing) {
  for (const named_loops& loops : all_loops()) {
    SCOPED_TRACE("level " + loops.name);
    std::vector<float> c = {5, 6, 7, 8}, bias = {1, 2};
    gemm_args<float> g{2, 2, 0, nullptr, 0, 1, nullptr, 1, 0, c.data(), 2, false, bias.data()};
    xattn::detail::gemm_with(*loops.floats, g, 1);
    EXPECT_EQ(c, (std::vector<float>{1, 2, 1, 2}));
    c = {5, 6, 7, 8};
    g.accumulate = true;
    g.bias = nullptr;
    xattn::detail::gemm_with(*loops.floats, g, 1);
    EXPECT_EQ(c, (std::vector<float>{5, 6, 7, 8}));
  }
}

TEST(Gemm, SmallProductsStartNoThreads) {
  EXPECT_EQ(xattn::detail::gemm_threads<float>(8, 8, 8, 16), 1);
  EXPECT_EQ(xattn::detail::gemm_threads<float>(100, 64, 64, 16), 1);  // one work item
  EXPECT_GE(xattn::detail::gemm_threads<float>(4096, 320, 320, 16), 16);
}

TEST(Gemm, TheProjectionsRunOnTheActiveLevel) {
#if XATTN_USE_BLAS
  EXPECT_STREQ(xattn::gemm_engine(), "blas");
#else
  EXPECT_STREQ(xattn::gemm_engine(), "xattn");
#endif
}

}  // namespace
