// SPDX-License-Identifier: MIT
// libFuzzer target: arbitrary bytes as a safetensors file, parsed in memory. A file the parser
// accepts must then be readable in full: every tensor is read as float and as double (so every
// dtype conversion and every offset is exercised), and the weights of a cross-attention layer
// are loaded under the "attn." prefix and under none, with a configuration taken from the
// file's __metadata__ (model_dim, context_dim, value_context_dim, num_heads, num_kv_heads, bias;
// small values only, as tests/make_fixtures.py writes them). The parser may reject the file
// with a format_error and the weight loader may reject it the same way; a crash, a sanitizer
// report, a failed XATTN_ASSERT, any other exception (std::bad_alloc from a size the file
// claims included), or a read of an accepted tensor that throws is a bug.
#include "xattn/errors.hpp"
#include "xattn/checkpoints.hpp"
#include "xattn/safetensors.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace {

using xattn::index_t;

// A __metadata__ entry as an integer of at most two decimal digits, else the fallback.
index_t small_int(const std::map<std::string, std::string>& meta, const char* key,
                  index_t fallback) {
  const auto it = meta.find(key);
  if (it == meta.end() || it->second.empty() || it->second.size() > 2) return fallback;
  index_t v = 0;
  for (const char c : it->second) {
    if (c < '0' || c > '9') return fallback;
    v = v * 10 + (c - '0');
  }
  return v;
}

template <class T>
void read_every_tensor(const xattn::safetensors_file& file) {
  for (const std::string& name : file.names()) {
    const xattn::safetensors_tensor_info& info = file.info(name);
    // Integer, BOOL and F8 tensors are listed but not read as numbers; an F64 value beyond
    // float's range is reported. Both are format_errors, and nothing else may throw.
    const bool may_fail = !xattn::detail::is_float_dtype(info.dtype) ||
                          (info.dtype == xattn::safetensors_dtype::f64 && sizeof(T) < 8);
    std::optional<xattn::safetensors_tensor<T>> read;
    try {
      read.emplace(file.read<T>(name));
    } catch (const xattn::format_error&) {
      if (!may_fail) std::abort();
      continue;
    }
    if (!xattn::detail::is_float_dtype(info.dtype)) std::abort();  // must not have been read
    const xattn::safetensors_tensor<T>& t = *read;
    if (t.shape != info.shape || index_t(t.values.size()) != info.size()) std::abort();
    volatile T sink = 0;  // touch every value, so a bad read cannot be optimised away
    for (const T x : t.values) sink = sink + x;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::optional<xattn::safetensors_file> file;
  try {
    file.emplace(std::vector<unsigned char>(data, data + size), "fuzz.safetensors");
  } catch (const xattn::format_error&) {
    return 0;  // rejected: fine
  }
  read_every_tensor<float>(*file);
  read_every_tensor<double>(*file);

  const auto& meta = file->metadata();
  xattn::cross_attention_config c;
  c.model_dim = small_int(meta, "model_dim", 8);
  c.context_dim = small_int(meta, "context_dim", 0);
  c.value_context_dim = small_int(meta, "value_context_dim", 0);
  c.num_heads = small_int(meta, "num_heads", 2);
  c.num_kv_heads = small_int(meta, "num_kv_heads", 0);
  c.bias = small_int(meta, "bias", 1) != 0;
  try {
    (void)c.resolved();
  } catch (const xattn::value_error&) {
    return 0;  // the metadata describes no valid layer
  }
  // Every layer the file seems to hold, by prefix and a head count from the metadata.
  for (const xattn::checkpoint_layer& layer : xattn::find_attention_layers(*file)) {
    try {
      (void)xattn::load_cross_attention<float>(*file, layer.prefix, {c.num_heads});
    } catch (const xattn::format_error&) {
      // a tensor of the wrong shape or dtype: fine
    } catch (const xattn::value_error&) {
      // num_heads does not fit the widths: fine
    }
  }
  for (const char* prefix : {"attn.", ""}) {
    try {
      (void)xattn::load_cross_attention<float>(*file, c, prefix);
    } catch (const xattn::format_error&) {
      // a tensor missing or of the wrong shape: fine
    }
  }
  return 0;
}
