// SPDX-License-Identifier: MIT
// Reading and writing safetensors files (the format PyTorch and Hugging Face export weights in).
// This header is the format alone: tensors, dtypes and the mapping, nothing of a layer;
// checkpoints.hpp loads multi_head_cross_attention layers from such files. Optional: this header
// needs nlohmann_json besides Eigen, and the umbrella xattn.hpp does not include it.
//
// The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name
// to {"dtype", "shape", "data_offsets": [begin, end]} (byte offsets into the data that follows
// the header), an optional "__metadata__" object of strings, then the data. Every part of a file
// is checked before anything is read from it; a bad file is a format_error naming the file and
// the tensor, never an out-of-bounds read.
#pragma once

#include "xattn/config.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/tensor_view.hpp"

#include <Eigen/Core>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#  include <fcntl.h>
#  include <sys/mman.h>
#  include <sys/stat.h>
#  include <unistd.h>
#endif

namespace xattn {

/// The element types of a safetensors file. Every one may appear in a file that xattn opens;
/// the floating-point ones (F32, F64, F16, BF16) can be read as float, double or a half type and
/// written from numbers, the integer and boolean ones written from integers; F8 tensors are only
/// listed.
enum class safetensors_dtype {
  // floating point: read as float, double, fp16 or bf16
  f32,
  f64,
  f16,
  bf16,
  // integers (BOOL is one byte, 0 or 1)
  boolean,
  u8,
  i8,
  u16,
  i16,
  u32,
  i32,
  u64,
  i64,
  // 8-bit floats: sized and listed, not converted
  f8_e4m3,
  f8_e5m2,
  f8_e8m0,
};

namespace detail {

inline constexpr safetensors_dtype all_dtypes[] = {
    safetensors_dtype::f32,    safetensors_dtype::f64,     safetensors_dtype::f16,
    safetensors_dtype::bf16,   safetensors_dtype::boolean, safetensors_dtype::u8,
    safetensors_dtype::i8,     safetensors_dtype::u16,     safetensors_dtype::i16,
    safetensors_dtype::u32,    safetensors_dtype::i32,     safetensors_dtype::u64,
    safetensors_dtype::i64,    safetensors_dtype::f8_e4m3, safetensors_dtype::f8_e5m2,
    safetensors_dtype::f8_e8m0};

inline const char* dtype_name(safetensors_dtype d) noexcept {
  switch (d) {
    case safetensors_dtype::f32:
      return "F32";
    case safetensors_dtype::f64:
      return "F64";
    case safetensors_dtype::f16:
      return "F16";
    case safetensors_dtype::bf16:
      return "BF16";
    case safetensors_dtype::boolean:
      return "BOOL";
    case safetensors_dtype::u8:
      return "U8";
    case safetensors_dtype::i8:
      return "I8";
    case safetensors_dtype::u16:
      return "U16";
    case safetensors_dtype::i16:
      return "I16";
    case safetensors_dtype::u32:
      return "U32";
    case safetensors_dtype::i32:
      return "I32";
    case safetensors_dtype::u64:
      return "U64";
    case safetensors_dtype::i64:
      return "I64";
    case safetensors_dtype::f8_e4m3:
      return "F8_E4M3";
    case safetensors_dtype::f8_e5m2:
      return "F8_E5M2";
    case safetensors_dtype::f8_e8m0:
      return "F8_E8M0";
  }
  return "?";
}

inline std::size_t dtype_size(safetensors_dtype d) noexcept {
  switch (d) {
    case safetensors_dtype::f64:
    case safetensors_dtype::u64:
    case safetensors_dtype::i64:
      return 8;
    case safetensors_dtype::f32:
    case safetensors_dtype::u32:
    case safetensors_dtype::i32:
      return 4;
    case safetensors_dtype::f16:
    case safetensors_dtype::bf16:
    case safetensors_dtype::u16:
    case safetensors_dtype::i16:
      return 2;
    default:
      return 1;
  }
}

/// True for the dtypes read<T> converts to float, double or a half type.
inline bool is_float_dtype(safetensors_dtype d) noexcept {
  return d == safetensors_dtype::f32 || d == safetensors_dtype::f64 ||
         d == safetensors_dtype::f16 || d == safetensors_dtype::bf16;
}

/// True for BOOL and the integer dtypes, which the writer fills from integers.
inline bool is_integer_dtype(safetensors_dtype d) noexcept {
  return !is_float_dtype(d) && dtype_size(d) > 0 && d != safetensors_dtype::f8_e4m3 &&
         d != safetensors_dtype::f8_e5m2 && d != safetensors_dtype::f8_e8m0;
}

inline bool parse_dtype(const std::string& s, safetensors_dtype& d) noexcept {
  for (auto c : all_dtypes)
    if (s == dtype_name(c)) {
      d = c;
      return true;
    }
  return false;
}

// IEEE binary16 bits to float: sign, 5 exponent bits (bias 15), 10 mantissa bits. Every half,
// subnormals, infinities and NaN included, is exactly a float.
inline float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float magnitude;
  if (exp == 0)
    magnitude = std::ldexp(float(man), -24);  // zero or subnormal: man · 2^-24
  else if (exp == 31)
    magnitude =
        man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  else
    magnitude = std::ldexp(float(man | 0x400u), int(exp) - 25);
  std::uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float to binary16, rounding to nearest even; overflow gives infinity.
inline std::uint16_t float_to_half(float f) noexcept {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const std::uint16_t sign = std::uint16_t((bits >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return std::uint16_t(sign | 0x7e00u);
  if (a >= 65520.0f) return std::uint16_t(sign | 0x7c00u);         // rounds past the largest half
  if (a < std::ldexp(1.0f, -14)) {                                 // subnormal half: steps of 2^-24
    const float steps = std::nearbyint(a * std::ldexp(1.0f, 24));  // ties to even
    return std::uint16_t(sign | std::uint16_t(steps));
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m · 2^e, m in [0.5, 1)
  // 11 significant bits: mantissa steps of 2^(e - 11); rounding may carry into the exponent.
  const float steps = std::nearbyint(std::ldexp(m, 11));  // in [1024, 2048]
  std::uint32_t q = std::uint32_t(steps), exp = std::uint32_t(e - 1 + 15);
  if (q == 2048) {
    q = 1024;
    ++exp;
  }
  return std::uint16_t(sign | (exp << 10) | (q & 0x3ffu));
}

inline float bf16_to_float(std::uint16_t h) noexcept {
  const std::uint32_t bits = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float to bfloat16 (the top half of a float), rounding to nearest even.
inline std::uint16_t float_to_bf16(float f) noexcept {
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if (std::isnan(f)) return std::uint16_t((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return std::uint16_t(bits >> 16);
}

// x rounded to float toward zero, with the last bit set when that is inexact (round to odd).
// Rounding the result once more, to nearest even, into a format of at most 22 significant bits
// (fp16 has 11, bf16 8) gives x correctly rounded, which rounding twice to nearest does not
// always: 1 + 2^-8 + 2^-30 would become the bf16 tie 1 + 2^-8 and then 1, not 1 + 2^-7.
inline float round_to_odd_float(double x) noexcept {
  float f = static_cast<float>(x);
  if (!std::isfinite(f) || double(f) == x) return f;
  if (std::fabs(double(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
  std::uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits |= 1u;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Little-endian loads and stores, whatever the host's byte order.
inline std::uint64_t load_le(const unsigned char* p, std::size_t n) noexcept {
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | p[i];
  return v;
}
inline void store_le(unsigned char* p, std::uint64_t v, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i, v >>= 8) p[i] = static_cast<unsigned char>(v & 0xffu);
}

inline double decode_element(const unsigned char* p, safetensors_dtype d) noexcept {
  switch (d) {
    case safetensors_dtype::f64: {
      const std::uint64_t b = load_le(p, 8);
      double x;
      std::memcpy(&x, &b, 8);
      return x;
    }
    case safetensors_dtype::f32: {
      const auto b = static_cast<std::uint32_t>(load_le(p, 4));
      float x;
      std::memcpy(&x, &b, 4);
      return x;
    }
    case safetensors_dtype::f16:
      return half_to_float(static_cast<std::uint16_t>(load_le(p, 2)));
    case safetensors_dtype::bf16:
      return bf16_to_float(static_cast<std::uint16_t>(load_le(p, 2)));
    default:  // not a readable dtype: safetensors_file::read rejects it before decoding
      return 0.0;
  }
}

inline void encode_element(unsigned char* p, double x, safetensors_dtype d) noexcept {
  switch (d) {
    case safetensors_dtype::f64: {
      std::uint64_t b;
      std::memcpy(&b, &x, 8);
      store_le(p, b, 8);
      return;
    }
    case safetensors_dtype::f32: {
      const float f = static_cast<float>(x);
      std::uint32_t b;
      std::memcpy(&b, &f, 4);
      store_le(p, b, 4);
      return;
    }
    case safetensors_dtype::f16:
      store_le(p, float_to_half(static_cast<float>(x)), 2);
      return;
    case safetensors_dtype::bf16:
      store_le(p, float_to_bf16(static_cast<float>(x)), 2);
      return;
    default:  // integer dtypes are encoded by encode_integer
      return;
  }
}

// One element of a floating-point dtype as a half type H (Eigen::half or Eigen::bfloat16), its
// value x already decoded: the bits themselves when the dtype is H's, else x rounded once to
// nearest even (x is a float unless the dtype is F64, which round_to_odd_float rounds safely).
template <class H>
H decode_half(const unsigned char* p, safetensors_dtype d, double x) noexcept {
  constexpr bool fp16 = std::is_same_v<H, Eigen::half>;
  const std::uint16_t bits =
      d == (fp16 ? safetensors_dtype::f16 : safetensors_dtype::bf16)
          ? static_cast<std::uint16_t>(load_le(p, 2))
          : (fp16 ? float_to_half(round_to_odd_float(x)) : float_to_bf16(round_to_odd_float(x)));
  return Eigen::numext::bit_cast<H>(bits);
}

// The range of an integer dtype (BOOL: 0 and 1), as the widest integers.
inline void integer_range(safetensors_dtype d, long double& lo, long double& hi) noexcept {
  const std::size_t bits = 8 * dtype_size(d);
  const bool is_signed = d == safetensors_dtype::i8 || d == safetensors_dtype::i16 ||
                         d == safetensors_dtype::i32 || d == safetensors_dtype::i64;
  if (d == safetensors_dtype::boolean) {
    lo = 0;
    hi = 1;
  } else if (is_signed) {
    lo = -std::ldexp(1.0L, int(bits) - 1);
    hi = std::ldexp(1.0L, int(bits) - 1) - 1;
  } else {
    lo = 0;
    hi = std::ldexp(1.0L, int(bits)) - 1;
  }
}

// Two's complement little-endian bytes of an integer value that fits dtype d.
template <class I>
void encode_integer(unsigned char* p, I x, safetensors_dtype d) noexcept {
  std::uint64_t bits;
  if constexpr (std::is_signed_v<I>)
    bits = static_cast<std::uint64_t>(static_cast<std::int64_t>(x));
  else
    bits = static_cast<std::uint64_t>(x);
  store_le(p, bits, dtype_size(d));
}

inline std::string shape_string(const std::vector<index_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace detail

/// What the header says about one tensor. Offsets are bytes from the start of the data section.
struct safetensors_tensor_info {
  std::string name;
  safetensors_dtype dtype = safetensors_dtype::f32;
  std::vector<index_t> shape;
  std::uint64_t begin = 0, end = 0;

  index_t size() const noexcept {
    index_t n = 1;
    for (index_t e : shape) n *= e;
    return n;
  }
};

/// A tensor read from a file, converted to T: packed row-major values and the shape.
template <class T>
struct safetensors_tensor {
  std::vector<index_t> shape;
  std::vector<T> values;
};

/// A safetensors file, its header checked in full on construction. A file opened with load()
/// is memory-mapped where the system allows it (POSIX), so reading one layer out of a
/// multi-gigabyte checkpoint touches only that layer's pages; elsewhere it is read whole.
/// A mapped file must not shrink while it is open: if another process truncates or rewrites
/// it, reading a tensor whose pages are gone ends the process with SIGBUS (as every reader of a
/// memory-mapped file does). For a file that may change, open it with load_copy(), which reads
/// it whole into memory first.
class safetensors_file {
 public:
  /// Opens and checks the file at path: io_error if it is not a regular file or cannot be read,
  /// format_error if it is malformed. A directory, a FIFO (whose open() would wait for a
  /// writer) or a device such as /dev/zero (endless) is refused before anything is read.
  static safetensors_file load(const std::string& path) {
#if defined(__unix__) || defined(__APPLE__)
    std::size_t size = 0;
    const int fd = open_regular_file(path, size);
    if (size > 0) {
      void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      ::close(fd);
      if (map != MAP_FAILED) {
        std::shared_ptr<const unsigned char> owner(
            static_cast<const unsigned char*>(map),
            [size](const unsigned char* p) { ::munmap(const_cast<unsigned char*>(p), size); });
        return safetensors_file(std::move(owner), size, path);
      }
    } else {
      ::close(fd);
    }
    // An empty file, or a file system that cannot map: read it whole below.
#endif
    return load_copy(path);
  }

  /// Opens and checks the file at path as load() does, reading it whole into memory instead of
  /// mapping it: later changes to the file cannot reach it (for a checkpoint that another
  /// process may rewrite while it is open), at the cost of the whole file's bytes in memory.
  static safetensors_file load_copy(const std::string& path) {
#if defined(__unix__) || defined(__APPLE__)
    std::size_t size = 0;
    ::close(open_regular_file(path, size));
#else
    std::error_code ec;
    const auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status))
      XATTN_THROW(io_error("safetensors: " + path + ": cannot open the file"));
    if (!std::filesystem::is_regular_file(status))
      XATTN_THROW(io_error("safetensors: " + path + ": not a regular file"));
#endif
    std::ifstream in(path, std::ios::binary);
    if (!in) XATTN_THROW(io_error("safetensors: " + path + ": cannot open the file"));
    std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)),
                                     std::istreambuf_iterator<char>());
    if (in.bad()) XATTN_THROW(io_error("safetensors: " + path + ": reading the file failed"));
    return safetensors_file(std::move(bytes), path);
  }

 private:
#if defined(__unix__) || defined(__APPLE__)
  /// The open file descriptor of the regular file at path, and its size: io_error otherwise
  /// (O_NONBLOCK: opening a FIFO returns at once, and fstat then refuses it).
  static int open_regular_file(const std::string& path, std::size_t& size) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0)
      XATTN_THROW(io_error("safetensors: " + path + ": cannot open the file (" +
                           std::strerror(errno) + ")"));
    struct ::stat st {};
    const bool stat_ok = ::fstat(fd, &st) == 0;
    if (!stat_ok || !S_ISREG(st.st_mode)) {
      ::close(fd);
      XATTN_THROW(io_error("safetensors: " + path +
                           (stat_ok ? ": not a regular file" : ": cannot stat the file")));
    }
    size = std::size_t(st.st_size);
    return fd;
  }
#endif

 public:
  /// Checks the bytes of a whole file; `name` stands for the file in error messages.
  safetensors_file(std::vector<unsigned char> bytes, std::string name) : name_(std::move(name)) {
    auto held = std::make_shared<std::vector<unsigned char>>(std::move(bytes));
    size_ = held->size();
    data_ = std::shared_ptr<const unsigned char>(held, held->data());
    parse();
  }

  /// The file's path (or the name given with its bytes).
  const std::string& name() const noexcept { return name_; }
  /// The "__metadata__" entries.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  bool contains(const std::string& tensor) const { return tensors_.count(tensor) != 0; }
  /// The tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& kv : tensors_) out.push_back(kv.first);
    return out;
  }
  /// A tensor's header entry; a missing tensor is a format_error.
  const safetensors_tensor_info& info(const std::string& tensor) const {
    const auto it = tensors_.find(tensor);
    if (it == tensors_.end()) fail(name_, "tensor '" + tensor + "' is missing");
    return it->second;
  }

  /// A tensor's values converted to T: float, double, or a half type (Eigen::half,
  /// Eigen::bfloat16), which takes a tensor of its own dtype (F16, BF16) bit for bit and rounds
  /// any other floating-point dtype once, to nearest even. A finite value past T's range is a
  /// format_error naming the tensor and the element.
  template <class T>
  safetensors_tensor<T> read(const std::string& tensor) const {
    static_assert(std::is_floating_point_v<T> || is_half_v<T>,
                  "safetensors_file::read needs a floating-point or half T");
    const safetensors_tensor_info& t = info(tensor);
    if (!detail::is_float_dtype(t.dtype))
      fail_tensor(tensor, std::string("its dtype ") + detail::dtype_name(t.dtype) +
                              " cannot be read as a floating-point tensor (F32, F64, F16 or BF16)");
    safetensors_tensor<T> out;
    out.shape = t.shape;
    out.values.resize(std::size_t(t.size()));
    const std::size_t width = detail::dtype_size(t.dtype);
    const unsigned char* p = data_.get() + data_start_ + t.begin;
    for (std::size_t n = 0; n < out.values.size(); ++n) {
      const double x = detail::decode_element(p + n * width, t.dtype);
      if constexpr (is_half_v<T>)
        out.values[n] = detail::decode_half<T>(p + n * width, t.dtype, x);
      else
        out.values[n] = static_cast<T>(x);
      // A finite value past T's range would silently become inf. (Values below T's smallest
      // normal number round to a subnormal number or 0, as any conversion does.)
      if (std::isfinite(x) && !(Eigen::numext::isfinite)(out.values[n]))
        fail_tensor(tensor, detail::message("element ", n, " is ", x,
                                            ", beyond the range of the element type read into"));
    }
    return out;
  }

  /// A tensor that must have the given shape (a format_error naming it otherwise).
  template <class T>
  std::vector<T> read(const std::string& tensor, const std::vector<index_t>& shape) const {
    const safetensors_tensor_info& t = info(tensor);
    if (t.shape != shape)
      fail(name_, "tensor '" + tensor + "' has shape " + detail::shape_string(t.shape) +
                      ", expected " + detail::shape_string(shape));
    return read<T>(tensor).values;
  }

  [[noreturn]] static void fail(const std::string& file, const std::string& what) {
    XATTN_THROW(format_error("safetensors: " + file + ": " + what));
  }

 private:
  [[noreturn]] void fail_tensor(const std::string& tensor, const std::string& what) const {
    fail(name_, "tensor '" + tensor + "': " + what);
  }

  void parse() {
    const std::uint64_t size = size_;
    if (size < 8)
      fail(name_, "truncated: the file has " + std::to_string(size) +
                      " bytes, fewer than the 8-byte header length");
    const std::uint64_t n = detail::load_le(data_.get(), 8);
    if (n > size - 8)
      fail(name_, "the header length " + std::to_string(n) + " runs past the end of the file (" +
                      std::to_string(size - 8) + " bytes follow it)");
    data_start_ = std::size_t(8 + n);
    const std::uint64_t data_size = size - 8 - n;

    const auto* begin = reinterpret_cast<const char*>(data_.get() + 8);
    // A name given twice is an error (JSON would keep the last silently, and the other entry
    // would never be checked), as in the safetensors reference implementation.
    std::set<std::string> names;
    std::string twice;
    const auto note_names = [&](int depth, nlohmann::json::parse_event_t event,
                                nlohmann::json& parsed) {
      if (event == nlohmann::json::parse_event_t::key && depth == 1 && twice.empty() &&
          !names.insert(parsed.get<std::string>()).second)
        twice = parsed.get<std::string>();
      return true;
    };
    const nlohmann::json header = nlohmann::json::parse(begin, begin + n, note_names, false);
    if (header.is_discarded()) fail(name_, "the header is not valid JSON");
    if (!header.is_object()) fail(name_, "the header is not a JSON object");
    if (!twice.empty()) fail(name_, "the header names '" + twice + "' more than once");

    for (const auto& item : header.items()) {
      const std::string& key = item.key();
      const nlohmann::json& v = item.value();
      if (key == "__metadata__") {
        if (!v.is_object()) fail(name_, "__metadata__ is not an object");
        for (const auto& m : v.items()) {
          if (!m.value().is_string())
            fail(name_, "__metadata__ entry '" + m.key() + "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      tensors_[key] = parse_entry(key, v, data_size);
    }

    // No two tensors may share bytes (empty tensors own none).
    std::vector<const safetensors_tensor_info*> order;
    for (const auto& kv : tensors_)
      if (kv.second.end > kv.second.begin) order.push_back(&kv.second);
    std::sort(order.begin(), order.end(),
              [](const auto* a, const auto* b) { return a->begin < b->begin; });
    for (std::size_t i = 1; i < order.size(); ++i)
      if (order[i]->begin < order[i - 1]->end)
        fail_tensor(order[i]->name, "its bytes [" + std::to_string(order[i]->begin) + ", " +
                                        std::to_string(order[i]->end) + ") overlap tensor '" +
                                        order[i - 1]->name + "'");
  }

  safetensors_tensor_info parse_entry(const std::string& key, const nlohmann::json& v,
                                      std::uint64_t data_size) const {
    safetensors_tensor_info t;
    t.name = key;
    if (!v.is_object()) fail_tensor(key, "the entry is not an object");
    const auto dtype = v.find("dtype");
    const auto shape = v.find("shape");
    const auto offsets = v.find("data_offsets");
    if (dtype == v.end() || shape == v.end() || offsets == v.end())
      fail_tensor(key, "the entry needs dtype, shape and data_offsets");
    if (!dtype->is_string()) fail_tensor(key, "dtype is not a string");
    if (!detail::parse_dtype(dtype->get<std::string>(), t.dtype))
      fail_tensor(key, "unknown dtype '" + dtype->get<std::string>() +
                           "' (expected one of BOOL, U8, I8, U16, I16, U32, I32, U64, I64, F16, "
                           "BF16, F32, F64, F8_E4M3, F8_E5M2, F8_E8M0)");
    if (!shape->is_array()) fail_tensor(key, "shape is not an array");
    constexpr auto max_index = std::uint64_t(std::numeric_limits<index_t>::max());
    std::uint64_t count = 1;
    for (const auto& e : *shape) {
      if (!e.is_number_unsigned() || e.get<std::uint64_t>() > max_index) {
        // Only a scalar is quoted: dump() recurses, and a hostile file can nest arrays deep
        // enough to overflow the stack.
        const std::string what = e.is_primitive() ? e.dump()
                                 : e.is_array()   ? "an array"
                                                  : "an object";
        fail_tensor(key, "shape holds " + what + ", expected a non-negative integer");
      }
      const std::uint64_t x = e.get<std::uint64_t>();
      if (x != 0 && count > max_index / x) fail_tensor(key, "the element count overflows");
      count *= x;
      t.shape.push_back(index_t(x));
    }
    if (!offsets->is_array() || offsets->size() != 2 || !(*offsets)[0].is_number_unsigned() ||
        !(*offsets)[1].is_number_unsigned())
      fail_tensor(key, "data_offsets is not a pair of non-negative integers");
    t.begin = (*offsets)[0].get<std::uint64_t>();
    t.end = (*offsets)[1].get<std::uint64_t>();
    if (t.begin > t.end)
      fail_tensor(key, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                           "] end before they begin");
    if (t.end > data_size)
      fail_tensor(key, "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                           "] run past the " + std::to_string(data_size) + "-byte data section");
    const std::uint64_t width = detail::dtype_size(t.dtype);
    if (count > max_index / width) fail_tensor(key, "the byte size overflows");
    if (count * width != t.end - t.begin)
      fail_tensor(key, "shape " + detail::shape_string(t.shape) + " of " +
                           detail::dtype_name(t.dtype) + " needs " + std::to_string(count * width) +
                           " bytes, data_offsets give " + std::to_string(t.end - t.begin));
    return t;
  }

  safetensors_file(std::shared_ptr<const unsigned char> data, std::size_t size, std::string name)
      : data_(std::move(data)), size_(size), name_(std::move(name)) {
    parse();
  }

  std::shared_ptr<const unsigned char> data_;  // the file's bytes: a mapping or a vector
  std::size_t size_ = 0;
  std::string name_;
  std::size_t data_start_ = 0;
  std::map<std::string, safetensors_tensor_info> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and writes them as one safetensors file (tensors in the order added).
class safetensors_writer {
 public:
  /// Adds a packed row-major tensor, converting each value to dtype (F16 and BF16 round to
  /// nearest even, and keep Eigen::half and Eigen::bfloat16 values of their own dtype bit for
  /// bit; integer dtypes and BOOL take integer values that fit). A negative extent, a
  /// byte count past the index type, an F8 dtype or a value that does not fit is a value_error.
  template <class T>
  void add(const std::string& name, const std::vector<index_t>& shape, const T* values,
           safetensors_dtype dtype) {
    static_assert(std::is_arithmetic_v<T> || is_half_v<T>,
                  "safetensors_writer::add needs numeric values");
    if (name == "__metadata__" || index_.count(name))
      detail::fail_value("safetensors_writer::add: tensor '" + name +
                         "' was added already (or is named __metadata__)");
    const std::string fn = "safetensors_writer::add: tensor '" + name + "'";
    const std::size_t width = detail::dtype_size(dtype);
    index_t n = 1;
    for (index_t x : shape) {
      if (x < 0)
        detail::fail_value(fn + ": shape " + detail::shape_string(shape) +
                           " has a negative extent");
      if (x != 0 && n > std::numeric_limits<index_t>::max() / index_t(width) / x)
        detail::fail_value(fn + ": shape " + detail::shape_string(shape) +
                           " holds more bytes than the index type can count");
      n *= x;
    }
    if (n > 0 && values == nullptr) detail::fail_value(fn + ": values is null");
    const bool integer = detail::is_integer_dtype(dtype);
    if (!integer && !detail::is_float_dtype(dtype))
      detail::fail_value(fn + ": cannot write dtype " + detail::dtype_name(dtype));
    if (integer) {
      if constexpr (!std::is_integral_v<T>) {
        detail::fail_value(fn + ": dtype " + detail::dtype_name(dtype) + " needs integer values");
      } else {
        long double lo, hi;
        detail::integer_range(dtype, lo, hi);
        for (index_t i = 0; i < n; ++i)
          if ((long double)values[i] < lo || (long double)values[i] > hi)
            detail::fail_value(fn + ": element " + std::to_string(i) + " does not fit " +
                               detail::dtype_name(dtype));
      }
    }
    entry e;
    e.name = name;
    e.dtype = dtype;
    e.shape = shape;
    e.bytes.resize(std::size_t(n) * width);
    for (index_t i = 0; i < n; ++i) {
      unsigned char* at = e.bytes.data() + std::size_t(i) * width;
      if constexpr (std::is_integral_v<T>) {
        if (integer) {
          detail::encode_integer(at, values[i], dtype);
          continue;
        }
      }
      detail::encode_element(at, static_cast<double>(values[i]), dtype);
    }
    index_[name] = entries_.size();
    entries_.push_back(std::move(e));
  }
  /// Adds an Eigen matrix (any storage order) as a [rows, cols] tensor.
  template <class Derived>
  void add(const std::string& name, const Eigen::DenseBase<Derived>& m, safetensors_dtype dtype) {
    using T = typename Derived::Scalar;
    const row_matrix<T> r = m;
    std::vector<index_t> shape{index_t(r.rows()), index_t(r.cols())};
    if (r.cols() == 1 && Derived::ColsAtCompileTime == 1) shape = {index_t(r.rows())};
    if (r.rows() == 1 && Derived::RowsAtCompileTime == 1) shape = {index_t(r.cols())};
    add(name, shape, r.data(), dtype);
  }
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// The file's bytes.
  std::vector<unsigned char> bytes() const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const entry& e : entries_) {
      header[e.name] = {{"dtype", detail::dtype_name(e.dtype)},
                        {"shape", e.shape},
                        {"data_offsets", {offset, offset + e.bytes.size()}}};
      offset += e.bytes.size();
    }
    std::string json = header.dump();
    json.append((8 - json.size() % 8) % 8, ' ');  // data starts 8-byte aligned, as writers do
    std::vector<unsigned char> out(8 + json.size() + offset);
    detail::store_le(out.data(), json.size(), 8);
    auto at = std::copy(json.begin(), json.end(), out.begin() + 8);
    for (const entry& e : entries_) at = std::copy(e.bytes.begin(), e.bytes.end(), at);
    return out;
  }
  /// Writes the file; throws io_error if it cannot be written.
  void save(const std::string& path) const {
    const auto b = bytes();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
    if (!out) XATTN_THROW(io_error("safetensors: " + path + ": writing the file failed"));
  }

 private:
  struct entry {
    std::string name;
    safetensors_dtype dtype;
    std::vector<index_t> shape;
    std::vector<unsigned char> bytes;
  };
  std::vector<entry> entries_;
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace xattn

