// SPDX-License-Identifier: MIT
// libFuzzer target: arbitrary kernel arguments. The input bytes choose the extents, strides and
// positions of q, k, v, out, the masks and the extra outputs inside one shared buffer (so views
// overlap), the scale, the padding lengths, the tile options and the element values (NaN and
// Inf included). Every call must either finish or throw an xattn error; a crash, a sanitizer
// report, a failed XATTN_ASSERT, another exception, or a rejected call that changed a byte of the
// buffer is a bug. Views that would reach past the buffer are skipped: that is the caller's
// mistake, and no check can see it.
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/errors.hpp"

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

using xattn::index_t;

constexpr std::size_t arena_floats = 4096;

// Reads the fuzzer's bytes front to back; zeros once they run out.
class reader {
 public:
  reader(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  std::uint8_t byte() { return pos_ < size_ ? data_[pos_++] : 0; }
  bool more() const { return pos_ < size_; }
  template <class U>
  U raw() {
    U u{};
    unsigned char bytes[sizeof(U)];
    for (auto& b : bytes) b = byte();
    std::memcpy(&u, bytes, sizeof(U));
    return u;
  }
  // Mostly small values, now and then any 64-bit value (to reach the overflow checks).
  index_t extent() {
    const std::uint8_t b = byte();
    if (b == 0xff) return raw<index_t>();
    return index_t(b % 9);
  }
  index_t stride() {
    const std::uint8_t b = byte();
    if (b == 0xff) return raw<index_t>();
    return index_t(b % 64);
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_, pos_ = 0;
};

// A view of Rank dimensions into the arena at a byte-chosen position, if it fits.
template <class E, std::size_t Rank>
std::optional<xattn::tensor_view<E, Rank>> place(reader& in, E* arena, std::size_t arena_size,
                                                 bool packed_only = false) {
  std::array<index_t, Rank> e{}, s{};
  for (auto& x : e) x = in.extent();
  const bool packed = packed_only || in.byte() % 2 == 0;
  if (!packed)
    for (auto& x : s) x = in.stride();
  const std::size_t start = in.raw<std::uint16_t>() % arena_size;
  try {
    const auto v = packed ? xattn::tensor_view<E, Rank>(arena + start, e)
                          : xattn::tensor_view<E, Rank>(arena + start, e, s);
    if (v.size() > 0) {
      index_t last = 0;
      for (std::size_t r = 0; r < Rank; ++r) last += (v.extent(r) - 1) * v.stride(r);
      if (std::size_t(last) >= arena_size - start) return std::nullopt;  // past the buffer
    }
    return v;
  } catch (const xattn::shape_error&) {  // an impossible view: rejected by its constructor
    return std::nullopt;
  }
}

template <class T>
void run(reader& in) {
  // One arena for every tensor view, and small ones for the padding lengths and boolean masks.
  // The structure is read first; the values come from the bytes left over (below).
  std::vector<T> arena(arena_floats);
  std::array<index_t, 8> lengths{};
  for (auto& l : lengths) l = in.byte() == 0xff ? in.raw<index_t>() : index_t(in.byte() % 10);
  std::array<bool, 256> bools{};
  const std::uint8_t bool_bits = in.byte();
  for (std::size_t n = 0; n < bools.size(); ++n) bools[n] = (bool_bits >> (n % 8) ^ n / 8) & 1;

  T* a = arena.data();
  const auto q = place<const T, 4>(in, a, arena.size());
  const auto k = place<const T, 4>(in, a, arena.size());
  const auto v = place<const T, 4>(in, a, arena.size());
  const auto out = place<T, 4>(in, a, arena.size());
  if (!q || !k || !v || !out) return;

  xattn::attention_options<T> opts;
  const std::uint8_t flags = in.byte();
  if (flags & 1) opts.scale = in.raw<double>();
  if (flags & 2) {
    const index_t n = in.extent();
    if (n >= 0 && n <= index_t(lengths.size()))
      opts.mask.kv_lengths = xattn::tensor_view<const index_t, 1>(lengths.data(), {n});
  }
  if (flags & 4)
    if (const auto m = place<const bool, 4>(in, bools.data(), bools.size())) opts.mask.allowed = *m;
  if (flags & 8)
    if (const auto m = place<const T, 4>(in, a, arena.size())) opts.mask.bias = *m;
  if (flags & 16)
    if (const auto w = place<T, 4>(in, a, arena.size())) opts.weights_out = *w;
  if (flags & 32)
    if (const auto l = place<T, 3>(in, a, arena.size())) opts.lse_out = *l;
  opts.mask.causal = static_cast<xattn::causal_mask>(in.byte() % 3);
  xattn::tile_options tiles;
  if (flags & 64) tiles.q_tile = in.extent();
  if (flags & 128) tiles.kv_tile = in.extent();
  if (in.byte() % 2) tiles.num_threads = int(in.byte() % 6) - 1;

  // How much memory a call may take is the caller's business: skip calls whose [Lq, Lk] score
  // matrix would exceed 64 MiB (a product that overflows is still tried: that is an error).
  const index_t lq = q->extent(2), lk = k->extent(2);
  if (lq > 0 && lk > 0 && lk <= std::numeric_limits<index_t>::max() / lq &&
      lq * lk > (index_t(64) << 20) / index_t(sizeof(T)))
    return;

  // The values: the remaining bytes, repeated (any bit pattern: NaN, Inf, subnormal numbers).
  std::vector<std::uint8_t> rest;
  while (in.more()) rest.push_back(in.byte());
  if (rest.empty()) rest.push_back(0x3c);
  std::vector<std::uint8_t> bytes(arena.size() * sizeof(T));
  for (std::size_t n = 0; n < bytes.size(); ++n) bytes[n] = rest[n % rest.size()];
  std::memcpy(arena.data(), bytes.data(), bytes.size());

  const std::vector<T> before = arena;
  const auto unchanged = [&] {
    return std::memcmp(before.data(), arena.data(), arena.size() * sizeof(T)) == 0;
  };
  try {
    xattn::naive_attention<T>(*q, *k, *v, *out, opts);
  } catch (const std::invalid_argument&) {  // shape_error or value_error
    if (!unchanged()) std::abort();         // a rejected call must not write
  }
  std::memcpy(arena.data(), before.data(), arena.size() * sizeof(T));
  try {
    xattn::tiled_attention<T>(*q, *k, *v, *out, opts, tiles);
  } catch (const std::invalid_argument&) {
    if (!unchanged()) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader in(data, size);
  if (in.byte() % 2)
    run<double>(in);
  else
    run<float>(in);
  return 0;
}
