// SPDX-License-Identifier: MIT
// safetensors.hpp: round trips of every dtype, the F16/BF16 conversions at their edges, every
// kind of malformed file rejected with a format_error naming the file and the tensor, the three
// weight namings, and the module against PyTorch's nn.MultiheadAttention on the fixtures that
// tests/make_fixtures.py wrote.
#include "xattn/checkpoints.hpp"
#include "xattn/safetensors.hpp"

#include "test_support.hpp"
#include "torch_masks.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace {

using xattn::index_t;
using xattn::safetensors_dtype;
using xattn_test::all_close;
using xattn_test::throws_with;

template <class T>
class Safetensors : public ::testing::Test {};
TYPED_TEST_SUITE(Safetensors, xattn_test::element_types, );

// A file's bytes from a header text and a data section.
std::vector<unsigned char> file_bytes(const std::string& header, std::size_t data_bytes) {
  std::vector<unsigned char> b(8 + header.size() + data_bytes, 0);
  xattn::detail::store_le(b.data(), header.size(), 8);
  std::copy(header.begin(), header.end(), b.begin() + 8);
  return b;
}

xattn::safetensors_file parse(const std::string& header, std::size_t data_bytes) {
  return xattn::safetensors_file(file_bytes(header, data_bytes), "bad.safetensors");
}

// Relative spacing of the values a dtype can hold (half an ulp is the rounding error).
double dtype_eps(safetensors_dtype d) {
  switch (d) {
    case safetensors_dtype::f64:
      return std::numeric_limits<double>::epsilon();
    case safetensors_dtype::f32:
      return std::numeric_limits<float>::epsilon();
    case safetensors_dtype::f16:
      return std::ldexp(1.0, -10);
    case safetensors_dtype::bf16:
      return std::ldexp(1.0, -7);
    default:
      return 1.0;
  }
}

TYPED_TEST(Safetensors, EveryDtypeRoundTrips) {
  using T = TypeParam;
  const auto values = xattn_test::random_tensor<T, 2>({3, 5}, 1, -100.0, 100.0).data;
  for (auto d : {safetensors_dtype::f32, safetensors_dtype::f64, safetensors_dtype::f16,
                 safetensors_dtype::bf16}) {
    SCOPED_TRACE(xattn::detail::dtype_name(d));
    xattn::safetensors_writer w;
    w.add("x", {3, 5}, values.data(), d);
    w.set_metadata("format", "pt");
    const xattn::safetensors_file f(w.bytes(), "memory");
    EXPECT_EQ(f.metadata().at("format"), "pt");
    ASSERT_TRUE(f.contains("x"));
    EXPECT_EQ(f.info("x").dtype, d);
    const auto got = f.read<T>("x");
    EXPECT_EQ(got.shape, (std::vector<index_t>{3, 5}));
    // Rounding to nearest: within half a spacing of the stored dtype (or of T when coarser).
    const double tol = 0.5 * std::max(dtype_eps(d), double(std::numeric_limits<T>::epsilon()));
    for (std::size_t n = 0; n < values.size(); ++n)
      EXPECT_LE(std::abs(double(got.values[n]) - double(values[n])),
                tol * std::abs(double(values[n])));
    // A value already in the dtype survives a second round trip exactly.
    xattn::safetensors_writer again;
    again.add("x", {3, 5}, got.values.data(), d);
    EXPECT_EQ(xattn::safetensors_file(again.bytes(), "memory").read<T>("x").values, got.values);
  }
}

TEST(Safetensors, HalfAndBfloatEdges) {
  using xattn::detail::bf16_to_float;
  using xattn::detail::float_to_bf16;
  using xattn::detail::float_to_half;
  using xattn::detail::half_to_float;
  EXPECT_EQ(half_to_float(0x3c00), 1.0f);
  EXPECT_EQ(half_to_float(0xc000), -2.0f);
  EXPECT_EQ(half_to_float(0x7bff), 65504.0f);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(half_to_float(0x03ff), std::ldexp(1023.0f, -24));
  EXPECT_EQ(half_to_float(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(half_to_float(0x7e00)));
  EXPECT_TRUE(std::signbit(half_to_float(0x8000)));
  // Every half survives half -> float -> half.
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    if (std::isnan(half_to_float(bits))) continue;
    ASSERT_EQ(float_to_half(half_to_float(bits)), bits) << h;
  }
  EXPECT_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie: to even
  EXPECT_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(float_to_half(70000.0f), 0x7c00);  // overflow: infinity
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_float(0x3f80), 1.0f);
  EXPECT_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);  // tie: to even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Safetensors, SavesAndLoadsAFile) {
  const std::string path = std::string(XATTN_TEST_BINARY_DIR) + "/round_trip.safetensors";
  const xattn::row_matrix<double> m = xattn::row_matrix<double>::Random(4, 3);
  xattn::safetensors_writer w;
  w.add("m", m, safetensors_dtype::f64);
  w.save(path);
  const auto f = xattn::safetensors_file::load(path);
  EXPECT_EQ(f.name(), path);
  const auto got = f.read<double>("m", {4, 3});
  EXPECT_TRUE(std::equal(got.begin(), got.end(), m.data()));
  EXPECT_TRUE(throws_with<xattn::io_error>(
      [] { (void)xattn::safetensors_file::load("no/such/file.safetensors"); },
      {"no/such/file.safetensors", "cannot open"}));
}

TEST(Safetensors, ACopiedFileIsNotReachedByChangesToTheFile) {
  // load_copy reads the file whole: truncating the file afterwards (which makes a mapped
  // reader die with SIGBUS on its next read) changes nothing it returns.
  const std::string path = std::string(XATTN_TEST_BINARY_DIR) + "/rewritten.safetensors";
  const xattn::row_matrix<float> m = xattn::row_matrix<float>::Random(64, 64);
  xattn::safetensors_writer w;
  w.add("m", m, safetensors_dtype::f32);
  w.save(path);
  const auto f = xattn::safetensors_file::load_copy(path);
  ASSERT_EQ(::truncate(path.c_str(), 16), 0);
  const auto got = f.read<float>("m", {64, 64});
  EXPECT_TRUE(std::equal(got.begin(), got.end(), m.data()));
  EXPECT_TRUE(throws_with<xattn::io_error>(
      [&] { (void)xattn::safetensors_file::load_copy(std::string(XATTN_TEST_BINARY_DIR)); },
      {"not a regular file"}));
}

// Each malformed file is a format_error whose message names the file and the tensor involved.
TEST(Safetensors, MalformedFilesThrowNamingFileAndTensor) {
  using E = xattn::format_error;
  const auto expect_bad = [](const std::string& header, std::size_t data,
                             std::initializer_list<const char*> fragments) {
    return throws_with<E>([&] { (void)parse(header, data); }, fragments);
  };
  // Truncated before the header length ends.
  EXPECT_TRUE(throws_with<E>(
      [] { (void)xattn::safetensors_file(std::vector<unsigned char>(5), "short.safetensors"); },
      {"short.safetensors", "truncated", "5 bytes"}));
  // A header length past the end of the file (and one so large it would wrap around).
  for (std::uint64_t n : {std::uint64_t(100), ~std::uint64_t(0)}) {
    auto b = file_bytes("{}", 0);
    xattn::detail::store_le(b.data(), n, 8);
    EXPECT_TRUE(throws_with<E>([&] { (void)xattn::safetensors_file(b, "long.safetensors"); },
                               {"long.safetensors", "header length", "runs past the end"}));
  }
  EXPECT_TRUE(expect_bad("{\"a\": [1, 2", 0, {"bad.safetensors", "not valid JSON"}));
  EXPECT_TRUE(expect_bad("[1, 2]", 0, {"bad.safetensors", "not a JSON object"}));
  // A name given twice: the last entry used to win silently, the first never checked.
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "F32", "shape": [9], "data_offsets": [0, 36]},
                             "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                         4, {"bad.safetensors", "names 'w' more than once"}));
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4,
                         {"bad.safetensors", "tensor 'w'", "run past the 4-byte data section"}));
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8,
                         {"tensor 'w'", "end before they begin"}));
  EXPECT_TRUE(expect_bad(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                         12, {"bad.safetensors", "tensor 'b'", "overlap tensor 'a'"}));
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 20]}})", 24,
                         {"tensor 'w'", "shape [3, 2] of F32 needs 24 bytes", "give 20"}));
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}})", 1,
                         {"bad.safetensors", "tensor 'w'", "unknown dtype 'Q4'"}));
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}})", 0,
                         {"tensor 'w'", "shape holds -2"}));
  EXPECT_TRUE(expect_bad(
      R"({"w": {"dtype": "F64", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0,
      {"tensor 'w'", "overflows"}));
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "F32", "shape": [2]}})", 8,
                         {"tensor 'w'", "needs dtype, shape and data_offsets"}));
  EXPECT_TRUE(expect_bad(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", 8,
                         {"tensor 'w'", "data_offsets is not a pair"}));
  EXPECT_TRUE(expect_bad(R"({"w": 3})", 0, {"tensor 'w'", "not an object"}));
  EXPECT_TRUE(expect_bad(R"({"__metadata__": {"k": 1}})", 0, {"__metadata__ entry 'k'"}));

  // A valid file cut short in its data section.
  xattn::safetensors_writer w;
  const float x[4] = {1, 2, 3, 4};
  w.add("x", {4}, x, safetensors_dtype::f32);
  auto cut = w.bytes();
  cut.resize(cut.size() - 3);
  EXPECT_TRUE(throws_with<E>([&] { (void)xattn::safetensors_file(cut, "cut.safetensors"); },
                             {"cut.safetensors", "tensor 'x'", "run past"}));
  // A missing tensor, and one of the wrong shape.
  const xattn::safetensors_file ok(w.bytes(), "ok.safetensors");
  EXPECT_TRUE(throws_with<E>([&] { (void)ok.read<float>("y"); },
                             {"ok.safetensors", "tensor 'y' is missing"}));
  EXPECT_TRUE(throws_with<E>(
      [&] {
        (void)ok.read<float>("x", {2, 2});
      },
      {"ok.safetensors", "tensor 'x' has shape [4], expected [2, 2]"}));
}

// Found by fuzzing (fuzz/corpus/safetensors/crash-shape-deep-nesting): the error for a shape
// entry that is not an integer quoted it with a recursive dump, and arrays nested deep enough
// overflowed the stack. The entry is now named, not quoted.
TEST(Safetensors, DeeplyNestedShapeEntryIsAFormatError) {
  const std::size_t depth = 200000;
  const std::string header = R"({"w": {"dtype": "F32", "shape": [)" + std::string(depth, '[') +
                             std::string(depth, ']') + R"(], "data_offsets": [0, 0]}})";
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)parse(header, 0); },
      {"bad.safetensors", "tensor 'w'", "shape holds an array", "expected a non-negative"}));
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [] { (void)parse(R"({"w": {"dtype": "F32", "shape": [{}], "data_offsets": [0, 0]}})", 0); },
      {"tensor 'w'", "shape holds an object"}));
}

xattn::cross_attention_config small_config(index_t context_dim) {
  xattn::cross_attention_config c;
  c.model_dim = 8;
  c.context_dim = context_dim;
  c.num_heads = 2;
  return c;
}

// The three namings give the same module.
TYPED_TEST(Safetensors, LoadsEveryWeightNaming) {
  using T = TypeParam;
  const auto cfg = small_config(8);
  const auto w = xattn::random_weights<double>(cfg, 3);
  const auto d = safetensors_dtype::f64;
  xattn::safetensors_writer hf, packed, separate;
  for (auto* f : {&hf, &packed, &separate}) {
    f->add("layer.out_proj.weight", w.out_proj.weight, d);
    f->add("layer.out_proj.bias", w.out_proj.bias, d);
  }
  hf.add("layer.q_proj.weight", w.q_proj.weight, d);
  hf.add("layer.q_proj.bias", w.q_proj.bias, d);
  hf.add("layer.k_proj.weight", w.k_proj.weight, d);
  hf.add("layer.k_proj.bias", w.k_proj.bias, d);
  hf.add("layer.v_proj.weight", w.v_proj.weight, d);
  hf.add("layer.v_proj.bias", w.v_proj.bias, d);
  xattn::row_matrix<double> in_w(24, 8);
  in_w << w.q_proj.weight, w.k_proj.weight, w.v_proj.weight;
  Eigen::Matrix<double, 1, Eigen::Dynamic> in_b(24);
  in_b << w.q_proj.bias, w.k_proj.bias, w.v_proj.bias;
  packed.add("layer.in_proj_weight", in_w, d);
  packed.add("layer.in_proj_bias", in_b, d);
  separate.add("layer.q_proj_weight", w.q_proj.weight, d);
  separate.add("layer.k_proj_weight", w.k_proj.weight, d);
  separate.add("layer.v_proj_weight", w.v_proj.weight, d);
  separate.add("layer.in_proj_bias", in_b, d);
  for (auto* f : {&hf, &packed, &separate}) {
    const xattn::safetensors_file file(f->bytes(), "weights.safetensors");
    const auto got = xattn::load_cross_attention_weights<T>(file, cfg, "layer");
    EXPECT_EQ(got.q_proj.weight, w.q_proj.weight.cast<T>());
    EXPECT_EQ(got.k_proj.bias, w.k_proj.bias.cast<T>());
    EXPECT_EQ(got.v_proj.weight, w.v_proj.weight.cast<T>());
    EXPECT_EQ(got.v_proj.bias, w.v_proj.bias.cast<T>());
    EXPECT_EQ(got.out_proj.weight, w.out_proj.weight.cast<T>());
  }
  // Wrong shapes and missing tensors name the tensor.
  const xattn::safetensors_file file(hf.bytes(), "weights.safetensors");
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)xattn::load_cross_attention_weights<T>(file, small_config(6), "layer."); },
      {"weights.safetensors", "tensor 'layer.k_proj.weight' has shape [8, 8], expected [8, 6]"}));
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)xattn::load_cross_attention_weights<T>(file, cfg, "other."); },
      {"weights.safetensors", "no attention layer under prefix 'other.'", "found no tensors",
       "tried the layouts torch_packed (in_proj_weight)"}));
}

// ---- against PyTorch ------------------------------------------------------------------------

std::string fixture(const char* name) {
  return std::string(XATTN_TEST_FIXTURES_DIR) + "/" + name + ".safetensors";
}

index_t meta_int(const xattn::safetensors_file& f, const char* key) {
  return index_t(std::stoll(f.metadata().at(key)));
}

// Three roundings in a row (input projections, attention, output projection); see
// test_cross_attention.cpp. Scores stay small here: inputs in [-1, 1], weights ~ 1/sqrt(in).
template <class T>
double module_tol(const xattn::cross_attention_config& c, index_t kv_len) {
  const index_t widest = std::max({c.model_dim, c.context_dim, c.value_context_dim});
  return xattn_test::attention_tol<T>(c.head_dim, kv_len, 4.0) +
         2.0 * xattn_test::attention_tol<T>(widest, 1, 0.0);
}

template <class T>
void check_fixture(const char* name) {
  SCOPED_TRACE(name);
  const auto f = xattn::safetensors_file::load(fixture(name));
  xattn::cross_attention_config cfg;
  cfg.model_dim = meta_int(f, "model_dim");
  cfg.context_dim = meta_int(f, "context_dim");
  cfg.value_context_dim = meta_int(f, "value_context_dim");
  cfg.num_heads = meta_int(f, "num_heads");
  cfg.num_kv_heads = meta_int(f, "num_kv_heads");
  cfg.bias = meta_int(f, "bias") != 0;
  cfg = cfg.resolved();
  auto mha = xattn::load_cross_attention<T>(f, cfg, "attn.");

  const auto q = f.read<T>("query"), k = f.read<T>("key"), v = f.read<T>("value");
  const index_t B = q.shape[0], Lq = q.shape[1], Lk = k.shape[1], H = cfg.num_heads;
  const auto view3 = [](const auto& t) {
    return xattn::tensor_view<const T, 3>(t.values.data(), {t.shape[0], t.shape[1], t.shape[2]});
  };
  std::vector<T> out(std::size_t(B * Lq * cfg.model_dim), T(-7));
  std::vector<T> weights(std::size_t(B * H * Lq * Lk), T(-7));
  xattn::cross_attention_options<T> opts;

  const xattn_test::torch_masks<T> masks(f, B, Lq, Lk);  // PyTorch's masks in xattn's terms
  if (masks.pad_view) opts.key_padding_mask = *masks.pad_view;
  masks.apply(opts.mask);
  const std::string kind = f.metadata().at("weights");
  if (kind == "per_head") opts.weights_out = xattn::make_view(weights.data(), {B, H, Lq, Lk});
  if (kind == "averaged") opts.average_weights_out = xattn::make_view(weights.data(), {B, Lq, Lk});

  for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
    opts.kernel = kernel;
    mha.forward(view3(q), view3(k), view3(v), xattn::make_view(out.data(), {B, Lq, cfg.model_dim}),
                opts);
    const double tol = module_tol<T>(cfg, Lk);
    EXPECT_TRUE(all_close(out, f.read<double>("output", {B, Lq, cfg.model_dim}), tol));
    if (kind == "per_head") {
      EXPECT_TRUE(all_close(weights, f.read<double>("weights", {B, H, Lq, Lk}), tol));
    }
    if (kind == "averaged") {
      std::vector<T> avg(weights.begin(), weights.begin() + B * Lq * Lk);
      EXPECT_TRUE(all_close(avg, f.read<double>("weights", {B, Lq, Lk}), tol));
    }
  }
}

TYPED_TEST(Safetensors, MatchesPyTorchKdimVdimDifferFromModelDim) {
  check_fixture<TypeParam>("mha_kdim_vdim");
}
TYPED_TEST(Safetensors, MatchesPyTorchPackedInProjWithKeyPaddingBf16Weights) {
  check_fixture<TypeParam>("mha_packed_key_padding");
}
TYPED_TEST(Safetensors, MatchesPyTorchBoolAttnMask) {
  check_fixture<TypeParam>("mha_bool_attn_mask");
}
TYPED_TEST(Safetensors, MatchesPyTorchFloatAttnMaskWithKeyPadding) {
  check_fixture<TypeParam>("mha_float_attn_mask");
}
TYPED_TEST(Safetensors, MatchesPyTorchWithoutBias) { check_fixture<TypeParam>("mha_no_bias"); }
TYPED_TEST(Safetensors, MatchesPyTorchGroupedQueryF16Weights) {
  check_fixture<TypeParam>("gqa_hf_naming");
}

// ---- defects found from outside (each failed before its fix) ----------------------------------

TEST(Safetensors, BiasInTheFileWithBiasOffIsAnError) {
  // Zero weights and biases of 1 gave 0 (the biases dropped) where PyTorch gives 1.
  auto cfg = small_config(8);
  const auto w = xattn::zero_weights<float>(cfg);
  xattn::safetensors_writer f;
  const std::vector<float> ones(8, 1.0f);
  for (const char* p : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
    f.add(std::string(p) + ".weight", w.q_proj.weight, safetensors_dtype::f32);
    f.add(std::string(p) + ".bias", {8}, ones.data(), safetensors_dtype::f32);
  }
  const xattn::safetensors_file file(f.bytes(), "biased.safetensors");
  cfg.bias = false;
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)xattn::load_cross_attention<float>(file, cfg); },
      {"biased.safetensors",
       "tensor 'q_proj.bias' is in the file but the config gives that projection no bias"}));
  cfg.bias = true;
  EXPECT_NO_THROW((void)xattn::load_cross_attention<float>(file, cfg));
}

TEST(Safetensors, WhatIsNotARegularFileIsAnIoErrorBeforeOpening) {
  using E = xattn::io_error;
  const std::string dir = std::string(XATTN_TEST_BINARY_DIR);
  // A directory threw std::ios_base::failure.
  EXPECT_TRUE(throws_with<E>([&] { (void)xattn::safetensors_file::load(dir); },
                             {dir.c_str(), "not a regular file"}));
  // A FIFO without a writer made open() wait forever.
  const std::string fifo = dir + "/no_writer.fifo";
  ::unlink(fifo.c_str());
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_TRUE(throws_with<E>([&] { (void)xattn::safetensors_file::load(fifo); },
                             {"no_writer.fifo", "not a regular file"}));
  ::unlink(fifo.c_str());
  // /dev/zero was read until memory ran out.
  EXPECT_TRUE(throws_with<E>([&] { (void)xattn::safetensors_file::load("/dev/zero"); },
                             {"/dev/zero", "not a regular file"}));
}

TEST(Safetensors, WriterRejectsBadShapesAndValues) {
  using E = xattn::value_error;
  const float x[4] = {1, 2, 3, 4};
  xattn::safetensors_writer w;
  // [-1] threw std::length_error; [0, -5] and [2^62, 8] wrote files the reader rejects.
  EXPECT_TRUE(throws_with<E>([&] { w.add("a", {-1}, x, safetensors_dtype::f32); },
                             {"tensor 'a'", "[-1] has a negative extent"}));
  EXPECT_TRUE(throws_with<E>(
      [&] {
        w.add("b", {0, -5}, x, safetensors_dtype::f32);
      },
      {"tensor 'b'", "negative extent"}));
  EXPECT_TRUE(throws_with<E>(
      [&] {
        w.add("c", {index_t(1) << 62, 8}, x, safetensors_dtype::f32);
      },
      {"tensor 'c'", "more bytes than the index type can count"}));
  EXPECT_TRUE(throws_with<E>([&] { w.add("d", {4}, x, safetensors_dtype::i32); },
                             {"tensor 'd'", "needs integer values"}));
  const int big[2] = {300, 1};
  EXPECT_TRUE(throws_with<E>([&] { w.add("e", {2}, big, safetensors_dtype::u8); },
                             {"tensor 'e'", "element 0 does not fit U8"}));
  EXPECT_TRUE(throws_with<E>([&] { w.add("f", {4}, x, safetensors_dtype::f8_e4m3); },
                             {"cannot write dtype F8_E4M3"}));
  w.add("ok", {0, 5}, x, safetensors_dtype::f32);  // an empty tensor is fine
  const xattn::safetensors_file file(w.bytes(), "w.safetensors");
  EXPECT_EQ(file.names(), std::vector<std::string>{"ok"});  // the rejected adds left nothing
  EXPECT_TRUE(file.read<float>("ok", {0, 5}).empty());
}

TEST(Safetensors, OtherDtypesInTheFileDoNotRejectIt) {
  // Hugging Face text encoders ship I64 position_ids next to the attention weights.
  const auto cfg = small_config(8);
  const auto w = xattn::random_weights<float>(cfg, 4);
  xattn::safetensors_writer f;
  f.add("q_proj.weight", w.q_proj.weight, safetensors_dtype::f32);
  f.add("q_proj.bias", w.q_proj.bias, safetensors_dtype::f32);
  f.add("k_proj.weight", w.k_proj.weight, safetensors_dtype::f32);
  f.add("k_proj.bias", w.k_proj.bias, safetensors_dtype::f32);
  f.add("v_proj.weight", w.v_proj.weight, safetensors_dtype::f32);
  f.add("v_proj.bias", w.v_proj.bias, safetensors_dtype::f32);
  f.add("out_proj.weight", w.out_proj.weight, safetensors_dtype::f32);
  f.add("out_proj.bias", w.out_proj.bias, safetensors_dtype::f32);
  const std::int64_t ids[3] = {0, 1, std::int64_t(1) << 40};
  f.add("position_ids", {1, 3}, ids, safetensors_dtype::i64);
  const bool flags[2] = {true, false};
  f.add("flags", {2}, flags, safetensors_dtype::boolean);
  const std::uint8_t bytes[3] = {1, 2, 255};
  f.add("bytes", {3}, bytes, safetensors_dtype::u8);
  const std::vector<unsigned char> raw = f.bytes();
  const xattn::safetensors_file file(raw, "encoder.safetensors");
  EXPECT_EQ(file.info("position_ids").dtype, safetensors_dtype::i64);
  EXPECT_EQ(file.info("position_ids").end - file.info("position_ids").begin, 24u);
  const auto m = xattn::load_cross_attention<float>(file, cfg);
  EXPECT_EQ(m.weights().k_proj.weight, w.k_proj.weight);
  // Reading one of them as numbers is the error, naming it.
  EXPECT_TRUE(throws_with<xattn::format_error>(
      [&] { (void)file.read<float>("position_ids"); },
      {"encoder.safetensors", "tensor 'position_ids'", "I64 cannot be read"}));
  // F8 tensors and every other dtype of the format are listed too.
  const std::pair<const char*, int> sizes[] = {{"F8_E4M3", 1}, {"F8_E5M2", 1}, {"F8_E8M0", 1},
                                               {"I8", 1},      {"I16", 2},     {"U16", 2},
                                               {"I32", 4},     {"U32", 4},     {"U64", 8}};
  for (const auto& [d, size] : sizes) {
    SCOPED_TRACE(d);
    const auto g = parse(std::string(R"({"t": {"dtype": ")") + d + R"(", "shape": [)" +
                             std::to_string(16 / size) + R"(], "data_offsets": [0, 16]}})",
                         16);
    EXPECT_TRUE(g.contains("t"));
    EXPECT_TRUE(
        throws_with<xattn::format_error>([&] { (void)g.read<double>("t"); }, {"cannot be read"}));
  }
}

TEST(Safetensors, F64BeyondFloatRangeIsAFormatErrorNamingTheTensor) {
  const double values[3] = {1.0, 1e300, -std::numeric_limits<double>::infinity()};
  xattn::safetensors_writer f;
  f.add("big", {3}, values, safetensors_dtype::f64);
  const xattn::safetensors_file file(f.bytes(), "wide.safetensors");
  EXPECT_TRUE(throws_with<xattn::format_error>([&] { (void)file.read<float>("big"); },
                                               {"tensor 'big'", "element 1 is 1e+300"}));
  const auto d = file.read<double>("big").values;  // exact in double
  EXPECT_EQ(d[1], 1e300);
  EXPECT_EQ(d[2], -std::numeric_limits<double>::infinity());
}

}  // namespace
