// SPDX-License-Identifier: MIT
// The kernels the robustness tests run, each behind one call signature: naive_attention, and
// tiled_attention with tiles that do and do not divide the lengths, on 1 to 4 threads (as many
// as OpenMP allows; CTest runs these tests with OMP_NUM_THREADS=4).
#pragma once

#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/dispatch.hpp"
#include "xattn/options.hpp"
#include "xattn/tensor_view.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#ifdef _OPENMP
#  include <omp.h>
#endif

namespace xattn_test {

/// The most threads tiled_attention may be asked for here: OpenMP's limit, 1 without OpenMP.
inline int max_threads() {
#ifdef _OPENMP
  return std::max(1, omp_get_max_threads());
#else
  return 1;
#endif
}

/// 1, 2, ... up to min(most, max_threads()).
inline std::vector<int> thread_counts(int most = 4) {
  std::vector<int> counts;
  for (int t = 1; t <= std::min(most, max_threads()); ++t) counts.push_back(t);
  return counts;
}

/// Tile options: q_tile and kv_tile when > 0 (else the kernel's choice), and a thread count.
inline xattn::tile_options tiles(xattn::index_t q_tile, xattn::index_t kv_tile, int threads = 1) {
  xattn::tile_options t;
  if (q_tile > 0) t.q_tile = q_tile;
  if (kv_tile > 0) t.kv_tile = kv_tile;
  t.num_threads = threads;
  return t;
}

/// An emulated instruction-set level (tests/emulated_levels.hpp registers avx512-emulated and
/// avx512bf16-emulated where a test includes it): its loops for float and double, and its bf16
/// products (null: bf16 is widened).
struct emulated_level {
  const char* name;
  const xattn::detail::tile_kernels<float>* floats;
  const xattn::detail::tile_kernels<double>* doubles;
  const xattn::detail::bf16_product_kernels* products;
};
inline std::vector<emulated_level>& emulated_levels() {
  static std::vector<emulated_level> levels;
  return levels;
}

/// Runs f(name) with each CPU path this build and machine have forced in turn (dispatch.hpp),
/// and restores the automatic choice afterwards, also on failure. With emulated_products, one
/// more pass where the avx2 level runs the bf16-product loops of the avx512bf16 level, each
/// vdpbf16ps emulated (detail::emulate_bf16_products), named "avx2+dpbf16-emulated": those
/// loops tested on every AVX2 machine, whether or not it has AVX-512 BF16.
struct each_path {
  bool emulated_products = false;
  ~each_path() {
    xattn::detail::emulate_bf16_products() = false;
    xattn::detail::substitute_kernels(nullptr, nullptr, nullptr);
    xattn::reset_cpu_path();
  }
  template <class F>
  void operator()(F&& f) const {
    for (std::string_view name : xattn::cpu_paths()) {
      SCOPED_TRACE(std::string("path ") + std::string(name));
      xattn::set_cpu_path(name);
      ASSERT_EQ(xattn::cpu_path(), name);
      f(name);
    }
    if (emulated_products) products_pass(f);
    emulated_pass(f);
  }
  /// f(name) on each registered emulated level (none unless the test includes
  /// tests/emulated_levels.hpp), on CPUs with AVX2, whose instructions they run on; the
  /// automatic choice restored after.
  template <class F>
  static void emulated_pass(F&& f) {
    const auto paths = xattn::cpu_paths();
    if (std::find(paths.begin(), paths.end(), "avx2") == paths.end()) return;
    for (const emulated_level& e : emulated_levels()) {
      SCOPED_TRACE(std::string("path ") + e.name);
      const each_path restore;
      xattn::set_cpu_path("avx2");
      xattn::detail::substitute_kernels(e.floats, e.doubles, e.products);
      f(std::string_view(e.name));
    }
  }
  /// f(name) on the bf16-product loops alone: the avx512bf16 path where this CPU has it, else
  /// the emulated pass on avx2 (nothing without AVX2); the automatic choice restored after.
  template <class F>
  static void products_pass(F&& f) {
    const each_path restore;
    const auto paths = xattn::cpu_paths();
    const auto has = [&](std::string_view n) {
      return std::find(paths.begin(), paths.end(), n) != paths.end();
    };
    if (has("avx512bf16")) {
      xattn::set_cpu_path("avx512bf16");
      f(std::string_view("avx512bf16"));
    } else if (has("avx2")) {
      SCOPED_TRACE("path avx2+dpbf16-emulated");
      xattn::set_cpu_path("avx2");
      xattn::detail::emulate_bf16_products() = true;
      f(std::string_view("avx2+dpbf16-emulated"));
    }
  }
};

/// "q_tile=3 kv_tile=5 threads=2", with "auto" for unset fields.
inline std::string describe(const xattn::tile_options& t) {
  std::ostringstream s;
  const auto field = [&](const char* name, const auto& v) {
    s << name << '=';
    if (v)
      s << *v;
    else
      s << "auto";
  };
  field("q_tile", t.q_tile);
  field(" kv_tile", t.kv_tile);
  field(" threads", t.num_threads);
  return s.str();
}

/// One kernel under test, called like naive_attention.
template <class T>
struct kernel {
  std::string name;
  std::function<void(xattn::tensor_view<const T, 4>, xattn::tensor_view<const T, 4>,
                     xattn::tensor_view<const T, 4>, xattn::tensor_view<T, 4>,
                     const xattn::attention_options<T>&)>
      run;
};

template <class T>
kernel<T> naive_kernel() {
  return {"naive_attention", [](auto q, auto k, auto v, auto out, const auto& opts) {
            xattn::naive_attention<T>(q, k, v, out, opts);
          }};
}

template <class T>
kernel<T> tiled_kernel(const xattn::tile_options& tiles) {
  return {"tiled_attention " + describe(tiles),
          [tiles](auto q, auto k, auto v, auto out, const auto& opts) {
            xattn::tiled_attention<T>(q, k, v, out, opts, tiles);
          }};
}

/// naive_attention, tiled_attention with its own choices, and tiled_attention with tiles of
/// 1 x 1, 3 x 5 (dividing nothing) and 64 x 128 (larger than the lengths tested), each tile
/// shape on every thread count in thread_counts().
template <class T>
std::vector<kernel<T>> all_kernels() {
  std::vector<kernel<T>> ks = {naive_kernel<T>(), tiled_kernel<T>({})};
  const std::pair<xattn::index_t, xattn::index_t> tiles[] = {{1, 1}, {3, 5}, {64, 128}, {1, 128}};
  for (const auto& [qt, kt] : tiles)
    for (int t : thread_counts()) {
      xattn::tile_options o;
      o.q_tile = qt;
      o.kv_tile = kt;
      o.num_threads = t;
      ks.push_back(tiled_kernel<T>(o));
    }
  return ks;
}

}  // namespace xattn_test
