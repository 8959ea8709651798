// SPDX-License-Identifier: MIT
// training_forward and training_backward of multi_head_cross_attention: every input and
// parameter gradient against central finite differences in double (masks, key padding, GQA and
// MQA, no biases, both kernels), the context-cache path, accumulation, and argument errors.
#include "xattn/cross_attention_backward.hpp"

#include "test_support.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

namespace {

using xattn::index_t;
using xattn_test::random_tensor;
using xattn_test::tensor;

struct module_case {
  const char* name;
  xattn::cross_attention_config cfg;
  index_t batch, q_len, kv_len;
  int mask;  // 0 none, 1 key padding at the end, 2 key padding inside, 3 bias + causal
};

xattn::cross_attention_config config(index_t dm, index_t dc, index_t dcv, index_t h, index_t hkv,
                                     index_t dk, bool bias = true) {
  xattn::cross_attention_config c;
  c.model_dim = dm;
  c.context_dim = dc;
  c.value_context_dim = dcv;
  c.num_heads = h;
  c.num_kv_heads = hkv;
  c.head_dim = dk;
  c.bias = bias;
  return c;
}

// Everything one module case needs, in double: inputs, masks, dout.
struct module_problem {
  module_case mc;
  xattn::multi_head_cross_attention<double> mha;
  tensor<double, 3> query, context, values, dout;
  std::unique_ptr<bool[]> pad;
  tensor<double, 4> bias;
  xattn::cross_attention_options<double> opts;

  module_problem(const module_case& c, xattn::attention_kernel kernel)
      : mc(c),
        mha(c.cfg, xattn::random_weights<double>(c.cfg, 3)),
        query(random_tensor<double, 3>({c.batch, c.q_len, mha.config().model_dim}, 4)),
        context(random_tensor<double, 3>({c.batch, c.kv_len, mha.config().context_dim}, 5)),
        values(random_tensor<double, 3>({c.batch, c.kv_len, mha.config().value_context_dim}, 6)),
        dout(random_tensor<double, 3>({c.batch, c.q_len, mha.config().model_dim}, 7)),
        pad(new bool[std::size_t(c.batch * c.kv_len)]),
        bias(random_tensor<double, 4>({1, 1, c.q_len, c.kv_len}, 8, -1.0, 1.0)) {
    opts.kernel = kernel;
    if (kernel == xattn::attention_kernel::tiled) opts.tiles = xattn::tile_options{2, 3, 2};
    for (index_t b = 0; b < c.batch; ++b)
      for (index_t j = 0; j < c.kv_len; ++j) {
        bool p = false;
        if (c.mask == 1) p = j >= c.kv_len - 1 - b;    // padding at the end
        if (c.mask == 2) p = j == (b + 1) % c.kv_len;  // one padded key inside the row
        pad[std::size_t(b * c.kv_len + j)] = p;
      }
    if (c.mask == 1 || c.mask == 2)
      opts.key_padding_mask = xattn::tensor_view<const bool, 2>(pad.get(), {c.batch, c.kv_len});
    if (c.mask == 3) {
      opts.mask.bias = bias.cview();
      opts.mask.causal = xattn::causal_mask::bottom_right;
    }
  }

  double loss(const xattn::multi_head_cross_attention<double>& m) const {
    tensor<double, 3> out(dout.extents);
    auto copy = m;
    copy.forward(query.cview(), context.cview(), values.cview(), out.view(), opts);
    double l = 0;
    for (std::size_t n = 0; n < out.data.size(); ++n) l += out.data[n] * dout.data[n];
    return l;
  }
};

double relative_error(const double* got, const std::vector<double>& want) {
  double diff = 0, size = 0;
  for (std::size_t n = 0; n < want.size(); ++n) {
    diff = std::max(diff, std::isnan(got[n]) ? HUGE_VAL : std::abs(got[n] - want[n]));
    size = std::max(size, std::abs(want[n]));
  }
  return diff / std::max(size, 0.01);
}

// Central differences of the loss over each element of x (an input of p, or a weight).
template <class Loss>
std::vector<double> finite_differences(double* x, index_t n, const Loss& loss) {
  const double h = 1e-5;
  std::vector<double> g(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double up = loss();
    x[i] = keep - h;
    const double down = loss();
    x[i] = keep;
    g[std::size_t(i)] = (up - down) / (2 * h);
  }
  return g;
}

const module_case cases[] = {
    {"plain", config(4, 3, 5, 2, 2, 3), 2, 3, 4, 0},
    {"mqa, key padding at the end", config(4, 3, 5, 2, 1, 3), 2, 3, 5, 1},
    {"gqa, key padding inside", config(8, 6, 6, 4, 2, 2), 2, 4, 5, 2},
    {"bias and causal, no projection biases", config(4, 4, 4, 2, 2, 2, false), 2, 5, 3, 3},
    {"one query, one key", config(6, 2, 2, 3, 1, 2), 1, 1, 1, 0},
};

class ModuleBackward : public ::testing::TestWithParam<xattn::attention_kernel> {};

TEST_P(ModuleBackward, MatchesFiniteDifferences) {
  double worst = 0;
  for (const auto& mc : cases) {
    SCOPED_TRACE(mc.name);
    module_problem p(mc, GetParam());
    tensor<double, 3> out(p.dout.extents), dq(p.query.extents), dc(p.context.extents),
        dv(p.values.extents);
    xattn::cross_attention_saved<double> saved;
    xattn::training_forward(p.mha, p.query.cview(), p.context.cview(), p.values.cview(), out.view(),
                            saved, p.opts);
    auto grads = xattn::zero_weights<double>(p.mha.config());
    xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(), grads);

    // The training forward's output is the plain forward's.
    tensor<double, 3> plain(p.dout.extents);
    auto copy = p.mha;
    copy.forward(p.query.cview(), p.context.cview(), p.values.cview(), plain.view(), p.opts);
    EXPECT_EQ(out.data, plain.data);

    const auto input_loss = [&] { return p.loss(p.mha); };
    const std::pair<const char*, std::pair<tensor<double, 3>*, tensor<double, 3>*>> inputs[] = {
        {"query", {&p.query, &dq}}, {"context", {&p.context, &dc}}, {"values", {&p.values, &dv}}};
    for (const auto& [name, xg] : inputs) {
      const auto fd =
          finite_differences(xg.first->data.data(), index_t(xg.first->data.size()), input_loss);
      const double err = relative_error(xg.second->data.data(), fd);
      worst = std::max(worst, err);
      EXPECT_LE(err, 1e-6) << name;
    }
    auto weights = p.mha.weights();
    const auto weight_loss = [&] {
      return p.loss(xattn::multi_head_cross_attention<double>(p.mha.config(), weights));
    };
    xattn::linear<double>* ws[] = {&weights.q_proj, &weights.k_proj, &weights.v_proj,
                                   &weights.out_proj};
    const xattn::linear<double>* gs[] = {&grads.q_proj, &grads.k_proj, &grads.v_proj,
                                         &grads.out_proj};
    const char* names[] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    for (int n = 0; n < 4; ++n) {
      SCOPED_TRACE(names[n]);
      auto fd = finite_differences(ws[n]->weight.data(), ws[n]->weight.size(), weight_loss);
      double err = relative_error(gs[n]->weight.data(), fd);
      worst = std::max(worst, err);
      EXPECT_LE(err, 1e-6) << "weight";
      if (ws[n]->has_bias()) {
        fd = finite_differences(ws[n]->bias.data(), ws[n]->bias.size(), weight_loss);
        err = relative_error(gs[n]->bias.data(), fd);
        worst = std::max(worst, err);
        EXPECT_LE(err, 1e-6) << "bias";
      }
    }
  }
  std::printf("worst finite-difference relative error: %.3g\n", worst);
}

INSTANTIATE_TEST_SUITE_P(BothKernels, ModuleBackward,
                         ::testing::Values(xattn::attention_kernel::tiled,
                                           xattn::attention_kernel::naive));

TEST(ModuleBackwardCache, GivesTheGradientsOfTheProjectedContext) {
  // A decoder trained against one encoded context: keys and values from the cache give the same
  // output and gradients, bit for bit, as projecting the context again.
  const module_case mc = cases[2];
  for (auto kernel : {xattn::attention_kernel::tiled, xattn::attention_kernel::naive}) {
    module_problem p(mc, kernel);
    const auto cache = p.mha.encode_context(p.context.cview(), p.values.cview());
    tensor<double, 3> out1(p.dout.extents), out2(p.dout.extents);
    std::vector<tensor<double, 3>> d1 = {tensor<double, 3>(p.query.extents),
                                         tensor<double, 3>(p.context.extents),
                                         tensor<double, 3>(p.values.extents)},
                                   d2 = d1;
    auto g1 = xattn::zero_weights<double>(p.mha.config()), g2 = g1;
    xattn::cross_attention_saved<double> s1, s2;
    xattn::training_forward(p.mha, p.query.cview(), p.context.cview(), p.values.cview(),
                            out1.view(), s1, p.opts);
    xattn::training_forward(p.mha, p.query.cview(), cache, p.context.cview(), p.values.cview(),
                            out2.view(), s2, p.opts);
    EXPECT_TRUE(s2.k.size() == 0);  // nothing projected again
    xattn::training_backward(p.mha, s1, p.dout.cview(), d1[0].view(), d1[1].view(), d1[2].view(),
                             g1);
    xattn::training_backward(p.mha, s2, p.dout.cview(), d2[0].view(), d2[1].view(), d2[2].view(),
                             g2);
    EXPECT_EQ(out1.data, out2.data);
    for (std::size_t n = 0; n < 3; ++n) EXPECT_EQ(d1[n].data, d2[n].data);
    EXPECT_EQ(g1.k_proj.weight, g2.k_proj.weight);
    EXPECT_EQ(g1.q_proj.weight, g2.q_proj.weight);
  }
}

TEST(ModuleBackwardAccumulates, TwoBackwardCallsAddTheirGradients) {
  module_problem p(cases[1], xattn::attention_kernel::tiled);
  tensor<double, 3> out(p.dout.extents), dq(p.query.extents), dc(p.context.extents),
      dv(p.values.extents);
  xattn::cross_attention_saved<double> saved;
  xattn::training_forward(p.mha, p.query.cview(), p.context.cview(), p.values.cview(), out.view(),
                          saved, p.opts);
  auto once = xattn::zero_weights<double>(p.mha.config()), twice = once;
  xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(), once);
  xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(), twice);
  xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(), twice);
  EXPECT_TRUE(twice.out_proj.weight.isApprox(2 * once.out_proj.weight));
  EXPECT_TRUE(twice.v_proj.bias.isApprox(2 * once.v_proj.bias));
}

TEST(ModuleBackwardErrors, AreNamedAndWriteNothing) {
  module_problem p(cases[0], xattn::attention_kernel::tiled);
  tensor<double, 3> out(p.dout.extents), dq(p.query.extents, -7), dc(p.context.extents, -7),
      dv(p.values.extents, -7);
  xattn::cross_attention_saved<double> saved;
  auto grads = xattn::zero_weights<double>(p.mha.config());
  EXPECT_TRUE(xattn_test::throws_with<xattn::value_error>(
      [&] {
        xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(),
                                 grads);
      },
      {"training_backward", "saved"}));
  xattn::training_forward(p.mha, p.query.cview(), p.context.cview(), p.values.cview(), out.view(),
                          saved, p.opts);
  tensor<double, 3> short_dout({2, 2, 4});
  EXPECT_TRUE(xattn_test::throws_with<xattn::shape_error>(
      [&] {
        xattn::training_backward(p.mha, saved, short_dout.cview(), dq.view(), dc.view(), dv.view(),
                                 grads);
      },
      {"training_backward", "dout.extent(1)"}));
  auto wrong = xattn::zero_weights<double>(config(4, 3, 5, 2, 2, 3, false));
  EXPECT_TRUE(xattn_test::throws_with<xattn::shape_error>(
      [&] {
        xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(),
                                 wrong);
      },
      {"training_backward", "grads.q_proj"}));
  EXPECT_TRUE(xattn_test::throws_with<xattn::shape_error>(
      [&] {
        xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(),
                                 xattn::tensor_view<double, 3>(dq.data.data(), dc.extents),
                                 dv.view(), grads);
      },
      {"training_backward", "dcontext overlaps dquery"}));
  for (const auto* t : {&dq, &dc, &dv})
    for (double x : t->data) ASSERT_EQ(x, -7.0);
  for (const auto* l : {&grads.q_proj, &grads.k_proj, &grads.v_proj, &grads.out_proj})
    EXPECT_TRUE(l->weight.isZero(0.0));
  auto opts = p.opts;
  tensor<double, 3> avg({2, 3, 4});
  opts.average_weights_out = avg.view();
  EXPECT_TRUE(xattn_test::throws_with<xattn::value_error>(
      [&] {
        xattn::training_forward(p.mha, p.query.cview(), p.context.cview(), p.values.cview(),
                                out.view(), saved, opts);
      },
      {"training_forward", "average_weights_out"}));
}

TEST(ModuleBackwardErrors, ARejectedForwardLeavesSavedAsItWas) {
  // A second training_forward into the same saved with a weights_out of the wrong shape, or a
  // bias mask of the wrong shape, is rejected before saved is written: the backward from saved
  // still gives the first forward's gradients, bit for bit.
  module_problem p(cases[0], xattn::attention_kernel::tiled);
  const index_t B = p.mc.batch, Lq = p.mc.q_len, Lk = p.mc.kv_len, H = p.mha.config().num_heads;
  tensor<double, 3> out(p.dout.extents), dq(p.query.extents), dc(p.context.extents),
      dv(p.values.extents);
  xattn::cross_attention_saved<double> saved;
  xattn::training_forward(p.mha, p.query.cview(), p.context.cview(), p.values.cview(), out.view(),
                          saved, p.opts);
  auto want = xattn::zero_weights<double>(p.mha.config());
  xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(), want);
  const auto other_query = random_tensor<double, 3>(p.query.extents, 99);
  tensor<double, 4> small_weights({B, H, Lq, Lk + 1});
  auto bias = random_tensor<double, 4>({1, 1, Lq + 1, Lk}, 5);
  for (int kind = 0; kind < 2; ++kind) {
    auto opts = p.opts;
    if (kind == 0) opts.weights_out = small_weights.view();
    if (kind == 1) opts.mask.bias = bias.cview();
    tensor<double, 3> out2(p.dout.extents, -7);
    EXPECT_TRUE(xattn_test::throws_with<xattn::shape_error>(
        [&] {
          xattn::training_forward(p.mha, other_query.cview(), p.context.cview(), p.values.cview(),
                                  out2.view(), saved, opts);
        },
        {"training_forward", kind == 0 ? "weights_out" : "mask.bias"}));
    for (double x : out2.data) ASSERT_EQ(x, -7.0);
    auto got = xattn::zero_weights<double>(p.mha.config());
    xattn::training_backward(p.mha, saved, p.dout.cview(), dq.view(), dc.view(), dv.view(), got);
    EXPECT_EQ(got.q_proj.weight, want.q_proj.weight) << "kind " << kind;
    EXPECT_EQ(got.out_proj.weight, want.out_proj.weight) << "kind " << kind;
  }
}

TEST(ModuleBackwardErrors, AnOutputInsideTheGradientsItAddsToIsRejected) {
  module_problem p(cases[0], xattn::attention_kernel::tiled);
  tensor<double, 3> out(p.dout.extents), dq(p.query.extents), dc(p.context.extents),
      dv(p.values.extents);
  xattn::cross_attention_saved<double> saved;
  xattn::training_forward(p.mha, p.query.cview(), p.context.cview(), p.values.cview(), out.view(),
                          saved, p.opts);
  auto grads = xattn::zero_weights<double>(p.mha.config());
  grads.out_proj.weight.setConstant(0.25);
  ASSERT_GE(grads.out_proj.weight.size(), index_t(dq.data.size()));
  const xattn::tensor_view<double, 3> inside(grads.out_proj.weight.data(), dq.extents);
  EXPECT_TRUE(xattn_test::throws_with<xattn::shape_error>(
      [&] {
        xattn::training_backward(p.mha, saved, p.dout.cview(), inside, dc.view(), dv.view(),
                                 grads);
      },
      {"training_backward", "dquery overlaps grads.out_proj.weight"}));
  EXPECT_TRUE(grads.out_proj.weight.isConstant(0.25, 0.0));
}

TEST(ModuleBackward, AcceptsMutableViews) {
  // T comes from the module: views of T (not const T) are accepted as inputs.
  module_problem p(cases[0], xattn::attention_kernel::tiled);
  tensor<double, 3> out(p.dout.extents), dq(p.query.extents), dc(p.context.extents),
      dv(p.values.extents);
  xattn::cross_attention_saved<double> saved;
  xattn::training_forward(p.mha, p.query.view(), p.context.view(), p.values.view(), out.view(),
                          saved, p.opts);
  auto grads = xattn::zero_weights<double>(p.mha.config());
  xattn::training_backward(p.mha, saved, p.dout.view(), dq.view(), dc.view(), dv.view(), grads);
  EXPECT_FALSE(grads.q_proj.weight.isZero(0.0));
}

}  // namespace
