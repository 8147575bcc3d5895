// SPDX-License-Identifier: Apache-2.0
// A tiny assertion harness for the kvpool C++ tests (no gtest on the build boxes).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace banaserve::kvpool::testing {

struct TestCase {
  const char* name;
  std::function<void()> body;
};

inline std::vector<TestCase>& registry() {
  static std::vector<TestCase> tests;
  return tests;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> body) {
    registry().push_back({name, std::move(body)});
  }
};

inline int run_all() {
  for (const TestCase& t : registry()) {
    int before = failures();
    t.body();
    std::printf("[%s] %s\n", failures() == before ? "  OK  " : " FAIL ", t.name);
  }
  std::printf("%zu tests, %d failed checks\n", registry().size(), failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace banaserve::kvpool::testing

#define KV_TEST(name)                                                              \
  static void name();                                                              \
  static ::banaserve::kvpool::testing::Registrar name##_registrar(#name, &name);   \
  static void name()

#define KV_CHECK(cond)                                                             \
  do {                                                                             \
    if (!(cond)) {                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ::banaserve::kvpool::testing::failures()++;                                  \
    }                                                                              \
  } while (0)

#define KV_CHECK_EQ(a, b)                                                          \
  do {                                                                             \
    auto kv_a_ = (a);                                                              \
    auto kv_b_ = (b);                                                              \
    if (!(kv_a_ == kv_b_)) {                                                       \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s (%lld) != %s (%lld)\n", __FILE__, \
                   __LINE__, #a, static_cast<long long>(kv_a_), #b,                \
                   static_cast<long long>(kv_b_));                                 \
      ::banaserve::kvpool::testing::failures()++;                                  \
    }                                                                              \
  } while (0)

#define KV_CHECK_OK(expr)                                                          \
  do {                                                                             \
    ::banaserve::Status kv_s_ = (expr);                                            \
    if (!kv_s_.ok()) {                                                             \
      std::fprintf(stderr, "%s:%d: %s returned %s\n", __FILE__, __LINE__, #expr,   \
                   kv_s_.to_string().c_str());                                     \
      ::banaserve::kvpool::testing::failures()++;                                  \
    }                                                                              \
  } while (0)

#define KV_MAIN() \
  int main() { return ::banaserve::kvpool::testing::run_all(); }
