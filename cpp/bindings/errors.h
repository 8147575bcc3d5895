// SPDX-License-Identifier: Apache-2.0
// The single translation point from banaserve::Status to Python exceptions.
#pragma once

#include <string>

#include "banaserve/common/status.h"

namespace banaserve::py {

/// Throws the banaserve_ext.errors class registered for status.code(), with "where: message".
/// Safe to call with the GIL released: it throws a C++ exception that pybind11 translates once the
/// GIL is held again.
void throw_if_error(const Status& status, const char* where);

/// Called once at module init: loads the Python exception table from banaserve_ext.errors.
void init_error_table();

}  // namespace banaserve::py
