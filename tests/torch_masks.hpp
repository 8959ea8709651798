// SPDX-License-Identifier: MIT
// PyTorch's attention masks, as tests/make_fixtures.py saves them, in xattn's terms: a
// key_padding_mask passes as it is (true = padding); a bool attn_mask is negated (PyTorch: true
// = may not attend; xattn: allowed); a float attn_mask is an additive bias. Shared by the
// fixture tests of the forward (test_safetensors.cpp) and the backward.
#pragma once

#include "xattn/options.hpp"
#include "xattn/safetensors.hpp"
#include "xattn/tensor_view.hpp"

#include <cstddef>
#include <memory>
#include <optional>
#include <vector>

namespace xattn_test {

/// The masks of one fixture file, owned here; views into them go to the options.
template <class T>
struct torch_masks {
  std::unique_ptr<bool[]> pad, allowed;
  std::vector<T> bias;

  /// Reads key_padding_mask [B, Lk], attn_mask_bool and attn_mask_float [Lq, Lk] where present.
  torch_masks(const xattn::safetensors_file& f, xattn::index_t B, xattn::index_t Lq,
              xattn::index_t Lk) {
    if (f.contains("key_padding_mask")) {
      const auto m = f.read<float>("key_padding_mask", {B, Lk});
      pad.reset(new bool[m.size()]);
      for (std::size_t n = 0; n < m.size(); ++n) pad[n] = m[n] != 0.0f;
      pad_view = xattn::make_view<const bool>(pad.get(), {B, Lk});
    }
    if (f.contains("attn_mask_bool")) {
      const auto m = f.read<float>("attn_mask_bool", {Lq, Lk});
      allowed.reset(new bool[m.size()]);
      for (std::size_t n = 0; n < m.size(); ++n) allowed[n] = m[n] == 0.0f;
      allowed_view = xattn::to_rank<4>(xattn::make_view<const bool>(allowed.get(), {Lq, Lk}));
    }
    if (f.contains("attn_mask_float")) {
      bias = f.read<T>("attn_mask_float", {Lq, Lk});
      bias_view = xattn::to_rank<4>(xattn::make_view<const T>(bias.data(), {Lq, Lk}));
    }
  }

  /// Sets mask.allowed and mask.bias from the attn_mask, where the file has one.
  void apply(xattn::attention_mask<T>& mask) const {
    if (allowed_view) mask.allowed = *allowed_view;
    if (bias_view) mask.bias = *bias_view;
  }

  std::optional<xattn::tensor_view<const bool, 2>> pad_view;  ///< key_padding_mask, if any
  std::optional<xattn::tensor_view<const bool, 4>> allowed_view;
  std::optional<xattn::tensor_view<const T, 4>> bias_view;
};

}  // namespace xattn_test
