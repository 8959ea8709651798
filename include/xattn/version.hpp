// SPDX-License-Identifier: MIT
// xattn's version. CMakeLists.txt reads these three lines to set the package version, so keep
// each on its own line in this form.
#pragma once

#define XATTN_VERSION_MAJOR 0
#define XATTN_VERSION_MINOR 1
#define XATTN_VERSION_PATCH 0

/// The version as one number, major * 10000 + minor * 100 + patch, for preprocessor checks.
#define XATTN_VERSION \
  (XATTN_VERSION_MAJOR * 10000 + XATTN_VERSION_MINOR * 100 + XATTN_VERSION_PATCH)
