// SPDX-License-Identifier: Apache-2.0
// Tiny assertion macros and a name → function registry for the shm backend's test programs.
// Each program runs one named test per invocation (ctest registers every name separately).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace banaserve::transfer::shm::testing {

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, fn); }
};

/// main(): "prog NAME" runs one test, "prog" runs all, "prog --list" prints the names.
inline int run_tests(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--list") == 0) {
    for (auto& t : registry()) std::printf("%s\n", t.first.c_str());
    return 0;
  }
  int ran = 0;
  for (auto& t : registry()) {
    if (argc > 1 && t.first != argv[1]) continue;
    std::printf("[ RUN  ] %s\n", t.first.c_str());
    std::fflush(stdout);
    t.second();
    std::printf("[  OK  ] %s\n", t.first.c_str());
    std::fflush(stdout);
    ++ran;
  }
  if (ran == 0) {
    std::fprintf(stderr, "no test named %s\n", argc > 1 ? argv[1] : "(any)");
    return 1;
  }
  return 0;
}

}  // namespace banaserve::transfer::shm::testing

#define SHM_TEST(name)                                                                       \
  static void name();                                                                        \
  static ::banaserve::transfer::shm::testing::Register name##_registered(#name, &name);     \
  static void name()

#define CHECK(cond)                                                                          \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);          \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

#define CHECK_EQ(a, b)                                                                       \
  do {                                                                                       \
    auto va_ = (a);                                                                          \
    auto vb_ = (b);                                                                          \
    if (static_cast<long long>(va_) != static_cast<long long>(vb_)) {                        \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s (%lld) != %s (%lld)\n", __FILE__,     \
                   __LINE__, #a, static_cast<long long>(va_), #b,                            \
                   static_cast<long long>(vb_));                                             \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

#define CHECK_OK(expr)                                                                       \
  do {                                                                                       \
    ::banaserve::Status st_ = (expr);                                                        \
    if (!st_.ok()) {                                                                         \
      std::fprintf(stderr, "%s:%d: CHECK_OK failed: %s -> %s\n", __FILE__, __LINE__, #expr,  \
                   st_.to_string().c_str());                                                 \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)
