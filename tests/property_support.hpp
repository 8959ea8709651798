// SPDX-License-Identifier: MIT
// What the randomised property tests share: the environment they read (XATTN_PROPERTY_SEED,
// _CASES, _SECONDS, _CASE), case seeds, random draws, and the driver that runs cases until the
// count or the time budget is reached and reports how to replay a failure.
#pragma once

#include "xattn/config.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace xattn_test::property {

using xattn::index_t;
using rng = std::mt19937_64;

/// An unsigned number from the environment variable `name`, if it is set.
inline std::optional<std::uint64_t> env_u64(const char* name) {
  const char* s = std::getenv(name);
  if (!s || !*s) return std::nullopt;
  return std::strtoull(s, nullptr, 0);
}

/// The run's seed: XATTN_PROPERTY_SEED (default 1), or a fresh one, printed, for "random".
inline std::uint64_t run_seed() {
  static const std::uint64_t seed = [] {
    const char* s = std::getenv("XATTN_PROPERTY_SEED");
    if (s && std::string(s) == "random") {
      const auto r = std::uint64_t(std::random_device{}()) << 32 ^
                     std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
      std::cout << "XATTN_PROPERTY_SEED=" << r << "\n";
      return r;
    }
    return env_u64("XATTN_PROPERTY_SEED").value_or(1);
  }();
  return seed;
}

/// SplitMix64: well-spread case seeds from the run seed and the case number.
inline std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline index_t pick(rng& g, index_t lo, index_t hi) {  // uniform in [lo, hi]
  return std::uniform_int_distribution<index_t>(lo, hi)(g);
}
inline bool chance(rng& g, double p) { return std::bernoulli_distribution(p)(g); }
inline double uniform(rng& g, double lo, double hi) {
  return std::uniform_real_distribution<double>(lo, hi)(g);
}

/// A case's failures as run_cases reports them: "<what> <seed> (replay: ...)", the case's
/// description (describe(), called only on failure), then what went wrong; "" when nothing did.
template <class Describe>
std::string report(const char* what, std::uint64_t case_seed, const Describe& describe,
                   const std::string& failures) {
  if (failures.empty()) return failures;
  return std::string(what) + " " + std::to_string(case_seed) +
         " (replay: XATTN_PROPERTY_CASE=" + std::to_string(case_seed) + ")\n  " + describe() +
         "\n" + failures;
}

/// The masks of a case, drawn after its inputs in this order: kv_lengths (each item's length
/// Lk or below), allowed (true with p = 0.75) and bias (uniform in [-3, 3], -inf with
/// p = bias_minus_inf), each where the case's config asks for it, and the causal mask it names;
/// `mask` views the buffers held here. Config has the fields B, Lk, kv_lengths, allowed,
/// allowed_shape, bias, bias_shape, bias_minus_inf and causal.
template <class T>
struct drawn_masks {
  std::vector<index_t> lengths;
  std::unique_ptr<bool[]> allowed;
  std::vector<T> bias;
  xattn::attention_mask<T> mask;

  template <class Config>
  drawn_masks(rng& g, const Config& c) : lengths(std::size_t(c.B)) {
    mask.causal = c.causal;
    if (c.kv_lengths) {
      for (auto& l : lengths) l = chance(g, 0.5) ? c.Lk : pick(g, 0, c.Lk);
      mask.kv_lengths = xattn::make_view(static_cast<const index_t*>(lengths.data()), {c.B});
    }
    if (c.allowed) {
      const auto& e = c.allowed_shape;
      const std::size_t n = std::size_t(std::max<index_t>(e[0] * e[1] * e[2] * e[3], 1));
      allowed.reset(new bool[n]);
      for (std::size_t t = 0; t < n; ++t) allowed[t] = chance(g, 0.75);
      mask.allowed = xattn::tensor_view<const bool, 4>(allowed.get(), e);
    }
    if (c.bias) {
      const auto& e = c.bias_shape;
      bias.resize(std::size_t(std::max<index_t>(e[0] * e[1] * e[2] * e[3], 1)));
      for (T& x : bias)
        x = chance(g, c.bias_minus_inf) ? -std::numeric_limits<T>::infinity()
                                        : T(uniform(g, -3, 3));
      mask.bias = xattn::tensor_view<const T, 4>(bias.data(), e);
    }
  }
  drawn_masks(const drawn_masks&) = delete;
  drawn_masks& operator=(const drawn_masks&) = delete;
};

/// Runs run_case(mix(base + n)) for n = 0, 1, ... until `cases` ran (XATTN_PROPERTY_CASES,
/// divided by `cases_divisor`) or XATTN_PROPERTY_SECONDS passed, stopping after 5 failures;
/// run_case returns an empty string or the failure's description (with its case seed). With
/// XATTN_PROPERTY_CASE set, runs that one case only.
template <class RunCase>
void run_cases(const RunCase& run_case, std::uint64_t base, std::uint64_t cases_divisor,
               const char* what) {
  if (const auto one = env_u64("XATTN_PROPERTY_CASE")) {
    const std::string err = run_case(*one);
    EXPECT_TRUE(err.empty()) << err;
    return;
  }
  const std::uint64_t cases =
      std::max<std::uint64_t>(env_u64("XATTN_PROPERTY_CASES").value_or(5000) / cases_divisor, 1);
  const double budget = double(env_u64("XATTN_PROPERTY_SECONDS").value_or(50));
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  std::uint64_t ran = 0;
  int failed = 0;
  for (; ran < cases && elapsed() < budget; ++ran) {
    const std::string err = run_case(mix(base + ran));
    if (!err.empty()) {
      ADD_FAILURE() << err;
      if (++failed == 5) {
        std::cout << "stopping after 5 failing cases\n";
        ++ran;
        break;
      }
    }
  }
  std::cout << "XATTN_PROPERTY_SEED=" << run_seed() << ": " << ran << " of " << cases << " " << what
            << " in " << elapsed() << " s"
            << (ran < cases && failed < 5 ? " (time budget reached)" : "") << "\n";
  EXPECT_GT(ran, 0u);
}

}  // namespace xattn_test::property
