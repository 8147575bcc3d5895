// SPDX-License-Identifier: Apache-2.0
// banaserve_ext._core: thin bindings over cpp/transfer and cpp/kvpool. Every function here
// converts arguments, releases the GIL around I/O, and converts Status in errors.cc; no logic.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "errors.h"

namespace pyb = pybind11;
using namespace pybind11::literals;

namespace banaserve::py {
void bind_transfer(pyb::module_& m);
#ifdef BANASERVE_HAVE_KVPOOL
void bind_kvpool(pyb::module_& m);
#endif
}  // namespace banaserve::py

PYBIND11_MODULE(_core, m) {
  m.doc() = "banaserve_ext compiled core (transfer engine, KV pool)";
  banaserve::py::init_error_table();
  m.def("build_info", []() {
    pyb::dict info;
    info["version"] = BANASERVE_VERSION;
#ifdef BANASERVE_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef __SANITIZE_ADDRESS__
    info["sanitizers"] = true;
#else
    info["sanitizers"] = false;
#endif
    info["kvpool"] =
#ifdef BANASERVE_HAVE_KVPOOL
        true;
#else
        false;
#endif
    return info;
  });
  m.def(
      "status_codes",
      []() {
        std::map<std::string, int> codes;
        for (banaserve::StatusCode code : banaserve::kAllStatusCodes) {
          codes[banaserve::status_code_name(code)] = static_cast<int>(code);
        }
        return codes;
      },
      "Every StatusCode of the C++ core: name -> value.");
  m.def(
      "raise_status",
      [](int code, const std::string& message) {
        if (code < 0 || code > 255) {
          banaserve::py::throw_if_error(BANASERVE_INVALID("a status code is a uint8, got " +
                                                          std::to_string(code)),
                                        "raise_status");
        }
        banaserve::py::throw_if_error(
            banaserve::Status(static_cast<banaserve::StatusCode>(code), message), "raise_status");
      },
      "code"_a, "message"_a,
      "Raises the exception the bindings map a Status of this code to (tests use it).");
  banaserve::py::bind_transfer(m);
#ifdef BANASERVE_HAVE_KVPOOL
  banaserve::py::bind_kvpool(m);
#endif
}
