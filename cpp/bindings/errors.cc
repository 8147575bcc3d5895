// SPDX-License-Identifier: Apache-2.0
#include "errors.h"

#include <pybind11/pybind11.h>

namespace banaserve::py {
namespace pyb = pybind11;

namespace {

// Carries a Status out of GIL-released code; translated to Python by the registered translator.
struct StatusException {
  Status status;
  std::string where;
};

pyb::object& error_table() {
  // Leaked on purpose: must outlive interpreter finalisation order games.
  static auto* table = new pyb::object();
  return *table;
}

}  // namespace

void throw_if_error(const Status& status, const char* where) {
  if (!status.ok()) throw StatusException{status, where};
}

void init_error_table() {
  pyb::module_ errors = pyb::module_::import("banaserve_ext.errors");
  error_table() = errors.attr("STATUS_CODE_TO_ERROR");
  pyb::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const StatusException& e) {
      pyb::object cls;
      pyb::dict table = error_table();
      auto code = pyb::int_(static_cast<int>(e.status.code()));
      if (table.contains(code)) {
        cls = table[code];
      } else {
        cls = pyb::module_::import("banaserve_ext.errors").attr("InternalError");
      }
      std::string text = e.where + ": " + e.status.message();
      PyErr_SetObject(cls.ptr(), pyb::str(text).ptr());
    }
  });
}

}  // namespace banaserve::py
