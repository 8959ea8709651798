// SPDX-License-Identifier: MIT
// dispatch.hpp: naming and forcing the instruction-set path, and every path this machine runs
// checked against the long-double reference (odd shapes, every mask kind, grouped-query heads,
// both the lanes and the row path) and for bitwise determinism across thread counts. CTest also
// runs the whole tiled test suite once per forced path (XATTN_CPU_PATH, tests/CMakeLists.txt).

#include "xattn/dispatch.hpp"

#include "xattn/attention_tiled.hpp"

#include "emulated_levels.hpp"
#include "kernels.hpp"
#include "test_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::each_path;
using xattn_test::problem;
using xattn_test::shape;
using xattn_test::throws_with;
using xattn_test::tensor;
using xattn_test::tiles;

TEST(Dispatch, TheAutomaticPathIsTheFastestThisMachineRuns) {
  xattn::reset_cpu_path();
  const std::vector<std::string_view> paths = xattn::cpu_paths();
  ASSERT_FALSE(paths.empty());
  const char* env = std::getenv("XATTN_CPU_PATH");
  if (env == nullptr || std::find(paths.begin(), paths.end(), env) == paths.end()) {
    EXPECT_EQ(xattn::cpu_path(), paths.front());
  }
#if XATTN_DISPATCH
  // x86-64: sse2 always runs, and the list follows the CPU's features.
  EXPECT_EQ(paths.back(), "sse2");
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    xattn::detail::cpu_has_f16c();  // the half types' conversions
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  EXPECT_EQ(std::count(paths.begin(), paths.end(), "avx2"), avx2 ? 1 : 0);
  EXPECT_EQ(std::count(paths.begin(), paths.end(), "avx512"), avx2 && avx512 ? 1 : 0);
  EXPECT_EQ(std::count(paths.begin(), paths.end(), "avx512bf16"),
            avx2 && avx512 && xattn::detail::cpu_has_avx512_bf16() ? 1 : 0);
#else
  EXPECT_EQ(paths, std::vector<std::string_view>{"eigen"});
#endif
}

TEST(Dispatch, TheBf16ProductsAreChosenByWhatTheCoreDoes) {
  // The rule (detail::bf16_products_pay): bf16 products where vdpbf16ps runs at least 1.3x the
  // FMA's FLOP rate, as on AMD Zen 4 and Zen 5, not on the Intel Xeons, where it runs at half.
  using id = xattn::detail::cpu_identity;
  using vendor = id::vendor_id;
  EXPECT_TRUE(xattn::detail::bf16_products_pay(id{vendor::amd, 0x19}));   // Zen 4
  EXPECT_TRUE(xattn::detail::bf16_products_pay(id{vendor::amd, 0x1a}));   // Zen 5
  EXPECT_FALSE(xattn::detail::bf16_products_pay(id{vendor::amd, 0x17}));  // Zen 2: no BF16
  EXPECT_FALSE(xattn::detail::bf16_products_pay(id{vendor::intel, 6}));   // Xeons
  EXPECT_FALSE(xattn::detail::bf16_products_pay(id{vendor::other, 0x19}));
#if XATTN_DISPATCH
  const std::vector<std::string_view> paths = xattn::cpu_paths();
  if (std::find(paths.begin(), paths.end(), "avx512bf16") == paths.end())
    GTEST_SKIP() << "this CPU has no AVX-512 BF16";
  const char* env = std::getenv("XATTN_CPU_PATH");
  const bool pay = xattn::detail::bf16_products_pay(xattn::detail::this_cpu());
  xattn::reset_cpu_path();
  if (env == nullptr) {
    EXPECT_EQ(xattn::cpu_path_for<Eigen::bfloat16>(),
              pay ? "avx512bf16+dpbf16" : "avx512bf16+shift");
  }
  xattn::set_cpu_path("avx512bf16");  // named: the products whatever the core
  EXPECT_EQ(xattn::cpu_path_for<Eigen::bfloat16>(), "avx512bf16+dpbf16");
  xattn::set_cpu_path("avx512");
  EXPECT_EQ(xattn::cpu_path_for<Eigen::bfloat16>(), "avx512+shift");
  xattn::reset_cpu_path();
#endif
}

TEST(Dispatch, TheEnvironmentLowersTheAutomaticChoice) {
  // CTest runs this test with XATTN_CPU_PATH=sse2 (dispatch.environment_sse2) and with a
  // name no build has (dispatch.environment_avx9): a path this machine runs is taken, another
  // name ignored.
  const char* env = std::getenv("XATTN_CPU_PATH");
  if (env == nullptr || std::getenv("XATTN_TEST_ENVIRONMENT") == nullptr)
    GTEST_SKIP() << "run by CTest with XATTN_CPU_PATH set";
  xattn::reset_cpu_path();
  const std::vector<std::string_view> paths = xattn::cpu_paths();
  const bool runs = std::find(paths.begin(), paths.end(), env) != paths.end();
  EXPECT_EQ(xattn::cpu_path(), runs ? std::string_view(env) : paths.front());
#if XATTN_DISPATCH
  if (std::strcmp(env, "sse2") == 0) {
    EXPECT_EQ(xattn::cpu_path(), "sse2");
  }
#endif
}

TEST(Dispatch, SetCpuPathForcesAPathAndResetReturnsToTheAutomaticOne) {
  xattn::reset_cpu_path();
  const std::string automatic(xattn::cpu_path());
  each_path()([](std::string_view name) {
    // an emulated level runs under the avx2 path's name, with its own loops
    const bool emulated = name.find("-emulated") != std::string_view::npos;
    EXPECT_EQ(xattn::cpu_path(), emulated ? std::string_view("avx2") : name);
  });
  EXPECT_EQ(xattn::cpu_path(), automatic);
}

TEST(Dispatch, AnUnknownOrUnavailablePathIsAValueErrorAndChangesNothing) {
  xattn::reset_cpu_path();
  const std::string before(xattn::cpu_path());
  EXPECT_TRUE(throws_with<xattn::value_error>([] { xattn::set_cpu_path("avx9"); },
                                              {"set_cpu_path", "\"avx9\"", "expected one of"}));
  EXPECT_TRUE(throws_with<xattn::value_error>([] { xattn::set_cpu_path(""); }, {"\"\""}));
  EXPECT_EQ(xattn::cpu_path(), before);
  for (xattn::detail::cpu_level l : xattn::detail::built_levels)
    if (!xattn::detail::level_available(l)) {
      const std::string name = xattn::detail::level_name(l);
      EXPECT_TRUE(throws_with<xattn::value_error>([&] { xattn::set_cpu_path(name); },
                                                  {name.c_str(), "not a path of this build"}));
    }
  EXPECT_EQ(xattn::cpu_path(), before);
}

template <class T>
class DispatchPaths : public ::testing::Test {};
using element_types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(DispatchPaths, element_types, );

template <class T>
void check_tiled(problem<T>& p, const xattn::attention_options<T>& opts,
                 const xattn::tile_options& t) {
  p.run_and_check([&t](auto q, auto k, auto v, auto out,
                       const auto& o) { xattn::tiled_attention<T>(q, k, v, out, o, t); },
                  opts);
}

TYPED_TEST(DispatchPaths, EveryPathMatchesTheReferenceOnOddShapes) {
  using T = TypeParam;
  each_path()([](std::string_view) {
    // Lq != Lk, Lq = 1, Lk = 1, Dk != Dv, lengths that no tile or packet divides, GQA, a query
    // count on each side of every path's packet width (the row and the lanes path).
    for (const auto& s :
         {shape(1, 1, 1, 1, 1, 1), shape(2, 4, 1, 77, 40, 24, 2), shape(1, 2, 3, 129, 7, 9),
          shape(1, 2, 5, 31, 64, 64), shape(2, 2, 9, 300, 33, 17, 1), shape(1, 3, 17, 1, 8, 8),
          shape(1, 1, 70, 130, 64, 40), shape(1, 2, 33, 45, 3, 70)}) {
      SCOPED_TRACE(::testing::Message() << "Lq " << s.q_len << " Lk " << s.kv_len << " Dk "
                                        << s.head_dim << " Dv " << s.value_dim);
      problem<T> p(s, 11);
      check_tiled<T>(p, {}, tiles(0, 0));
      check_tiled<T>(p, {}, tiles(13, 7));
    }
  });
}

TYPED_TEST(DispatchPaths, EveryPathAppliesEveryMaskKind) {
  using T = TypeParam;
  each_path()([](std::string_view) {
    for (index_t lq : {1, 3, 45}) {
      const auto s = shape(2, 2, lq, 53, 8, 6);
      SCOPED_TRACE(::testing::Message() << "Lq " << lq);
      const std::vector<index_t> lengths = {17, 53};
      std::unique_ptr<bool[]> allowed(new bool[std::size_t(2 * lq * 53)]);
      for (index_t n = 0; n < 2 * lq * 53; ++n) allowed[std::size_t(n)] = (n * 7 % 5) != 0;
      auto bias = xattn_test::random_tensor<T, 4>({2, 1, 1, 53}, 9, -2.0, 2.0);
      bias.data[4] = -std::numeric_limits<T>::infinity();
      for (int kind = 0; kind < 6; ++kind) {
        xattn::attention_options<T> opts;
        if (kind == 0 || kind == 5) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {2});
        if (kind == 1 || kind == 5)
          opts.mask.allowed = xattn::tensor_view<const bool, 4>(allowed.get(), {1, 2, lq, 53});
        if (kind == 2 || kind == 5) opts.mask.bias = bias.cview();
        if (kind == 3) opts.mask.causal = xattn::causal_mask::top_left;
        if (kind == 4 || kind == 5) opts.mask.causal = xattn::causal_mask::bottom_right;
        SCOPED_TRACE(::testing::Message() << "mask kind " << kind);
        problem<T> p(s, unsigned(kind + 1));
        check_tiled<T>(p, opts, tiles(16, 10));
        check_tiled<T>(p, opts, tiles(0, 0));
      }
    }
  });
}

TYPED_TEST(DispatchPaths, EveryPathIsBitwiseDeterministicAcrossThreadCounts) {
  using T = TypeParam;
  each_path()([](std::string_view) {
    for (const auto& s : {shape(1, 1, 1, 9000, 64, 64), shape(2, 3, 50, 200, 24, 16)}) {
      problem<T> p(s, 5);
      std::vector<T> first;
      for (int threads = 1; threads <= 4; ++threads) {
        xattn::tiled_attention<T>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view(), {},
                                  tiles(0, 0, threads));
        if (threads == 1) {
          first = p.out.data;
        } else {
          EXPECT_EQ(std::memcmp(first.data(), p.out.data.data(), first.size() * sizeof(T)), 0)
              << threads << " threads";
        }
      }
    }
  });
}

TEST(DispatchPaths, PathsAgreeWithEachOtherToRounding) {
  // The paths differ only in rounding: the same call on two paths stays within the sum of
  // their tolerances against the exact result.
  problem<float> p(shape(1, 2, 40, 500, 64, 64), 21);
  std::vector<std::vector<float>> outs;
  each_path()([&](std::string_view) {
    xattn::tiled_attention<float>(p.q.cview(), p.k.cview(), p.v.cview(), p.out.view());
    outs.push_back(p.out.data);
  });
  const double tol = 2 * xattn_test::attention_tol<float>(64, 500, 8.0);
  for (std::size_t n = 1; n < outs.size(); ++n)
    EXPECT_TRUE(xattn_test::all_close(outs[n], outs[0], tol));
}

TEST(Dispatch, PlansFollowThePathsPacketWidth) {
  // A call's plan takes the packet width of the path it runs on: the query count below which
  // the row path runs, and the row path's score buffer padded to whole packets.
  each_path()([](std::string_view name) {
    const index_t want = name.substr(0, 6) == "avx512" ? 16
                         : name == "avx2"                         ? 8
                         : name == "sse2"                         ? 4
                                                                  : 0;
    const auto s = shape(1, 1, 7, 1000, 64, 64);
    const auto plan = xattn::detail::make_tiled_plan<float>(s, {}, false);
    if (want > 0) {
      EXPECT_EQ(plan.lanes, want);
      EXPECT_EQ(plan.rows, 7 < want);
    }
    EXPECT_EQ(plan.lanes, xattn::detail::active_kernels<float>().lanes);
    EXPECT_EQ(xattn::detail::make_tiled_plan<double>(s, {}, false).lanes * 2, plan.lanes);
  });
}

#if XATTN_DISPATCH
// Equal bits, or NaN in both (a NaN's payload is not part of any promise).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b, std::string& where) {
  if (a.size() != b.size()) return false;
  for (std::size_t n = 0; n < a.size(); ++n) {
    const float x = float(a[n]), y = float(b[n]);
    if ((std::isnan(x) && std::isnan(y)) || std::memcmp(&a[n], &b[n], sizeof(T)) == 0) continue;
    std::ostringstream m;
    m << "element " << n << ": " << std::hexfloat << x << " against " << y;
    where = m.str();
    return false;
  }
  return true;
}

TEST(DispatchEmulated, SaysWhichLevelsRunNativelyAndWhichEmulated) {
  // The report the CI log shows; the emulated levels run in every machine's suite with AVX2.
  const std::vector<std::string_view> paths = xattn::cpu_paths();
  std::string native, emulated;
  for (std::string_view p : paths) native += std::string(native.empty() ? "" : ", ") + std::string(p);
  const bool avx2 = std::find(paths.begin(), paths.end(), "avx2") != paths.end();
  for (const auto& e : xattn_test::emulated_levels())
    if (avx2) emulated += std::string(emulated.empty() ? "" : ", ") + e.name;
  std::printf("levels run natively: %s; emulated on avx2: %s\n", native.c_str(),
              emulated.empty() ? "none" : emulated.c_str());
  EXPECT_EQ(xattn_test::emulated_levels().size(), 2u);
}

TEST(DispatchEmulated, TheEmulatedLevelsEqualTheNativeOnesBitForBit) {
  // Where the CPU runs avx512 (and avx512bf16), each emulated level gives the native level's
  // bits on random calls: float, double, fp16, bf16 (the products on avx512bf16, with subnormal
  // inputs in some cases, which vdpbf16ps flushes) and the mixed call, every mask kind, tiles
  // that do and do not divide, 1 to 4 threads; and the same exp on a grid over float's range.
  const std::vector<std::string_view> paths = xattn::cpu_paths();
  const auto has = [&](std::string_view n) {
    return std::find(paths.begin(), paths.end(), n) != paths.end();
  };
  if (!has("avx512")) GTEST_SKIP() << "this CPU has no AVX-512: nothing to compare against";
  const auto& levels = xattn_test::emulated_levels();
  ASSERT_EQ(levels.size(), 2u);
  std::mt19937 rng(2026);
  const auto pick = [&](index_t lo, index_t hi) {
    return index_t(std::uniform_int_distribution<long long>(lo, hi)(rng));
  };
  int compared = 0;
  for (int level = 0; level < 2; ++level) {
    const char* native = level == 0 ? "avx512" : "avx512bf16";
    if (!has(native)) continue;
    const xattn_test::emulated_level& e = levels[std::size_t(level)];
    SCOPED_TRACE(e.name);
    // Runs call() on the native level, then on the emulated one, and compares what it returns.
    const auto both = [&](auto call) {
      const xattn_test::each_path restore;
      xattn::set_cpu_path(native);
      const auto want = call();
      xattn::set_cpu_path("avx2");
      xattn::detail::substitute_kernels(e.floats, e.doubles, e.products);
      const auto got = call();
      xattn::detail::substitute_kernels(nullptr, nullptr, nullptr);
      std::string where;
      ++compared;
      return same_bits(got, want, where) ? ::testing::AssertionSuccess()
                                         : ::testing::AssertionFailure() << where;
    };
    {
      std::vector<float> x;
      for (double t = -110; t < 95; t += 0.0173) x.push_back(float(t));
      x.resize(x.size() / 16 * 16);
      EXPECT_TRUE(both([&] {
        std::vector<float> y(x.size());
        xattn::detail::active_kernels<float>().exp_flushed(x.data(), index_t(x.size()), y.data());
        return y;
      })) << "exp";
    }
    for (int c = 0; c < 150; ++c) {
      const index_t hkv = pick(1, 2), group = pick(1, 2);
      const auto s = shape(pick(1, 2), hkv * group, pick(1, 3) == 1 ? pick(1, 5) : pick(6, 40),
                           pick(1, 300), pick(1, 70), pick(1, 70), hkv);
      const xattn::tile_options t =
          pick(0, 1) ? tiles(0, 0, int(pick(1, 4))) : tiles(pick(1, 40), pick(1, 200), int(pick(1, 4)));
      const int mask = int(pick(0, 4)), type = int(pick(0, 4));
      const bool tiny = pick(0, 4) == 0;  // bf16 and fp16 inputs scaled into the subnormals
      SCOPED_TRACE(::testing::Message() << "case " << c << " type " << type << " mask " << mask
                                        << " Lq " << s.q_len << " Lk " << s.kv_len << " Dk "
                                        << s.head_dim << " Dv " << s.value_dim << " "
                                        << xattn_test::describe(t) << (tiny ? " tiny" : ""));
      const std::vector<index_t> lengths(std::size_t(s.batch), pick(0, s.kv_len));
      const auto run = [&](auto tag, auto kv_tag) {
        using T = decltype(tag);
        using KV = decltype(kv_tag);
        const unsigned seed = unsigned(c) * 7u + 1u;
        auto q = xattn_test::random_tensor<T, 4>({s.batch, s.num_heads, s.q_len, s.head_dim},
                                                 seed, -2.0, 2.0);
        auto k = xattn_test::random_tensor<KV, 4>({s.batch, hkv, s.kv_len, s.head_dim},
                                                  seed + 1, -2.0, 2.0);
        auto v = xattn_test::random_tensor<KV, 4>({s.batch, hkv, s.kv_len, s.value_dim},
                                                  seed + 2, -2.0, 2.0);
        if constexpr (xattn::is_half_v<KV>)
          if (tiny)
            for (auto* t4 : {&k, &v})
              for (KV& x : t4->data) x = KV(float(x) * 1e-39f);
        auto bias = xattn_test::random_tensor<T, 4>({1, 1, s.q_len, s.kv_len}, seed + 3, -3.0, 3.0);
        xattn::attention_options<T> opts;
        if (mask == 1) opts.mask.kv_lengths = xattn::make_view(lengths.data(), {s.batch});
        if (mask == 2) opts.mask.causal = xattn::causal_mask::bottom_right;
        if (mask == 3) opts.mask.bias = bias.cview();
        opts.scale = tiny ? 1e30 : 0.3;
        tensor<xattn::statistic_t<T>, 3> lse({s.batch, s.num_heads, s.q_len});
        opts.lse_out = lse.view();
        return both([&] {
          tensor<T, 4> out({s.batch, s.num_heads, s.q_len, s.value_dim}, T(-7.0f));
          std::fill(lse.data.begin(), lse.data.end(), xattn::statistic_t<T>(-7.0f));
          xattn::tiled_attention<T>(q.cview(), xattn::tensor_view<const KV, 4>(k.cview()),
                                    xattn::tensor_view<const KV, 4>(v.cview()), out.view(), opts, t);
          std::vector<float> all;
          for (const T& o : out.data) all.push_back(float(o));
          all.insert(all.end(), lse.data.begin(), lse.data.end());
          return all;
        });
      };
      switch (type) {
        case 0:
          EXPECT_TRUE(run(float{}, float{}));
          break;
        case 1:
          EXPECT_TRUE(run(double{}, double{}));
          break;
        case 2:
          EXPECT_TRUE(run(Eigen::half{}, Eigen::half{}));
          break;
        case 3:
          EXPECT_TRUE(run(Eigen::bfloat16{}, Eigen::bfloat16{}));
          break;
        default:
          EXPECT_TRUE(run(float{}, Eigen::bfloat16{}));
      }
    }
  }
  EXPECT_GT(compared, 150);
}
#endif

}  // namespace
