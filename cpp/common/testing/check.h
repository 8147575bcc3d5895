// SPDX-License-Identifier: Apache-2.0
// The one test harness of every C++ unit test (no external test framework on the build box);
// CMake target banaserve_testing.
//   TEST_CASE(name) { CHECK(cond); CHECK_EQ(a, b); CHECK_OK(status); CHECK_CODE(status, code); }
//   int main() { return banaserve::testing::run_all(); }
#pragma once

#include <cstdio>
#include <functional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "banaserve/common/status.h"

namespace banaserve::testing {

struct TestCase {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

/// A value as CHECK_EQ prints it: enums and chars as numbers, anything else streamed as is.
template <typename T>
auto printable(const T& v) {
  if constexpr (std::is_enum_v<T>) {
    return static_cast<long long>(static_cast<std::underlying_type_t<T>>(v));
  } else if constexpr (std::is_arithmetic_v<T>) {
    return +v;
  } else {
    return v;
  }
}

inline void fail(const char* file, int line, const std::string& what) {
  std::fprintf(stderr, "  FAILED %s:%d: %s\n", file, line, what.c_str());
  ++failures();
}

inline int run_all() {
  int failed_tests = 0;
  for (const auto& t : registry()) {
    const int before = failures();
    t.fn();
    const bool ok = failures() == before;
    failed_tests += ok ? 0 : 1;
    std::printf("%s %s\n", ok ? "[ OK ]" : "[FAIL]", t.name);
  }
  std::printf("%zu passed, %d failed\n", registry().size() - failed_tests, failed_tests);
  return failed_tests == 0 ? 0 : 1;
}

}  // namespace banaserve::testing

#define BANASERVE_TEST_CONCAT_(a, b) a##b
#define BANASERVE_TEST_CONCAT(a, b) BANASERVE_TEST_CONCAT_(a, b)
#define TEST_CASE(name)                                                                  \
  static void name();                                                                    \
  static ::banaserve::testing::Registrar BANASERVE_TEST_CONCAT(registrar_, name)(#name, name); \
  static void name()

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) ::banaserve::testing::fail(__FILE__, __LINE__, #cond);    \
  } while (0)

#define CHECK_EQ(a, b)                                                                       \
  do {                                                                                       \
    auto va_ = (a);                                                                          \
    auto vb_ = (b);                                                                          \
    if (!(va_ == vb_)) {                                                                     \
      std::ostringstream os_;                                                                \
      os_ << #a << " == " << #b << " (" << ::banaserve::testing::printable(va_) << " vs "     \
          << ::banaserve::testing::printable(vb_) << ")";                                    \
      ::banaserve::testing::fail(__FILE__, __LINE__, os_.str());                             \
    }                                                                                        \
  } while (0)

#define CHECK_OK(expr)                                                                        \
  do {                                                                                        \
    ::banaserve::Status st_ = (expr);                                                         \
    if (!st_.ok()) ::banaserve::testing::fail(__FILE__, __LINE__, #expr " -> " + st_.to_string()); \
  } while (0)

#define CHECK_CODE(expr, code_)                                                               \
  do {                                                                                        \
    ::banaserve::Status st_ = (expr);                                                         \
    if (st_.code() != (code_))                                                                \
      ::banaserve::testing::fail(__FILE__, __LINE__, #expr " -> " + st_.to_string());        \
  } while (0)
