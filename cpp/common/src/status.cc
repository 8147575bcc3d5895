// SPDX-License-Identifier: Apache-2.0
#include "banaserve/common/status.h"

#include <cstring>

namespace banaserve {

const char* status_code_name(StatusCode code) {
  switch (code) {
#define BANASERVE_STATUS_NAME_(name, value) \
  case StatusCode::k##name:                 \
    return #name;
    BANASERVE_STATUS_CODES(BANASERVE_STATUS_NAME_)
#undef BANASERVE_STATUS_NAME_
  }
  return "Unknown";
}

Status::Status(StatusCode code, std::string message, const char* file, int line) {
  if (code != StatusCode::kOk) {
    rep_ = std::make_shared<const Rep>(Rep{code, std::move(message), file, line});
  }
}

const std::string& Status::message() const {
  static const std::string kEmpty;
  return rep_ ? rep_->message : kEmpty;
}

std::string Status::to_string() const {
  if (ok()) return "OK";
  return std::string(status_code_name(code())) + ": " + message();
}

Status Status::with_context(const std::string& context) const {
  if (ok()) return *this;
  return Status(code(), context + ": " + message(), file(), line());
}

Status errno_status(StatusCode code, const std::string& what, int err, const char* file, int line) {
  char buf[256];
  // GNU strerror_r returns a char* that may or may not be buf.
  const char* text = strerror_r(err, buf, sizeof(buf));
  return Status(code, what + ": " + text + " (errno " + std::to_string(err) + ")", file, line);
}

}  // namespace banaserve
