// SPDX-License-Identifier: MIT
// multi_head_cross_attention<T>: the layer a model uses. Queries come from the target side
// (decoder tokens, image latents), keys and values from a context (encoder output, prompt
// embeddings); projections, heads, grouped-query sharing and the output projection around one
// attention kernel call. context_cache<T> keeps a projected context for many query steps.
// The math of the kernel itself is in attention_naive.hpp.
#pragma once

#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/config.hpp"
#include "xattn/detail/validate.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/options.hpp"
#include "xattn/projection.hpp"
#include "xattn/quantized.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <type_traits>
#include <utility>

namespace xattn {

/// Which attention kernel the module runs. Both give the same results up to rounding.
enum class attention_kernel {
  tiled,  ///< tiled_attention: O(tile) scratch, the fast one (default)
  naive,  ///< naive_attention: the reference
};

/// The sizes of a cross-attention layer. Zero fields take the defaults named below; resolved()
/// fills them in and checks the whole configuration.
///
///   query    [B, Lq, Dm]  -> Q = query Wqᵀ        [B, Lq, H·Dk]
///   context  [B, Lk, Dc]  -> K = context Wkᵀ      [B, Lk, Hkv·Dk]
///   values   [B, Lk, Dcv] -> V = values Wvᵀ       [B, Lk, Hkv·Dk]
///   attention per head, then out = O Woᵀ           [B, Lq, Dm]
struct cross_attention_config {
  index_t model_dim = 0;          ///< Dm: query-side width (PyTorch embed_dim)
  index_t context_dim = 0;        ///< Dc: width of the context keys come from (kdim); 0: Dm
  index_t value_context_dim = 0;  ///< Dcv: width of the context values come from (vdim); 0: Dc
  index_t num_heads = 1;          ///< H: query heads
  index_t num_kv_heads = 0;       ///< Hkv: key/value heads, divides H (1: multi-query); 0: H
  index_t head_dim = 0;           ///< Dk: per-head width of q, k and v; 0: Dm / H
  bool bias = true;               ///< whether the projections have a bias (see the four below)
  /// Per projection: whether q_proj, k_proj, v_proj and out_proj have a bias; unset: `bias`.
  /// (Whisper's k_proj has none; diffusers' attention has only the output's.)
  std::optional<bool> q_bias, k_bias, v_bias, out_bias;
  /// The score scale: scores are scale · q · k. Unset: 1/sqrt(head_dim) (1 when head_dim is 0).
  /// T5 uses 1. A scale in cross_attention_options overrides it for one call.
  std::optional<double> scale;

  /// The configuration with defaults filled in; throws value_error when it is inconsistent.
  cross_attention_config resolved() const {
    constexpr const char* fn = "cross_attention_config";
    cross_attention_config c = *this;
    if (c.model_dim <= 0)
      detail::fail_value(detail::message(fn, ": model_dim is ", c.model_dim, ", expected >= 1"));
    if (c.num_heads <= 0)
      detail::fail_value(detail::message(fn, ": num_heads is ", c.num_heads, ", expected >= 1"));
    if (c.context_dim == 0) c.context_dim = c.model_dim;
    if (c.value_context_dim == 0) c.value_context_dim = c.context_dim;
    if (c.num_kv_heads == 0) c.num_kv_heads = c.num_heads;
    if (c.context_dim < 0 || c.value_context_dim < 0)
      detail::fail_value(detail::message(fn, ": context_dim is ", c.context_dim,
                                         " and value_context_dim is ", c.value_context_dim,
                                         ", expected >= 1 (or 0 for the default)"));
    if (c.num_kv_heads < 0 || c.num_heads % c.num_kv_heads != 0)
      detail::fail_value(detail::message(fn, ": num_heads = ", c.num_heads,
                                         " is not a multiple of num_kv_heads = ", c.num_kv_heads));
    if (c.head_dim == 0) {
      if (c.model_dim % c.num_heads != 0)
        detail::fail_value(detail::message(fn, ": model_dim = ", c.model_dim,
                                           " is not a multiple of num_heads = ", c.num_heads,
                                           "; set head_dim explicitly"));
      c.head_dim = c.model_dim / c.num_heads;
    }
    if (c.head_dim < 0)
      detail::fail_value(detail::message(fn, ": head_dim is ", c.head_dim, ", expected >= 1"));
    for (std::optional<bool>* b : {&c.q_bias, &c.k_bias, &c.v_bias, &c.out_bias})
      if (!b->has_value()) *b = c.bias;
    if (!c.scale) c.scale = c.head_dim > 0 ? 1.0 / std::sqrt(double(c.head_dim)) : 1.0;
    if (!std::isfinite(*c.scale))
      detail::fail_value(
          detail::message(fn, ": scale is ", *c.scale, ", expected a finite number"));
    // Every size derived from the configuration must fit in index_t: the projection widths and
    // the element count of each weight matrix.
    const index_t q = product(fn, "num_heads", c.num_heads, "head_dim", c.head_dim);
    const index_t kv = product(fn, "num_kv_heads", c.num_kv_heads, "head_dim", c.head_dim);
    product(fn, "num_heads * head_dim", q, "model_dim", c.model_dim);
    product(fn, "num_kv_heads * head_dim", kv, "context_dim", c.context_dim);
    product(fn, "num_kv_heads * head_dim", kv, "value_context_dim", c.value_context_dim);
    return c;
  }

 private:
  static index_t product(const char* fn, const char* a_name, index_t a, const char* b_name,
                         index_t b) {
    if (a != 0 && b > std::numeric_limits<index_t>::max() / a)
      detail::fail_value(detail::message(fn, ": ", a_name, " = ", a, " times ", b_name, " = ", b,
                                         " overflows the index type"));
    return a * b;
  }
};

/// The four projections, named as in PyTorch and Hugging Face models. With the resolved config:
///
///   q_proj   weight [H·Dk, Dm]     k_proj weight [Hkv·Dk, Dc]    v_proj weight [Hkv·Dk, Dcv]
///   out_proj weight [Dm, H·Dk]     each bias [out] when the config gives that projection one
///                                  (q_bias, k_bias, v_bias, out_bias), empty otherwise
template <class T>
struct cross_attention_weights {
  linear<T> q_proj, k_proj, v_proj, out_proj;
};

/// Zero weights (and zero biases where the config has them) of the right shapes for cfg.
template <class T>
cross_attention_weights<T> zero_weights(const cross_attention_config& config) {
  const cross_attention_config c = config.resolved();
  const index_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  return {linear<T>(q, c.model_dim, *c.q_bias), linear<T>(kv, c.context_dim, *c.k_bias),
          linear<T>(kv, c.value_context_dim, *c.v_bias), linear<T>(c.model_dim, q, *c.out_bias)};
}

/// Weights drawn uniformly from [-1/sqrt(in), 1/sqrt(in)] (the scale of PyTorch's default
/// initialisation), reproducible from the seed: for tests, examples and benchmarks.
template <class T>
cross_attention_weights<T> random_weights(const cross_attention_config& config,
                                          std::uint32_t seed) {
  cross_attention_weights<T> w = zero_weights<T>(config);
  std::mt19937 rng(seed);
  for (linear<T>* l : {&w.q_proj, &w.k_proj, &w.v_proj, &w.out_proj}) {
    const double a = 1.0 / std::sqrt(double(l->in_features() > 0 ? l->in_features() : 1));
    std::uniform_real_distribution<double> dist(-a, a);
    for (index_t n = 0; n < l->weight.size(); ++n) l->weight.data()[n] = static_cast<T>(dist(rng));
    for (index_t n = 0; n < l->bias.size(); ++n) l->bias.data()[n] = static_cast<T>(dist(rng));
  }
  return w;
}

/// Per-call settings of multi_head_cross_attention::forward.
template <class T>
struct cross_attention_options {
  /// Masks in xattn's convention (see attention_mask in options.hpp): allowed is true where a
  /// query MAY attend a key, bias is added to the scaled scores. [B|1, H|1, Lq|1, Lk|1].
  /// A PyTorch boolean attn_mask is the opposite (true = may NOT attend): pass its negation.
  /// A PyTorch float attn_mask is a bias. A 3-D PyTorch mask [B·H, Lq, Lk] is the
  /// [B, H, Lq, Lk] view of the same data; a 2-D one [Lq, Lk] is to_rank<4> of its view.
  attention_mask<T> mask;
  /// PyTorch's key_padding_mask: [B, Lk], true where a key is padding and must be ignored.
  /// Combined with `mask`. When every row is padding only at its end (the usual case) it turns
  /// into kv_lengths, which the kernels handle fastest.
  std::optional<tensor_view<const bool, 2>> key_padding_mask;
  /// Receives each head's attention weights (PyTorch need_weights with
  /// average_attn_weights=False). [B, H, Lq, Lk]; float for a half T (statistic_t).
  std::optional<tensor_view<statistic_t<T>, 4>> weights_out;
  /// Receives the weights averaged over the heads (need_weights, average_attn_weights=True).
  /// [B, Lq, Lk]; float for a half T.
  std::optional<tensor_view<statistic_t<T>, 3>> average_weights_out;
  /// Multiplies Q Kᵀ. Unset: the layer's (cross_attention_config::scale).
  std::optional<double> scale;
  attention_kernel kernel = attention_kernel::tiled;  ///< the kernel to run
  tile_options tiles;                                 ///< passed to tiled_attention
};

namespace detail {

/// A buffer that only grows: asking for no more than it holds keeps its memory. Each growth is
/// counted, so a caller can check that repeated calls allocate nothing. The memory is aligned
/// for the widest SIMD Eigen uses, and comes from malloc through Eigen, which reports a failure
/// as std::bad_alloc. E is a trivial type (float, double, index_t, bool): elements start
/// uninitialised and are written before they are read.
template <class E>
class growing_buffer {
  static_assert(std::is_trivially_copyable_v<E>, "growing_buffer holds trivial elements only");

 public:
  growing_buffer() = default;
  /// A copy holds a copy of every element, in memory of its own.
  growing_buffer(const growing_buffer& other)
      : data_(allocate(other.capacity_)), capacity_(other.capacity_) {
    if (capacity_ > 0)
      std::memcpy(data_.get(), other.data_.get(), sizeof(E) * std::size_t(capacity_));
  }
  growing_buffer& operator=(const growing_buffer& other) {
    if (this != &other) *this = growing_buffer(other);
    return *this;
  }
  growing_buffer(growing_buffer&&) noexcept = default;
  growing_buffer& operator=(growing_buffer&&) noexcept = default;

  /// At least n elements; the old contents are kept when this throws (nothing else changes).
  E* ensure(index_t n, index_t& allocations) {
    if (n > capacity_) {
      data_ = allocate(n);
      capacity_ = n;
      ++allocations;
    }
    return data_.get();
  }
  E* data() const noexcept { return data_.get(); }
  index_t capacity() const noexcept { return capacity_; }

 private:
  struct release {
    void operator()(E* p) const noexcept { Eigen::internal::aligned_free(p); }
  };
  using owner = std::unique_ptr<E, release>;

  static owner allocate(index_t n) {
    if (n <= 0) return owner();
    if (std::size_t(n) > std::numeric_limits<std::size_t>::max() / sizeof(E)) {
      Eigen::internal::throw_std_bad_alloc();
      return owner();
    }
    return owner(static_cast<E*>(Eigen::internal::aligned_malloc(sizeof(E) * std::size_t(n))));
  }

  owner data_;
  index_t capacity_ = 0;
};

}  // namespace detail

template <class T>
class multi_head_cross_attention;

/// A context projected to keys and values once, for any number of forward calls against it (a
/// decoder generating token by token attends to the same encoder output at every step).
/// Made by multi_head_cross_attention::encode_context; reusing one keeps its memory. A copy is
/// a deep copy (its own keys and values). A cache is read-only during forward, so any number of
/// threads may run forward against one cache at once (each with its own module).
///
/// S is the type the keys and values are stored in: T, or for a float module a half type
/// (Eigen::half or Eigen::bfloat16, half.hpp), which halves the cache's memory and the bytes a
/// decoder step reads, or a quantized block type (q8_block, q4_block: quantized.hpp), which
/// stores 0.27x or 0.14x the bytes of float. The projections are computed in float and rounded
/// (or quantized, each head's row of Dk values in blocks of 32) once into the cache; the
/// attention then reads them through the kernels' mixed call (float queries, half or quantized
/// keys and values). A quantized cache is read by the tiled kernel only.
template <class T, class S = T>
class context_cache {
  static_assert(std::is_same_v<S, T> ||
                    (std::is_same_v<T, float> && (is_half_v<S> || is_quant_block_v<S>)),
                "a context cache stores T, or for a float module Eigen::half, Eigen::bfloat16, "
                "q8_block or q4_block");
  // (A module of a half type T keeps its cache in T: context_cache<Eigen::bfloat16>.)

 public:
  context_cache() = default;

  index_t batch() const noexcept { return batch_; }
  index_t kv_len() const noexcept { return kv_len_; }
  index_t num_kv_heads() const noexcept { return num_kv_heads_; }
  index_t head_dim() const noexcept { return head_dim_; }
  bool empty() const noexcept { return batch_ * kv_len_ == 0; }
  /// False after an encode_context that failed while writing the projections (an allocation
  /// inside the projection failed): forward then refuses the cache until a context is encoded
  /// into it again. A call that fails any earlier leaves the cache as it was.
  bool usable() const noexcept { return usable_; }

  /// Projected keys, heads read in place from the [B, Lk, Hkv·Dk] buffer: [B, Hkv, Lk, Dk]
  /// (for quantized blocks [B, Hkv, Lk, ceil(Dk / 32)] blocks)
  tensor_view<const S, 4> keys() const { return heads_of(k_); }
  /// Projected values: [B, Hkv, Lk, Dk] (or blocks, as keys)
  tensor_view<const S, 4> values() const { return heads_of(v_); }
  /// Bytes of the keys and values the cache holds now (its buffers may hold more).
  index_t bytes() const noexcept {
    return 2 * batch_ * kv_len_ * num_kv_heads_ * per_head() * index_t(sizeof(S));
  }

  /// How many times a buffer of this cache had to grow.
  index_t allocations() const noexcept { return allocations_; }

 private:
  friend class multi_head_cross_attention<T>;

  // Elements of S per head and row: Dk, or its blocks.
  index_t per_head() const noexcept {
    if constexpr (is_quant_block_v<S>)
      return quant_blocks_per_row(head_dim_);
    else
      return head_dim_;
  }
  tensor_view<S, 3> packed(const detail::growing_buffer<S>& buf) const {
    return tensor_view<S, 3>(buf.data(), {batch_, kv_len_, num_kv_heads_ * per_head()});
  }
  tensor_view<const S, 4> heads_of(const detail::growing_buffer<S>& buf) const {
    return split_heads(tensor_view<const S, 3>(packed(buf)), num_kv_heads_ > 0 ? num_kv_heads_ : 1);
  }

  index_t batch_ = 0, kv_len_ = 0, num_kv_heads_ = 0, head_dim_ = 0;
  detail::growing_buffer<S> k_, v_;
  index_t allocations_ = 0;
  bool usable_ = true;
};

/// Multi-head cross-attention with learned projections (torch.nn.MultiheadAttention's forward
/// with batch_first=True, plus kdim != vdim, grouped-query heads and a context cache):
///
///   query   [B, Lq, Dm]     context [B, Lk, Dc]     values [B, Lk, Dcv]     out [B, Lq, Dm]
///
/// Q, K and V stay in [B, L, H·Dk] buffers and the kernel reads the heads through strided views.
/// The module owns those buffers and grows them only, so repeated calls with the same shapes
/// allocate nothing of their own (workspace_allocations() counts the growths).
///
/// T may be a half type (Eigen::half, Eigen::bfloat16; half.hpp): the weights (loaded from F16
/// or BF16 safetensors as they are, checkpoints.hpp), query, context, out and the cache are
/// stored in it, the projections and the attention compute in float, and every stored result
/// (Q, K, V, the heads' outputs, out) is rounded once; attention weights come out in float.
///
/// Threads: forward writes the module's buffers, so one module must not run forward from two
/// threads at once. Copying a module is cheap: the copy shares the (immutable) weights and gets
/// buffers of its own, so give each thread a copy. set_weights on one module does not change
/// its copies. encode_context is const and writes only the cache it is given.
template <class T>
class multi_head_cross_attention {
  static_assert(is_element_v<T>,
                "multi_head_cross_attention needs a floating-point or half element type");

 public:
  /// A module with zero weights; set them with set_weights or load them (safetensors.hpp).
  explicit multi_head_cross_attention(const cross_attention_config& config)
      : config_(config.resolved()),
        weights_(std::make_shared<const cross_attention_weights<T>>(zero_weights<T>(config_))) {}

  /// A module with the given weights; throws shape_error when a weight does not fit config.
  multi_head_cross_attention(const cross_attention_config& config,
                             cross_attention_weights<T> weights)
      : config_(config.resolved()) {
    set_weights(std::move(weights));
  }

  /// A module with the same configuration, sharing the weights, with buffers of its own.
  multi_head_cross_attention(const multi_head_cross_attention& other)
      : config_(other.config_), weights_(other.weights_) {}
  multi_head_cross_attention& operator=(const multi_head_cross_attention& other) {
    if (this != &other) *this = multi_head_cross_attention(other);
    return *this;
  }
  multi_head_cross_attention(multi_head_cross_attention&&) noexcept = default;
  multi_head_cross_attention& operator=(multi_head_cross_attention&&) noexcept = default;

  /// The resolved configuration (no zero defaults left).
  const cross_attention_config& config() const noexcept { return config_; }
  const cross_attention_weights<T>& weights() const noexcept { return *weights_; }

  /// Replaces the weights after checking every shape against config(); on a shape_error the
  /// module keeps its weights.
  void set_weights(cross_attention_weights<T> w) {
    const auto& c = config_;
    const index_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
    check_linear("q_proj", w.q_proj, q, c.model_dim, *c.q_bias);
    check_linear("k_proj", w.k_proj, kv, c.context_dim, *c.k_bias);
    check_linear("v_proj", w.v_proj, kv, c.value_context_dim, *c.v_bias);
    check_linear("out_proj", w.out_proj, c.model_dim, q, *c.out_bias);
    weights_ = std::make_shared<const cross_attention_weights<T>>(std::move(w));
  }

  /// Projects a context to keys and values into `cache` (its memory is reused):
  ///
  ///   context [B, Lk, Dc]    values [B, Lk, Dcv]
  ///
  /// When the call fails before writing (a bad shape, or the cache could not grow) the cache is
  /// left as it was; see context_cache::usable for a failure while writing. A cache of a half
  /// type S gets the float projections rounded once.
  template <class S>
  void encode_context(tensor_view<const T, 3> context, tensor_view<const T, 3> values,
                      context_cache<T, S>& cache) const {
    encode_into("multi_head_cross_attention::encode_context", context, values, cache,
                cache.allocations_);
  }
  /// As above, returning a new cache; encode_context<Eigen::bfloat16>(context, values) stores
  /// it in bf16.
  template <class S = T>
  context_cache<T, S> encode_context(tensor_view<const T, 3> context,
                                     tensor_view<const T, 3> values) const {
    context_cache<T, S> cache;
    encode_context(context, values, cache);
    return cache;
  }
  /// Keys and values from the same context [B, Lk, Dc] (needs Dcv = Dc).
  template <class S = T>
  context_cache<T, S> encode_context(tensor_view<const T, 3> context) const {
    return encode_context<S>(context, context);
  }

  /// out = cross-attention of query over a context:
  ///
  ///   query [B, Lq, Dm]   context [B, Lk, Dc]   values [B, Lk, Dcv]   out [B, Lq, Dm] (written)
  ///
  /// No output (out, weights_out, average_weights_out) may share memory with an input, another
  /// output, or itself (a shape_error, nothing written).
  void forward(tensor_view<const T, 3> query, tensor_view<const T, 3> context,
               tensor_view<const T, 3> values, tensor_view<T, 3> out,
               const cross_attention_options<T>& opts = {}) {
    constexpr const char* fn = "multi_head_cross_attention::forward";
    check_outputs(fn, query, &context, &values, out, opts);
    encode_into(fn, context, values, own_cache_, allocations_);
    run(fn, query, own_cache_, out, opts);
  }
  /// Keys and values from the same context [B, Lk, Dc] (needs Dcv = Dc).
  void forward(tensor_view<const T, 3> query, tensor_view<const T, 3> context,
               tensor_view<T, 3> out, const cross_attention_options<T>& opts = {}) {
    forward(query, context, context, out, opts);
  }
  /// Against a context projected earlier by encode_context: no key/value projection at all.
  ///
  ///   query [B, Lq, Dm]   cache of B contexts   out [B, Lq, Dm] (written)
  ///
  /// The cache may be stored in a half type (see context_cache).
  template <class S>
  void forward(tensor_view<const T, 3> query, const context_cache<T, S>& cache,
               tensor_view<T, 3> out, const cross_attention_options<T>& opts = {}) {
    constexpr const char* fn = "multi_head_cross_attention::forward";
    if (!cache.usable())
      detail::fail_value(detail::message(
          fn,
          ": the cache is unusable: an earlier encode_context into it failed while writing; "
          "encode a context into it again"));
    check_outputs(fn, query, nullptr, nullptr, out, opts);
    run(fn, query, cache, out, opts);
  }

  /// How many times one of the module's own buffers had to grow. Unchanged by a call whose
  /// shapes (and requested outputs) are no larger than an earlier one's.
  index_t workspace_allocations() const noexcept { return allocations_; }

 private:
  static void check_linear(const char* name, const linear<T>& l, index_t out, index_t in,
                           bool bias) {
    constexpr const char* fn = "multi_head_cross_attention";
    if (l.out_features() != out || l.in_features() != in)
      detail::fail_shape(detail::message(fn, ": ", name, ".weight is [", l.out_features(), ", ",
                                         l.in_features(), "], expected [", out, ", ", in, "]"));
    if (bias && l.bias.size() != out)
      detail::fail_shape(detail::message(fn, ": ", name, ".bias.extent(0) is ", l.bias.size(),
                                         ", expected ", out, " (the config gives ", name,
                                         " a bias)"));
    if (!bias && l.has_bias())
      detail::fail_shape(
          detail::message(fn, ": ", name, " has a bias but the config gives it none"));
  }

  // The outputs of forward, checked against each other, themselves and every input before
  // anything is computed (context and values are null for the cache overload).
  void check_outputs(const char* fn, const tensor_view<const T, 3>& query,
                     const tensor_view<const T, 3>* context, const tensor_view<const T, 3>* values,
                     const tensor_view<T, 3>& out, const cross_attention_options<T>& opts) const {
    const attention_mask<T>& m = opts.mask;
    const auto apart = [&](const char* name, const auto& o) {
      detail::require_no_self_overlap(fn, name, o);
      detail::require_disjoint(fn, name, o, "query", query);
      if (context) detail::require_disjoint(fn, name, o, "context", *context);
      if (values) detail::require_disjoint(fn, name, o, "values", *values);
      if (m.kv_lengths) detail::require_disjoint(fn, name, o, "mask.kv_lengths", *m.kv_lengths);
      if (m.allowed) detail::require_disjoint(fn, name, o, "mask.allowed", *m.allowed);
      if (m.bias) detail::require_disjoint(fn, name, o, "mask.bias", *m.bias);
      if (opts.key_padding_mask)
        detail::require_disjoint(fn, name, o, "key_padding_mask", *opts.key_padding_mask);
    };
    apart("out", out);
    if (opts.weights_out) {
      apart("weights_out", *opts.weights_out);
      detail::require_disjoint(fn, "weights_out", *opts.weights_out, "out", out);
    }
    if (opts.average_weights_out) {
      const auto& avg = *opts.average_weights_out;
      apart("average_weights_out", avg);
      detail::require_disjoint(fn, "average_weights_out", avg, "out", out);
      if (opts.weights_out)
        detail::require_disjoint(fn, "average_weights_out", avg, "weights_out", *opts.weights_out);
    }
  }

  // Strong guarantee: every check and every allocation comes before the cache changes. Should
  // a projection still fail while writing (an allocation inside Eigen), the cache is marked
  // unusable rather than left half written.
  template <class S>
  void encode_into(const char* fn, const tensor_view<const T, 3>& context,
                   const tensor_view<const T, 3>& values, context_cache<T, S>& cache,
                   index_t& allocations) const {
    const auto& c = config_;
    detail::require_extent(fn, "context", 2, context.extent(2), c.context_dim);
    detail::require_extent(fn, "values", 0, values.extent(0), context.extent(0));
    detail::require_extent(fn, "values", 1, values.extent(1), context.extent(1));
    detail::require_extent(fn, "values", 2, values.extent(2), c.value_context_dim);
    const index_t batch = context.extent(0), kv_len = context.extent(1);
    index_t per_head = c.head_dim;  // elements of S per head and row
    if constexpr (is_quant_block_v<S>) per_head = quant_blocks_per_row(c.head_dim);
    const index_t n =
        detail::checked_mul(fn, detail::checked_mul(fn, batch, kv_len), c.num_kv_heads * per_head);
    for (const auto* buf : {&cache.k_, &cache.v_}) {  // a context read from the cache itself
      const tensor_view<const S, 1> held(buf->data(), {buf->capacity()});
      detail::require_disjoint(fn, "the cache", held, "context", context);
      detail::require_disjoint(fn, "the cache", held, "values", values);
    }
    // A half cache: the float projections of up to `chunk` context rows at a time, rounded.
    constexpr index_t chunk = 256;
    const index_t width = c.num_kv_heads * c.head_dim;
    row_matrix<compute_t<T>> rows;  // outputs packed: linear::forward needs no other scratch
    if constexpr (!std::is_same_v<S, T>) rows.resize(std::min(kv_len, chunk), width);
    cache.k_.ensure(n, allocations);
    cache.v_.ensure(n, allocations);
    cache.batch_ = batch;
    cache.kv_len_ = kv_len;
    cache.num_kv_heads_ = c.num_kv_heads;
    cache.head_dim_ = c.head_dim;
    cache.usable_ = false;  // until both projections are written
    if constexpr (std::is_same_v<S, T>) {
      weights_->k_proj.forward(context, cache.packed(cache.k_), rows);
      weights_->v_proj.forward(values, cache.packed(cache.v_), rows);
    } else {
      const auto project = [&](const linear<T>& proj, const tensor_view<const T, 3>& x,
                               const tensor_view<S, 3>& dst) {
        for (index_t b = 0; b < batch; ++b)
          for (index_t j0 = 0; j0 < kv_len; j0 += chunk) {
            const index_t m = std::min(chunk, kv_len - j0);
            const tensor_view<const T, 3> part(x.data() + b * x.stride(0) + j0 * x.stride(1),
                                               {1, m, x.extent(2)}, x.strides());
            row_matrix<T> unused;  // T = float here
            proj.forward(part, tensor_view<T, 3>(rows.data(), {1, m, width}), unused);
            if constexpr (is_quant_block_v<S>) {  // each head's row of Dk values in blocks
              const index_t hk = c.num_kv_heads, d = c.head_dim;
              quantize(tensor_view<const float, 3>(rows.data(), {m, hk, d}),
                       tensor_view<S, 3>(&dst(b, j0, 0), {m, hk, per_head}));
            } else {
              for (index_t r = 0; r < m; ++r)
                for (index_t e = 0; e < width; ++e) dst(b, j0 + r, e) = static_cast<S>(rows(r, e));
            }
          }
      };
      project(weights_->k_proj, context, cache.packed(cache.k_));
      project(weights_->v_proj, values, cache.packed(cache.v_));
    }
    cache.usable_ = true;
  }

  template <class S>
  void run(const char* fn, const tensor_view<const T, 3>& query, const context_cache<T, S>& cache,
           const tensor_view<T, 3>& out, const cross_attention_options<T>& opts) {
    const auto& c = config_;
    const cross_attention_weights<T>& w = *weights_;
    const index_t B = query.extent(0), Lq = query.extent(1), Lk = cache.kv_len();
    const index_t H = c.num_heads, width = c.num_heads * c.head_dim;
    detail::require_extent(fn, "query", 2, query.extent(2), c.model_dim);
    if (is_quant_block_v<S> && opts.kernel == attention_kernel::naive)
      detail::fail_value(detail::message(fn, ": the naive kernel does not read a ", quant_name<S>(),
                                         " cache; use attention_kernel::tiled"));
    if (cache.batch() != B)
      detail::fail_shape(detail::message(fn, ": the context has batch ", cache.batch(),
                                         ", expected query.extent(0) = ", B));
    if (cache.num_kv_heads() != c.num_kv_heads || cache.head_dim() != c.head_dim)
      detail::fail_shape(detail::message(fn, ": the cache holds ", cache.num_kv_heads(),
                                         " heads of width ", cache.head_dim(), ", expected ",
                                         c.num_kv_heads, " of width ", c.head_dim));
    detail::require_extent(fn, "out", 0, out.extent(0), B);
    detail::require_extent(fn, "out", 1, out.extent(1), Lq);
    detail::require_extent(fn, "out", 2, out.extent(2), c.model_dim);
    if (opts.average_weights_out) {
      const index_t want[3] = {B, Lq, Lk};
      for (int r = 0; r < 3; ++r)
        detail::require_extent(fn, "average_weights_out", r,
                               opts.average_weights_out->extent(std::size_t(r)), want[r]);
    }
    const index_t rows = detail::checked_mul(fn, B, Lq);
    const index_t n = detail::checked_mul(fn, rows, width);

    // Q = query Wqᵀ + bq into [B, Lq, H·Dk]; the kernel reads it as [B, H, Lq, Dk] in place.
    const tensor_view<T, 3> q(q_.ensure(n, allocations_), {B, Lq, width});
    const tensor_view<T, 3> o(o_.ensure(n, allocations_), {B, Lq, width});
    w.q_proj.forward(query, q, scratch_);

    attention_options<T> ao;
    ao.scale = opts.scale ? opts.scale : c.scale;
    ao.mask = opts.mask;
    if (opts.key_padding_mask)
      add_key_padding(fn, *opts.key_padding_mask, attention_shape{B, H, Lq, Lk, 0, 0, 0}, ao.mask);
    if (opts.weights_out) {
      ao.weights_out = opts.weights_out;
    } else if (opts.average_weights_out) {
      const index_t nw = detail::checked_mul(fn, detail::checked_mul(fn, rows, H), Lk);
      ao.weights_out = tensor_view<W, 4>(w_.ensure(nw, allocations_), {B, H, Lq, Lk});
    }

    const auto qh = split_heads(tensor_view<const T, 3>(q), H);
    const auto oh = split_heads(o, H);
    if constexpr (is_quant_block_v<S>)  // the tiled kernel only (checked on entry)
      tiled_attention<T>(qh, cache.keys(), cache.values(), oh, ao, opts.tiles);
    else if (opts.kernel == attention_kernel::naive)
      naive_attention<T>(qh, cache.keys(), cache.values(), oh, ao);
    else
      tiled_attention<T>(qh, cache.keys(), cache.values(), oh, ao, opts.tiles);  // S: mixed

    // need_weights with averaging: the mean over heads, as PyTorch's average_attn_weights.
    if (opts.average_weights_out) {
      const auto& wts = *ao.weights_out;
      const auto& avg = *opts.average_weights_out;
      const W inv = W(1) / W(H);
      for (index_t b = 0; b < B; ++b)
        for (index_t i = 0; i < Lq; ++i)
          for (index_t j = 0; j < Lk; ++j) {
            W sum = 0;
            for (index_t h = 0; h < H; ++h) sum += wts(b, h, i, j);
            avg(b, i, j) = sum * inv;
          }
    }

    // out = O Woᵀ + bo, the heads concatenated along the feature axis.
    w.out_proj.forward(tensor_view<const T, 3>(o), out, scratch_);
  }

  // Folds PyTorch's key_padding_mask (true = ignore) into mask: as kv_lengths when each row is
  // padding only from some position to the end, else as an allowed mask [B, H|1, Lq|1, Lk]
  // combined with the caller's own.
  void add_key_padding(const char* fn, const tensor_view<const bool, 2>& pad,
                       const attention_shape& s, attention_mask<T>& mask) {
    const index_t B = s.batch, Lk = s.kv_len;
    // key_padding_mask marks the call's own keys, folded into kv_lengths that count the
    // window's key positions: the same only when the window holds every key.
    if (mask.window && (mask.window->key_offset != 0 || mask.window->kv_len.value_or(Lk) != Lk))
      detail::fail_value(detail::message(
          fn,
          ": key_padding_mask cannot be combined with mask.window over part of the keys; "
          "give the padding as mask.kv_lengths in the window's positions"));
    if (mask.kv_lengths)
      detail::require_extent(fn, "mask.kv_lengths", 0, mask.kv_lengths->extent(0), B);
    if (mask.allowed) detail::require_broadcastable(fn, "mask.allowed", *mask.allowed, s);
    detail::require_extent(fn, "key_padding_mask", 0, pad.extent(0), B);
    detail::require_extent(fn, "key_padding_mask", 1, pad.extent(1), Lk);
    index_t* len = lengths_.ensure(B, allocations_);
    bool suffix = true;
    for (index_t b = 0; b < B; ++b) {
      index_t first = Lk;
      for (index_t j = 0; j < Lk; ++j)
        if (pad(b, j)) {
          first = j;
          break;
        }
      for (index_t j = first; j < Lk; ++j) suffix = suffix && pad(b, j);
      len[b] = first;
      if (mask.kv_lengths) {
        const index_t theirs = (*mask.kv_lengths)(b);
        if (theirs < 0 || theirs > Lk)
          detail::fail_value(detail::message(fn, ": mask.kv_lengths(", b, ") is ", theirs,
                                             ", expected a value in [0, ", Lk, "]"));
        if (theirs < len[b]) len[b] = theirs;
      }
    }
    if (suffix) {
      mask.kv_lengths = tensor_view<const index_t, 1>(len, {B});
      return;
    }
    const index_t H = mask.allowed ? mask.allowed->extent(1) : 1;
    const index_t Lq = mask.allowed ? mask.allowed->extent(2) : 1;
    const index_t n = detail::checked_mul(fn, detail::checked_mul(fn, B * H, Lq), Lk);
    const tensor_view<bool, 4> allowed(allowed_.ensure(n, allocations_), {B, H, Lq, Lk});
    for (index_t b = 0; b < B; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < Lq; ++i)
          for (index_t j = 0; j < Lk; ++j) {
            bool ok = !pad(b, j);
            if (mask.allowed) {
              const auto& a = *mask.allowed;
              ok = ok && a(a.extent(0) == 1 ? 0 : b, h, i, a.extent(3) == 1 ? 0 : j);
            }
            allowed(b, h, i, j) = ok;
          }
    mask.allowed = tensor_view<const bool, 4>(allowed);
  }

  cross_attention_config config_;
  std::shared_ptr<const cross_attention_weights<T>> weights_;  // shared by copies
  context_cache<T> own_cache_;  // the projected context of forward(query, context, ...)
  using W = statistic_t<T>;     // the weights' type: float for a half T
  detail::growing_buffer<T> q_, o_;
  detail::growing_buffer<W> w_;
  detail::growing_buffer<index_t> lengths_;
  detail::growing_buffer<bool> allowed_;
  row_matrix<compute_t<T>> scratch_;  // strided outputs of a projection; half panels
  index_t allocations_ = 0;
};

}  // namespace xattn
