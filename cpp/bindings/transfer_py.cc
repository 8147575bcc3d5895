// SPDX-License-Identifier: Apache-2.0
#include <pybind11/pybind11.h>

namespace banaserve::py {
void bind_transfer(pybind11::module_& m) {}
}  // namespace banaserve::py
