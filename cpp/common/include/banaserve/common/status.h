// SPDX-License-Identifier: Apache-2.0
// Status: the error model of the C++ core. No exceptions cross the core's API; every fallible call
// returns a Status (or StatusOr<T>). The Python bindings convert a Status to an exception in exactly
// one place (cpp/bindings/errors.cc).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>

namespace banaserve {

// The status codes, listed once: the enum, status_code_name(), kAllStatusCodes and the bindings'
// status_codes() (which banaserve_ext.errors is tested against) are all made from this list.
// Wire/ABI-stable values: the bindings and the Python exception table key on these numbers.
#define BANASERVE_STATUS_CODES(X)                                                             \
  X(Ok, 0)                                                                                    \
  X(InvalidArgument, 1)   /* malformed input: bad sizes, unregistered or out-of-range memory */ \
  X(NotFound, 2)          /* unknown peer, key, handle */                                     \
  X(AlreadyExists, 3)     /* duplicate registration, key already committed by another writer */ \
  X(OutOfRange, 4)        /* index outside a prepared list */                                 \
  X(ResourceExhausted, 5) /* pool full, queue full */                                         \
  X(Unavailable, 6)       /* peer unreachable or dead, engine not started */                  \
  X(Timeout, 7)           /* deadline passed */                                               \
  X(Cancelled, 8)         /* cancelled by the caller */                                       \
  X(ProtocolError, 9)     /* malformed or truncated frame from a peer */                      \
  X(NotImplemented, 10)   /* capability not provided by the chosen backend */                 \
  X(Internal, 11)         /* a bug or an OS error with no better mapping */                   \
  X(CudaError, 12)        /* CUDA runtime failure (CUDA backend only) */

enum class StatusCode : uint8_t {
#define BANASERVE_STATUS_ENUMERATOR_(name, value) k##name = value,
  BANASERVE_STATUS_CODES(BANASERVE_STATUS_ENUMERATOR_)
#undef BANASERVE_STATUS_ENUMERATOR_
};

/// Every status code, kOk first, in value order.
inline constexpr StatusCode kAllStatusCodes[] = {
#define BANASERVE_STATUS_LISTED_(name, value) StatusCode::k##name,
    BANASERVE_STATUS_CODES(BANASERVE_STATUS_LISTED_)
#undef BANASERVE_STATUS_LISTED_
};

/// "InvalidArgument", "NotFound", ... ("Ok" for kOk); "Unknown" for a value outside the list.
const char* status_code_name(StatusCode code);

/// A cheap value: OK carries no allocation. Non-OK carries a message and the source location
/// (kept in fields, not in the message, so callers may format them as they like).
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message, const char* file = nullptr, int line = 0);

  static Status ok_status() { return Status(); }

  bool ok() const { return rep_ == nullptr; }
  StatusCode code() const { return rep_ ? rep_->code : StatusCode::kOk; }
  const std::string& message() const;
  const char* file() const { return rep_ ? rep_->file : nullptr; }
  int line() const { return rep_ ? rep_->line : 0; }
  /// "InvalidArgument: <message>"
  std::string to_string() const;
  /// Adds context in front of the message ("engine.submit: ...").
  Status with_context(const std::string& context) const;

 private:
  struct Rep {
    StatusCode code;
    std::string message;
    const char* file;
    int line;
  };
  std::shared_ptr<const Rep> rep_;
};

/// Either a value or a non-OK Status.
template <typename T>
class [[nodiscard]] StatusOr {
 public:
  StatusOr(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  StatusOr(Status status) : status_(std::move(status)) {}  // NOLINT: implicit by design
  bool ok() const { return status_.ok(); }
  const Status& status() const { return status_; }
  T& value() & { return *value_; }
  const T& value() const& { return *value_; }
  T&& value() && { return std::move(*value_); }
  T* operator->() { return &*value_; }
  const T* operator->() const { return &*value_; }

 private:
  Status status_;
  std::optional<T> value_;
};

#define BANASERVE_STATUS(code, msg) ::banaserve::Status((code), (msg), __FILE__, __LINE__)
#define BANASERVE_INVALID(msg) BANASERVE_STATUS(::banaserve::StatusCode::kInvalidArgument, (msg))

#define BANASERVE_CONCAT_INNER_(a, b) a##b
#define BANASERVE_CONCAT_(a, b) BANASERVE_CONCAT_INNER_(a, b)

/// Evaluates expr once; returns its Status from the enclosing function if it is not OK.
#define BANASERVE_RETURN_IF_ERROR(expr)                                       \
  do {                                                                        \
    ::banaserve::Status banaserve_status_ = (expr);                           \
    if (!banaserve_status_.ok()) return banaserve_status_;                    \
  } while (0)

/// lhs = value of a StatusOr expression, or return its Status.
#define BANASERVE_ASSIGN_OR_RETURN(lhs, expr)                                 \
  auto BANASERVE_CONCAT_(banaserve_sor_, __LINE__) = (expr);                  \
  if (!BANASERVE_CONCAT_(banaserve_sor_, __LINE__).ok())                      \
    return BANASERVE_CONCAT_(banaserve_sor_, __LINE__).status();              \
  lhs = std::move(BANASERVE_CONCAT_(banaserve_sor_, __LINE__)).value()

/// errno → Status with the OS error text.
Status errno_status(StatusCode code, const std::string& what, int err, const char* file, int line);
#define BANASERVE_ERRNO(code, what) ::banaserve::errno_status((code), (what), errno, __FILE__, __LINE__)

}  // namespace banaserve
