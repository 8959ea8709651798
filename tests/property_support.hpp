// SPDX-License-Identifier: MIT
// What the randomised property tests share: the environment they read (XATTN_PROPERTY_SEED,
// _CASES, _SECONDS, _CASE), case seeds, random draws, and the driver that runs cases until the
// count or the time budget is reached and reports how to replay a failure.
#pragma once

#include "xattn/config.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <random>
#include <string>

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
  std::cout << "XATTN_PROPERTY_SEED=" << run_seed() << ": " << ran << " of " << cases << " "
            << what << " in " << elapsed() << " s"
            << (ran < cases && failed < 5 ? " (time budget reached)" : "") << "\n";
  EXPECT_GT(ran, 0u);
}

}  // namespace xattn_test::property
