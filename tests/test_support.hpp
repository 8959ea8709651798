// SPDX-License-Identifier: MIT
// Helpers shared by the tests: owned tensors with views, seeded random fills, the tolerance
// rule, an element-wise comparison that reports the worst element, and an independent
// quadruple-loop attention in long double that the kernels are checked against.
#pragma once

#include "xattn/half.hpp"
#include "xattn/options.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace xattn_test {

using xattn::index_t;

/// The element types every typed kernel test runs over.
using element_types = ::testing::Types<float, double>;

/// An owned, packed row-major tensor.
template <class T, std::size_t Rank>
struct tensor {
  std::array<index_t, Rank> extents{};
  std::vector<T> data;

  tensor() = default;
  explicit tensor(const std::array<index_t, Rank>& e, T fill = T(0)) : extents(e) {
    index_t n = 1;
    for (index_t x : e) n *= x;
    data.assign(std::size_t(n), fill);
  }
  xattn::tensor_view<T, Rank> view() { return {data.data(), extents}; }
  xattn::tensor_view<const T, Rank> view() const { return {data.data(), extents}; }
  xattn::tensor_view<const T, Rank> cview() const { return view(); }
};

/// Fills with independent uniform draws from [lo, hi), reproducible from the seed.
template <class T, std::size_t Rank>
tensor<T, Rank> random_tensor(const std::array<index_t, Rank>& e, unsigned seed, double lo = -1.0,
                              double hi = 1.0) {
  tensor<T, Rank> t(e);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  for (T& x : t.data) x = static_cast<T>(dist(gen));
  return t;
}

/// The machine epsilon of T (the distance from 1 to the next value): 2^-10 for fp16 and 2^-7
/// for bf16. Eigen 3.4's std::numeric_limits<Eigen::half>::epsilon() gives 2^-13, so the half
/// types' epsilons come from their significand widths here.
template <class T>
double epsilon() {
  if constexpr (std::is_same_v<T, Eigen::half>) return std::ldexp(1.0, -10);
  if constexpr (std::is_same_v<T, Eigen::bfloat16>) return std::ldexp(1.0, -7);
  return double(std::numeric_limits<T>::epsilon());
}

/// The tolerance for an attention output computed in T against an exact reference.
/// Rounding in a score s is about eps·|s|·sqrt(Dk) and moves the output by about as much; the
/// weighted sum over Lk keys adds about eps·sqrt(Lk). Inputs are drawn from [-1, 1].
template <class T>
double attention_tol(index_t head_dim, index_t kv_len, double max_abs_score) {
  const double eps = epsilon<T>();
  return 8.0 * eps *  // 8: measured headroom
         (std::sqrt(double(kv_len)) + std::sqrt(double(head_dim)) * (1.0 + max_abs_score));
}

/// The tolerance of a gradient computed in T against an exact one: the forward's rounding
/// (attention_tol) grows through the backward's products over Lq and Lk, and dk and dv sum the
/// query heads of their group.
template <class T>
double backward_tol(const xattn::attention_shape& s, double max_abs_score) {
  const double group = double(s.num_heads) / double(s.kv_heads());
  return 4.0 * attention_tol<T>(s.head_dim + s.value_dim, s.kv_len, max_abs_score) *
         std::sqrt(double(s.q_len) * group);
}

/// The tolerance of multi_head_cross_attention's output (Config: a cross_attention_config):
/// three roundings in a row, the input projections (dot products over the input width), the
/// attention (attention_tol), the output projection (over H·Dk). Weights are scaled by
/// 1/sqrt(in) so each stage keeps values of order one and the errors add.
template <class T, class Config>
double module_tol(const Config& cfg, index_t kv_len, double max_score) {
  const auto c = cfg.resolved();
  const index_t widest =
      std::max({c.model_dim, c.context_dim, c.value_context_dim, c.num_heads * c.head_dim});
  return attention_tol<T>(c.head_dim, kv_len, max_score) + 2.0 * attention_tol<T>(widest, 1, 0.0);
}

/// An owned boolean mask (std::vector<bool> has no data()).
struct bool_mask {
  std::array<index_t, 4> extents;
  std::unique_ptr<bool[]> data;
  explicit bool_mask(const std::array<index_t, 4>& e, bool fill = false)
      : extents(e), data(new bool[std::size_t(e[0] * e[1] * e[2] * e[3])]) {
    std::fill(data.get(), data.get() + size(), fill);
  }
  index_t size() const { return extents[0] * extents[1] * extents[2] * extents[3]; }
  xattn::tensor_view<bool, 4> view() { return {data.get(), extents}; }
  xattn::tensor_view<const bool, 4> cview() const { return {data.get(), extents}; }
};

/// Keys [begin, begin + n) of k or v ([B, Hkv, Lk, D]), read in place.
template <class T>
xattn::tensor_view<const T, 4> key_rows(const xattn::tensor_view<const T, 4>& x, index_t begin,
                                        index_t n) {
  return {x.data() + begin * x.stride(2), {x.extent(0), x.extent(1), n, x.extent(3)}, x.strides()};
}

/// Key columns [begin, begin + n) of a [B|1, H|1, Lq|1, Lk] mask, read in place; a broadcast key
/// axis (extent 1) stays as it is.
template <class E>
xattn::tensor_view<const E, 4> key_columns(const xattn::tensor_view<const E, 4>& m, index_t begin,
                                           index_t n) {
  if (m.extent(3) == 1) return m;
  return {m.data() + begin * m.stride(3), {m.extent(0), m.extent(1), m.extent(2), n}, m.strides()};
}

/// Compares every element: passes when |got - want| <= tol · (1 + |want|), or both are the same
/// infinity. On failure the message names the worst element.
template <class G, class W>
::testing::AssertionResult all_close(const std::vector<G>& got, const std::vector<W>& want,
                                     double tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes differ: " << got.size() << " vs " << want.size();
  double worst = 0.0;
  std::size_t worst_at = 0;
  for (std::size_t n = 0; n < got.size(); ++n) {
    const double g = double(got[n]), w = double(want[n]);
    if (std::isinf(w) && g == w) continue;
    const double err = std::isnan(g) || std::isnan(w) ? std::numeric_limits<double>::infinity()
                                                      : std::abs(g - w) / (1.0 + std::abs(w));
    if (!(err <= worst)) {
      worst = err;
      worst_at = n;
    }
  }
  if (worst <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "worst element " << worst_at << ": got " << double(got[worst_at]) << ", want "
         << double(want[worst_at]) << ", relative error " << worst << " > tolerance " << tol;
}

/// Copies a view's elements out in row-major index order.
template <class T>
std::vector<std::remove_const_t<T>> elements(const xattn::tensor_view<T, 4>& v) {
  std::vector<std::remove_const_t<T>> out;
  for (index_t a = 0; a < v.extent(0); ++a)
    for (index_t b = 0; b < v.extent(1); ++b)
      for (index_t c = 0; c < v.extent(2); ++c)
        for (index_t d = 0; d < v.extent(3); ++d) out.push_back(v(a, b, c, d));
  return out;
}

/// A value of any element type as long double: the half types exactly, through float.
template <class T>
long double to_ld(const T& x) {
  if constexpr (xattn::is_half_v<T>)
    return static_cast<long double>(static_cast<float>(x));
  else
    return static_cast<long double>(x);
}

/// Whether the masks of m let query i of (b, h) see key j (the bias aside): key padding, the
/// boolean mask and both causal alignments, counting the window's positions.
template <class T>
bool key_visible(const xattn::attention_mask<T>& m, index_t lq, index_t lk, index_t b, index_t h,
                 index_t i, index_t j) {
  const xattn::position_window w = m.window.value_or(xattn::position_window{});
  const index_t q_total = w.query_len.value_or(w.query_offset + lq);
  const index_t k_total = w.kv_len.value_or(w.key_offset + lk);
  const index_t gi = w.query_offset + i, gj = w.key_offset + j;
  if (m.kv_lengths && gj >= (*m.kv_lengths)(b)) return false;
  if (m.allowed) {
    const auto& a = *m.allowed;
    if (!a(a.extent(0) == 1 ? 0 : b, a.extent(1) == 1 ? 0 : h, a.extent(2) == 1 ? 0 : i,
           a.extent(3) == 1 ? 0 : j))
      return false;
  }
  if (m.causal == xattn::causal_mask::top_left && gj > gi) return false;
  if (m.causal == xattn::causal_mask::bottom_right && gj > gi + k_total - q_total) return false;
  return true;
}

/// The bias of m for (b, h, i, j), broadcast; 0 without one.
template <class T>
long double bias_at(const xattn::attention_mask<T>& m, index_t b, index_t h, index_t i, index_t j) {
  if (!m.bias) return 0.0L;
  const auto& x = *m.bias;
  return to_ld(x(x.extent(0) == 1 ? 0 : b, x.extent(1) == 1 ? 0 : h, x.extent(2) == 1 ? 0 : i,
                 x.extent(3) == 1 ? 0 : j));
}

/// What the reference computes: the output, the weights and the log-sum-exp, packed
/// [B, H, Lq, Dv], [B, H, Lq, Lk] and [B, H, Lq], and the largest |score| seen.
struct reference_result {
  std::vector<long double> out, weights, lse;
  double max_abs_score = 0.0;
};

/// Attention by definition, one score at a time, in long double. Independent of the library's
/// kernels: it shares only the meaning of the options.
template <class T>
reference_result reference_attention(const xattn::tensor_view<const T, 4>& q,
                                     const xattn::tensor_view<const T, 4>& k,
                                     const xattn::tensor_view<const T, 4>& v,
                                     const xattn::attention_options<T>& opts = {}) {
  using ld = long double;
  const index_t B = q.extent(0), H = q.extent(1), Lq = q.extent(2), Dk = q.extent(3);
  const index_t Hkv = k.extent(1), Lk = k.extent(2), Dv = v.extent(3);
  const ld scale = opts.scale ? ld(*opts.scale) : 1.0L / std::sqrt(ld(Dk));
  const auto& m = opts.mask;
  reference_result r;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / (H / Hkv);
      for (index_t i = 0; i < Lq; ++i) {
        std::vector<ld> s(static_cast<std::size_t>(Lk));
        std::vector<bool> keep(std::size_t(Lk), true);
        ld mx = -std::numeric_limits<ld>::infinity();
        for (index_t j = 0; j < Lk; ++j) {
          ld dot = 0;
          for (index_t d = 0; d < Dk; ++d) dot += to_ld(q(b, h, i, d)) * to_ld(k(b, hk, j, d));
          const ld x = scale * dot + bias_at(m, b, h, i, j);
          // a -inf bias masks; positions count the window's whole sequences (position_window)
          const bool ok =
              !(x == -std::numeric_limits<ld>::infinity()) && key_visible(m, Lq, Lk, b, h, i, j);
          s[std::size_t(j)] = x;
          keep[std::size_t(j)] = ok;
          if (ok) {
            mx = std::max(mx, x);
            r.max_abs_score = std::max(r.max_abs_score, std::abs(double(x)));
          }
        }
        std::vector<ld> p(std::size_t(Lk), 0.0L);
        ld sum = 0;
        if (mx > -std::numeric_limits<ld>::infinity()) {
          for (index_t j = 0; j < Lk; ++j)
            if (keep[std::size_t(j)]) sum += p[std::size_t(j)] = std::exp(s[std::size_t(j)] - mx);
          for (ld& x : p) x /= sum;
        }
        for (index_t e = 0; e < Dv; ++e) {
          ld o = 0;
          for (index_t j = 0; j < Lk; ++j) o += p[std::size_t(j)] * to_ld(v(b, hk, j, e));
          r.out.push_back(o);
        }
        r.weights.insert(r.weights.end(), p.begin(), p.end());
        r.lse.push_back(sum > 0 ? mx + std::log(sum) : -std::numeric_limits<ld>::infinity());
      }
    }
  return r;
}

/// Attention computed plainly in the half type T, rounding where PyTorch's math path on
/// bf16/fp16 tensors rounds: the scaled queries, each score (a dot product accumulated exactly,
/// then rounded), the score plus the bias, each softmax weight (computed exactly from the
/// rounded scores, then rounded) and each output (accumulated exactly from the rounded weights,
/// then rounded). Masked keys weigh 0, and a row with every key masked gives zeros. The yardstick
/// of the half-precision accuracy rule (check_half_rule).
template <class T>
std::vector<T> plain_half_attention(const xattn::tensor_view<const T, 4>& q,
                                    const xattn::tensor_view<const T, 4>& k,
                                    const xattn::tensor_view<const T, 4>& v,
                                    const xattn::attention_options<T>& opts = {}) {
  using ld = long double;
  const auto rnd = [](ld x) { return to_ld(static_cast<T>(static_cast<float>(x))); };
  const index_t B = q.extent(0), H = q.extent(1), Lq = q.extent(2), Dk = q.extent(3);
  const index_t Hkv = k.extent(1), Lk = k.extent(2), Dv = v.extent(3);
  const ld scale = rnd(opts.scale ? ld(*opts.scale) : 1.0L / std::sqrt(ld(Dk)));
  std::vector<T> out;
  for (index_t b = 0; b < B; ++b)
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < Lq; ++i) {
        const index_t hk = h / (H / Hkv);
        std::vector<ld> s(std::size_t(Lk), -std::numeric_limits<ld>::infinity());
        ld mx = -std::numeric_limits<ld>::infinity();
        for (index_t j = 0; j < Lk; ++j) {
          if (!key_visible(opts.mask, Lq, Lk, b, h, i, j)) continue;
          ld dot = 0;
          for (index_t d = 0; d < Dk; ++d)
            dot += rnd(scale * to_ld(q(b, h, i, d))) * to_ld(k(b, hk, j, d));
          ld x = rnd(dot);
          if (opts.mask.bias) x = rnd(x + bias_at(opts.mask, b, h, i, j));
          s[std::size_t(j)] = x;
          mx = std::max(mx, x);
        }
        std::vector<ld> p(std::size_t(Lk), 0.0L);
        if (mx > -std::numeric_limits<ld>::infinity()) {
          ld sum = 0;
          for (index_t j = 0; j < Lk; ++j) sum += std::exp(s[std::size_t(j)] - mx);
          for (index_t j = 0; j < Lk; ++j)
            p[std::size_t(j)] = rnd(std::exp(s[std::size_t(j)] - mx) / sum);
        }
        for (index_t e = 0; e < Dv; ++e) {
          ld o = 0;
          for (index_t j = 0; j < Lk; ++j) o += p[std::size_t(j)] * to_ld(v(b, hk, j, e));
          out.push_back(static_cast<T>(static_cast<float>(o)));
        }
      }
  return out;
}

/// The comparison of the half-precision accuracy rule, the one FlashAttention's tests use: the
/// largest error of `got` against the exact result is at most twice that of a yardstick
/// computed in the half type (a plain half computation, or PyTorch's own half result), plus half
/// a unit in the last place of the largest exact output (the one rounding every half output
/// has, which the yardstick may dodge by chance in a tiny case).
template <class T, class E>
::testing::AssertionResult half_rule_holds(const std::vector<T>& got,
                                           const std::vector<T>& yardstick,
                                           const std::vector<E>& exact,
                                           const char* yardstick_name) {
  if (got.size() != exact.size() || yardstick.size() != exact.size())
    return ::testing::AssertionFailure() << "sizes differ: " << got.size() << " and "
                                         << yardstick.size() << " vs " << exact.size();
  double err = 0.0, yard_err = 0.0, largest = 0.0;
  std::size_t worst = 0;
  for (std::size_t n = 0; n < got.size(); ++n) {
    const double want = double(exact[n]);
    const double e = std::abs(double(to_ld(got[n])) - want);
    if (!(e <= err)) {  // NaN is the worst
      err = e;
      worst = n;
    }
    yard_err = std::max(yard_err, std::abs(double(to_ld(yardstick[n])) - want));
    largest = std::max(largest, std::abs(want));
  }
  const double slack = 0.5 * epsilon<T>() * largest;
  if (err <= 2.0 * yard_err + slack) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "error " << err << " at element " << worst << " (got " << double(to_ld(got[worst]))
         << ", exact " << double(exact[worst]) << ") > 2 x " << yard_err << " (the "
         << yardstick_name << " " << xattn::element_name<T>() << " result's) + " << slack;
}

/// The accuracy rule (half_rule_holds) for a half-precision output `got` of attention(q, k, v,
/// opts), the exact result from reference_attention on the same half inputs.
template <class T>
::testing::AssertionResult check_half_rule_against(
    const std::vector<T>& got, const std::vector<T>& yardstick, const char* yardstick_name,
    const xattn::tensor_view<const T, 4>& q, const xattn::tensor_view<const T, 4>& k,
    const xattn::tensor_view<const T, 4>& v, const xattn::attention_options<T>& opts) {
  xattn::attention_options<T> plain_opts = opts;  // the statistics are not compared here
  plain_opts.weights_out.reset();
  plain_opts.lse_out.reset();
  return half_rule_holds(got, yardstick, reference_attention<T>(q, k, v, plain_opts).out,
                         yardstick_name);
}

/// check_half_rule_against plain_half_attention.
template <class T>
::testing::AssertionResult check_half_rule(const std::vector<T>& got,
                                           const xattn::tensor_view<const T, 4>& q,
                                           const xattn::tensor_view<const T, 4>& k,
                                           const xattn::tensor_view<const T, 4>& v,
                                           const xattn::attention_options<T>& opts = {}) {
  xattn::attention_options<T> plain_opts = opts;
  plain_opts.weights_out.reset();
  plain_opts.lse_out.reset();
  return check_half_rule_against<T>(got, plain_half_attention<T>(q, k, v, plain_opts), "plain", q,
                                    k, v, opts);
}

/// An attention_shape from its sizes, in the order B, H, Lq, Lk, Dk, Dv (, Hkv).
inline xattn::attention_shape shape(index_t b, index_t h, index_t lq, index_t lk, index_t dk,
                                    index_t dv, index_t hkv = 0) {
  xattn::attention_shape s;
  s.batch = b;
  s.num_heads = h;
  s.q_len = lq;
  s.kv_len = lk;
  s.head_dim = dk;
  s.value_dim = dv;
  s.num_kv_heads = hkv;
  return s;
}

/// Random q, k, v for one shape, and output buffers pre-filled with a sentinel (-7); the weights
/// and log-sum-exp in statistic_t<T> (float for the half types).
template <class T>
struct problem {
  using S = xattn::statistic_t<T>;
  xattn::attention_shape s;
  tensor<T, 4> q, k, v, out;
  tensor<S, 4> weights;
  tensor<S, 3> lse;

  explicit problem(const xattn::attention_shape& shape, unsigned seed = 1, double amp = 1.0)
      : s(shape),
        q(random_tensor<T, 4>({s.batch, s.num_heads, s.q_len, s.head_dim}, seed, -amp, amp)),
        k(random_tensor<T, 4>({s.batch, s.kv_heads(), s.kv_len, s.head_dim}, seed + 1, -amp, amp)),
        v(random_tensor<T, 4>({s.batch, s.kv_heads(), s.kv_len, s.value_dim}, seed + 2)),
        out({s.batch, s.num_heads, s.q_len, s.value_dim}, T(-7)),
        weights({s.batch, s.num_heads, s.q_len, s.kv_len}, S(-7)),
        lse({s.batch, s.num_heads, s.q_len}, S(-7)) {}

  /// Runs kernel(q, k, v, out, opts), asking for the log-sum-exp (and the weights when asked),
  /// and checks every output against reference_attention.
  template <class Kernel>
  void run_and_check(const Kernel& kernel, xattn::attention_options<T> opts,
                     bool with_weights = true) {
    if (with_weights) opts.weights_out = weights.view();
    opts.lse_out = lse.view();
    kernel(q.cview(), k.cview(), v.cview(), out.view(), opts);
    const auto want = reference_attention<T>(q.cview(), k.cview(), v.cview(), opts);
    const double tol = attention_tol<T>(s.head_dim, s.kv_len, want.max_abs_score);
    EXPECT_TRUE(all_close(out.data, want.out, tol)) << "output";
    EXPECT_TRUE(all_close(lse.data, want.lse, tol)) << "log-sum-exp";
    if (with_weights) {
      EXPECT_TRUE(all_close(weights.data, want.weights, tol)) << "weights";
    }
  }
};

/// Runs f and checks it throws E with a message containing every given fragment.
template <class E, class F>
::testing::AssertionResult throws_with(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
  } catch (const E& e) {
    const std::string what = e.what();
    for (const char* frag : fragments)
      if (what.find(frag) == std::string::npos)
        return ::testing::AssertionFailure()
               << "message \"" << what << "\" lacks \"" << frag << "\"";
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw the wrong type: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

}  // namespace xattn_test
