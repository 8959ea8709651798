// SPDX-License-Identifier: MIT
// Attention layers of real checkpoints: which tensor names each model family uses, which of its
// projections have a bias, and how it scales its scores; finding the layers in a safetensors
// file and loading one as a multi_head_cross_attention. Read safetensors.hpp for the format.
//
//   layout          weights under the layer's prefix (q, k, v, out)          biases
//   torch_packed    in_proj_weight [H·Dk + 2·Hkv·Dk, Dm], out_proj.weight    in_proj_bias,
//                                                                            out_proj.bias
//   torch_separate  q_proj_weight, k_proj_weight, v_proj_weight,             as torch_packed
//                   out_proj.weight
//   hugging_face    q_proj.weight, k_proj.weight, v_proj.weight,             <name>.bias
//                   out_proj.weight
//   diffusers       to_q.weight, to_k.weight, to_v.weight, to_out.0.weight   <name>.bias
//   openai_whisper  query.weight, key.weight, value.weight, out.weight       <name>.bias
//   t5              q.weight, k.weight, v.weight, o.weight                   (none)
//
// Every layout but t5 scales scores by 1/sqrt(Dk); t5 does not scale them (scale 1). Each bias is
// optional: a layer has the biases its file holds (Whisper's k_proj has none, diffusers' only
// to_out.0 has one).
#pragma once

#include "xattn/config.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/errors.hpp"
#include "xattn/projection.hpp"
#include "xattn/safetensors.hpp"

#include <Eigen/Core>

#include <array>
#include <cstddef>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace xattn {

/// How a checkpoint names the tensors of one attention layer (see the table above).
enum class checkpoint_layout {
  automatic,       ///< recognised from the names in the file (when loading)
  torch_packed,    ///< torch.nn.MultiheadAttention with kdim = vdim = embed_dim
  torch_separate,  ///< torch.nn.MultiheadAttention with kdim or vdim != embed_dim
  hugging_face,    ///< Hugging Face Whisper, BART, Marian, ... (q_proj ... out_proj)
  diffusers,       ///< diffusers' Attention (Stable Diffusion UNet attn1/attn2)
  openai_whisper,  ///< openai-whisper's MultiHeadAttention (query, key, value, out)
  t5,              ///< T5 and flan-T5 (q, k, v, o; no biases, no score scaling)
};

/// A layout's name as written in this header ("hugging_face", ...).
inline const char* layout_name(checkpoint_layout l) noexcept {
  switch (l) {
    case checkpoint_layout::automatic:
      return "automatic";
    case checkpoint_layout::torch_packed:
      return "torch_packed";
    case checkpoint_layout::torch_separate:
      return "torch_separate";
    case checkpoint_layout::hugging_face:
      return "hugging_face";
    case checkpoint_layout::diffusers:
      return "diffusers";
    case checkpoint_layout::openai_whisper:
      return "openai_whisper";
    case checkpoint_layout::t5:
      return "t5";
  }
  return "?";
}

/// One attention layer found in a file: its prefix (without a trailing ".") and layout.
struct checkpoint_layer {
  std::string prefix;
  checkpoint_layout layout = checkpoint_layout::automatic;
};

/// What loading a layer needs besides the file: what the file cannot say.
struct checkpoint_options {
  checkpoint_options() = default;
  /// The usual call site: load_cross_attention<float>(file, prefix, {num_heads}).
  checkpoint_options(index_t heads) : num_heads(heads) {}  // NOLINT(google-explicit-constructor)

  index_t num_heads = 0;  ///< H, required: head_dim and num_kv_heads follow from the shapes
  checkpoint_layout layout = checkpoint_layout::automatic;  ///< or name one explicitly
  std::optional<double> scale;                              ///< overrides the layout's score scale
};

namespace detail {

inline constexpr checkpoint_layout known_layouts[] = {
    checkpoint_layout::torch_packed,   checkpoint_layout::torch_separate,
    checkpoint_layout::hugging_face,   checkpoint_layout::diffusers,
    checkpoint_layout::openai_whisper, checkpoint_layout::t5};

/// The tensor names of one layout, relative to the layer's prefix. Projections in the order
/// q, k, v, out. An empty bias name: the layout keeps that bias in `shared_bias` (torch) or has
/// none. torch_packed keeps the q, k and v weights in `packed_weight`.
struct layout_names {
  std::array<const char*, 4> weight{}, bias{};
  const char* packed_weight = nullptr;
  const char* shared_bias = nullptr;
};

inline layout_names names_of(checkpoint_layout l) noexcept {
  switch (l) {
    case checkpoint_layout::torch_packed:
      return {{nullptr, nullptr, nullptr, "out_proj.weight"},
              {nullptr, nullptr, nullptr, "out_proj.bias"},
              "in_proj_weight",
              "in_proj_bias"};
    case checkpoint_layout::torch_separate:
      return {{"q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"},
              {nullptr, nullptr, nullptr, "out_proj.bias"},
              nullptr,
              "in_proj_bias"};
    case checkpoint_layout::hugging_face:
      return {{"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"},
              {"q_proj.bias", "k_proj.bias", "v_proj.bias", "out_proj.bias"}};
    case checkpoint_layout::diffusers:
      return {{"to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"},
              {"to_q.bias", "to_k.bias", "to_v.bias", "to_out.0.bias"}};
    case checkpoint_layout::openai_whisper:
      return {{"query.weight", "key.weight", "value.weight", "out.weight"},
              {"query.bias", "key.bias", "value.bias", "out.bias"}};
    case checkpoint_layout::t5:
      return {{"q.weight", "k.weight", "v.weight", "o.weight"},
              {"q.bias", "k.bias", "v.bias", "o.bias"}};
    default:
      return {};
  }
}

/// The name that marks a layout's layer: its q weight (or packed weight).
inline const char* anchor_of(checkpoint_layout l) noexcept {
  const layout_names n = names_of(l);
  return n.packed_weight ? n.packed_weight : n.weight[0];
}

inline std::string join_prefix(const std::string& prefix, const char* name) {
  if (prefix.empty() || prefix.back() == '.') return prefix + name;
  return prefix + "." + name;
}

inline bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

/// True when every weight of layout l is in the file under prefix.
inline bool has_layer(const safetensors_file& f, const std::string& prefix, checkpoint_layout l) {
  const layout_names n = names_of(l);
  if (n.packed_weight && !f.contains(join_prefix(prefix, n.packed_weight))) return false;
  for (const char* w : n.weight)
    if (w && !f.contains(join_prefix(prefix, w))) return false;
  return true;
}

/// One layer as the file holds it: names, the widths its shapes give, and which biases exist.
struct layer_plan {
  checkpoint_layout layout = checkpoint_layout::automatic;
  std::string prefix;
  index_t model_dim = 0, inner = 0, context_dim = 0, kv_inner = 0, value_context_dim = 0;
  std::array<bool, 4> bias{};  ///< q, k, v, out
};

inline std::vector<index_t> shape_of(const safetensors_file& f, const std::string& name,
                                     std::size_t rank) {
  const safetensors_tensor_info& t = f.info(name);  // format_error when missing
  if (t.shape.size() != rank)
    safetensors_file::fail(f.name(), "tensor '" + name + "' has shape " + shape_string(t.shape) +
                                         ", expected " + std::to_string(rank) + " dimensions");
  return t.shape;
}

inline void require_shape(const safetensors_file& f, const std::string& name,
                          const std::vector<index_t>& want) {
  const std::vector<index_t> got = shape_of(f, name, want.size());
  if (got != want)
    safetensors_file::fail(f.name(), "tensor '" + name + "' has shape " + shape_string(got) +
                                         ", expected " + shape_string(want));
}

/// Recognises (or takes) the layout under prefix and reads the widths from its weights.
inline layer_plan plan_layer(const safetensors_file& f, const std::string& prefix,
                             checkpoint_layout layout) {
  layer_plan p;
  p.prefix = prefix;
  if (layout == checkpoint_layout::automatic) {
    // Two complete layouts under one prefix (Hugging Face and diffusers names side by side)
    // would make the choice arbitrary: an error naming both, and how to pick one.
    for (checkpoint_layout l : known_layouts)
      if (has_layer(f, prefix, l)) {
        if (layout != checkpoint_layout::automatic)
          safetensors_file::fail(
              f.name(), std::string("two attention layers under prefix '") + prefix + "': " +
                            layout_name(layout) + " (" + anchor_of(layout) + ") and " +
                            layout_name(l) + " (" + anchor_of(l) +
                            "); name the one to load in checkpoint_options::layout");
        layout = l;
      }
    if (layout == checkpoint_layout::automatic) {
      std::string found, tried;
      int listed = 0, more = 0;
      for (const std::string& n : f.names())
        if (prefix.empty() ||
            n.compare(0, join_prefix(prefix, "").size(), join_prefix(prefix, "")) == 0) {
          if (listed < 24)
            found += (listed++ ? ", '" : "'") + n + "'";
          else
            ++more;
        }
      if (more) found += " and " + std::to_string(more) + " more";
      for (checkpoint_layout l : known_layouts)
        tried +=
            std::string(tried.empty() ? "" : ", ") + layout_name(l) + " (" + anchor_of(l) + ")";
      safetensors_file::fail(f.name(), "no attention layer under prefix '" + prefix + "': found " +
                                           (listed ? found : "no tensors") +
                                           "; tried the layouts " + tried);
    }
  }
  p.layout = layout;
  const layout_names n = names_of(layout);
  const auto name = [&](const char* x) { return join_prefix(prefix, x); };
  const std::vector<index_t> out = shape_of(f, name(n.weight[3]), 2);
  p.model_dim = out[0];
  p.inner = out[1];
  if (n.packed_weight) {
    // Rows [0, inner) are Q, then K and V with kv_inner rows each.
    const std::vector<index_t> all = shape_of(f, name(n.packed_weight), 2);
    if (all[0] < p.inner || (all[0] - p.inner) % 2 != 0)
      safetensors_file::fail(f.name(), "tensor '" + name(n.packed_weight) + "' has shape " +
                                           shape_string(all) + ", expected [" +
                                           std::to_string(p.inner) + " + 2·kv, " +
                                           std::to_string(p.model_dim) + "]");
    p.kv_inner = (all[0] - p.inner) / 2;
    p.context_dim = p.value_context_dim = all[1];
    require_shape(f, name(n.packed_weight), {p.inner + 2 * p.kv_inner, p.model_dim});
  } else {
    p.context_dim = shape_of(f, name(n.weight[1]), 2)[1];
    p.kv_inner = shape_of(f, name(n.weight[1]), 2)[0];
    p.value_context_dim = shape_of(f, name(n.weight[2]), 2)[1];
    require_shape(f, name(n.weight[0]), {p.inner, p.model_dim});
    require_shape(f, name(n.weight[2]), {p.kv_inner, p.value_context_dim});
  }
  for (int i = 0; i < 4; ++i) {
    const char* b = i < 3 && n.shared_bias ? n.shared_bias : n.bias[std::size_t(i)];
    p.bias[std::size_t(i)] = b && f.contains(name(b));
  }
  return p;
}

/// The weights of the layer in plan p, checked against the resolved config c.
template <class T>
cross_attention_weights<T> read_layer(const safetensors_file& f, const layer_plan& p,
                                      const cross_attention_config& c) {
  const layout_names n = names_of(p.layout);
  const auto name = [&](const char* x) { return join_prefix(p.prefix, x); };
  const index_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  cross_attention_weights<T> w = zero_weights<T>(c);
  const std::array<linear<T>*, 4> lin = {&w.q_proj, &w.k_proj, &w.v_proj, &w.out_proj};
  const auto fill = [](linear<T>& l, const std::vector<T>& values, index_t first_row) {
    l.weight = Eigen::Map<const row_matrix<T>>(values.data() + first_row * l.in_features(),
                                               l.out_features(), l.in_features());
  };
  if (n.packed_weight) {
    if (c.context_dim != c.model_dim || c.value_context_dim != c.model_dim)
      safetensors_file::fail(f.name(), "tensor '" + name(n.packed_weight) +
                                           "' is packed, which needs context_dim = "
                                           "value_context_dim = model_dim");
    const std::vector<T> all = f.read<T>(name(n.packed_weight), {q + 2 * kv, c.model_dim});
    fill(w.q_proj, all, 0);
    fill(w.k_proj, all, q);
    fill(w.v_proj, all, q + kv);
  } else {
    for (int i = 0; i < 3; ++i) {
      linear<T>& l = *lin[std::size_t(i)];
      fill(l, f.read<T>(name(n.weight[std::size_t(i)]), {l.out_features(), l.in_features()}), 0);
    }
  }
  fill(w.out_proj, f.read<T>(name(n.weight[3]), {c.model_dim, q}), 0);
  // Biases: torch keeps q, k and v in one stacked in_proj_bias (all three or none).
  if (n.shared_bias && (*c.q_bias || *c.k_bias || *c.v_bias)) {
    const std::vector<T> b = f.read<T>(name(n.shared_bias), {q + 2 * kv});
    index_t from = 0;
    for (int i = 0; i < 3; ++i) {
      linear<T>& l = *lin[std::size_t(i)];
      for (index_t r = 0; r < l.out_features(); ++r) l.bias(r) = b[std::size_t(from + r)];
      from += l.out_features();
    }
  }
  for (int i = n.shared_bias ? 3 : 0; i < 4; ++i) {
    linear<T>& l = *lin[std::size_t(i)];
    if (!l.has_bias()) continue;
    const std::vector<T> b = f.read<T>(name(n.bias[std::size_t(i)]), {l.out_features()});
    for (index_t r = 0; r < l.out_features(); ++r) l.bias(r) = b[std::size_t(r)];
  }
  return w;
}

}  // namespace detail

/// Every attention layer in the file: each prefix under which the weights of a known layout
/// sit, sorted by prefix. Self-attention layers are listed too (they load the same way; run
/// them with the query as their context).
inline std::vector<checkpoint_layer> find_attention_layers(const safetensors_file& file) {
  std::set<std::pair<std::string, int>> found;
  for (const std::string& name : file.names())
    for (checkpoint_layout l : detail::known_layouts) {
      const std::string anchor = detail::anchor_of(l);
      std::string prefix;
      if (name == anchor)
        prefix = "";
      else if (detail::ends_with(name, "." + anchor))
        prefix = name.substr(0, name.size() - anchor.size() - 1);
      else
        continue;
      if (detail::has_layer(file, prefix, l)) found.insert({prefix, int(l)});
    }
  std::vector<checkpoint_layer> out;
  for (const auto& [prefix, l] : found) out.push_back({prefix, checkpoint_layout(l)});
  return out;
}

namespace detail {

/// The configuration the shapes of plan p give with opts' head count (see checkpoint_config).
inline cross_attention_config config_from_plan(const layer_plan& p,
                                               const checkpoint_options& opts) {
  constexpr const char* fn = "checkpoint_config";
  if (opts.num_heads < 1)
    fail_value(message(fn, ": num_heads is ", opts.num_heads,
                       ", expected >= 1 (a checkpoint does not say it)"));
  const index_t H = opts.num_heads;
  if (p.inner % H != 0)
    fail_value(message(fn, ": num_heads = ", H, " does not divide the layer's inner width ",
                       p.inner, " (", layout_name(p.layout), " under '", p.prefix, "')"));
  cross_attention_config c;
  c.model_dim = p.model_dim;
  c.context_dim = p.context_dim;
  c.value_context_dim = p.value_context_dim;
  c.num_heads = H;
  c.head_dim = p.inner / H;
  if (c.head_dim == 0 || p.kv_inner == 0 || p.kv_inner % c.head_dim != 0 ||
      H % (p.kv_inner / c.head_dim) != 0)
    fail_value(message(fn, ": the key width ", p.kv_inner,
                       " is not a divisor of num_heads times head_dim ", c.head_dim, " (",
                       layout_name(p.layout), " under '", p.prefix, "')"));
  c.num_kv_heads = p.kv_inner / c.head_dim;
  c.q_bias = p.bias[0];
  c.k_bias = p.bias[1];
  c.v_bias = p.bias[2];
  c.out_bias = p.bias[3];
  c.bias = p.bias[0] || p.bias[1] || p.bias[2] || p.bias[3];
  if (opts.scale)
    c.scale = opts.scale;
  else if (p.layout == checkpoint_layout::t5)
    c.scale = 1.0;
  return c.resolved();
}

/// A configuration given in full, completed from the file of plan p: each projection's bias
/// as the file holds it (a conflict with an explicit setting is a format_error naming the
/// tensor) and, unless set, T5's scale.
inline cross_attention_config config_for_plan(const safetensors_file& file, const layer_plan& p,
                                              const cross_attention_config& config) {
  cross_attention_config c = config;
  const std::array<std::optional<bool>*, 4> flags = {&c.q_bias, &c.k_bias, &c.v_bias, &c.out_bias};
  const layout_names n = names_of(p.layout);
  for (std::size_t i = 0; i < 4; ++i) {
    const char* b = i < 3 && n.shared_bias ? n.shared_bias : n.bias[i];
    if (p.bias[i] && !flags[i]->value_or(c.bias))
      safetensors_file::fail(
          file.name(), "tensor '" + join_prefix(p.prefix, b) +
                           "' is in the file but the config gives that projection no bias, so "
                           "it would be ignored; set config.bias = true");
    if (!p.bias[i] && flags[i]->value_or(false))  // asked for explicitly, but absent
      safetensors_file::fail(file.name(),
                             "tensor '" + join_prefix(p.prefix, b ? b : "bias") +
                                 "' is missing, and the config gives that projection a bias");
    *flags[i] = p.bias[i];
  }
  if (!c.scale && p.layout == checkpoint_layout::t5) c.scale = 1.0;
  return c.resolved();
}

}  // namespace detail

/// The configuration of the layer under prefix, read from its shapes: model_dim, context_dim,
/// value_context_dim and the inner widths from the weights, head_dim = inner width / num_heads,
/// num_kv_heads from the key width, a bias for each projection whose bias the file holds, and
/// the layout's scale (T5: 1). A num_heads that does not divide the widths is a value_error;
/// an unknown layout is a format_error listing the tensors under the prefix and the layouts
/// tried.
inline cross_attention_config checkpoint_config(const safetensors_file& file,
                                                const std::string& prefix,
                                                const checkpoint_options& opts) {
  return detail::config_from_plan(detail::plan_layer(file, prefix, opts.layout), opts);
}

/// Reads the layer under prefix (one call, no renaming): its configuration from the shapes
/// (checkpoint_config) and its weights converted to T.
template <class T>
multi_head_cross_attention<T> load_cross_attention(const safetensors_file& file,
                                                   const std::string& prefix,
                                                   const checkpoint_options& opts) {
  const detail::layer_plan p = detail::plan_layer(file, prefix, opts.layout);
  const cross_attention_config c = detail::config_from_plan(p, opts);
  return multi_head_cross_attention<T>(c, detail::read_layer<T>(file, p, c));
}

/// Reads the weights of the layer under prefix for a configuration given in full: the layout is
/// recognised from the names, every tensor must have the shape the config gives it (a
/// format_error naming the tensor otherwise), and each projection has the bias the file holds.
/// A bias in the file that the config rules out (bias = false, or q_bias ... out_bias = false)
/// is a format_error naming it: no tensor is dropped silently; so is a bias that q_bias ...
/// out_bias ask for explicitly and the file lacks (the default bias = true asks for nothing).
/// Unless config.scale is set, a T5 layer gets scale 1.
template <class T>
cross_attention_weights<T> load_cross_attention_weights(const safetensors_file& file,
                                                        const cross_attention_config& config,
                                                        const std::string& prefix = "") {
  const detail::layer_plan p = detail::plan_layer(file, prefix, checkpoint_layout::automatic);
  return detail::read_layer<T>(file, p, detail::config_for_plan(file, p, config));
}

/// A module with the weights load_cross_attention_weights reads, its config completed from the
/// file the same way (biases, T5's scale).
template <class T>
multi_head_cross_attention<T> load_cross_attention(const safetensors_file& file,
                                                   const cross_attention_config& config,
                                                   const std::string& prefix = "") {
  const detail::layer_plan p = detail::plan_layer(file, prefix, checkpoint_layout::automatic);
  const cross_attention_config c = detail::config_for_plan(file, p, config);
  return multi_head_cross_attention<T>(c, detail::read_layer<T>(file, p, c));
}

}  // namespace xattn
