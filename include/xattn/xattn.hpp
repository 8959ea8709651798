// SPDX-License-Identifier: MIT
// The umbrella header: includes every public xattn header that needs nothing beyond Eigen. Not
// here: heatmap_png.hpp (needs stb_image_write), safetensors.hpp and checkpoints.hpp (need
// nlohmann_json, target xattn::safetensors) and distributed.hpp (needs MPI, target xattn::mpi).
// Start reading at tensor_view.hpp, then attention_naive.hpp.
#pragma once

#include "xattn/attention.hpp"
#include "xattn/attention_backward.hpp"
#include "xattn/attention_naive.hpp"
#include "xattn/attention_tiled.hpp"
#include "xattn/config.hpp"
#include "xattn/cross_attention.hpp"
#include "xattn/cross_attention_backward.hpp"
#include "xattn/dispatch.hpp"
#include "xattn/errors.hpp"
#include "xattn/half.hpp"
#include "xattn/heatmap.hpp"
#include "xattn/options.hpp"
#include "xattn/projection.hpp"
#include "xattn/quantized.hpp"
#include "xattn/shapes.hpp"
#include "xattn/tensor_view.hpp"
#include "xattn/version.hpp"
