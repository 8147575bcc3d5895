// SPDX-License-Identifier: Apache-2.0
// Helpers shared by the kvpool pool tests: key lists, page buffers, unique pool names.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "banaserve/kvpool/pool.h"

namespace banaserve::kvpool::testutil {

struct Keys {
  std::string data;
  std::vector<uint64_t> offsets{0};
  explicit Keys(const std::vector<std::string>& keys) {
    for (const auto& k : keys) {
      data += k;
      offsets.push_back(data.size());
    }
  }
  KeyList list() const { return KeyList{data.data(), offsets.data(), offsets.size() - 1}; }
};

/// n pages of page_size bytes in one buffer, with an IoList of one piece per page.
struct Pages {
  std::vector<uint8_t> bytes;
  std::vector<uint64_t> addrs;
  uint64_t seg_len;
  Pages(size_t n, uint32_t page_size) : bytes(n * page_size), addrs(n), seg_len(page_size) {
    for (size_t i = 0; i < n; ++i) addrs[i] = reinterpret_cast<uint64_t>(bytes.data() + i * page_size);
  }
  IoList io() const { return IoList{addrs.data(), &seg_len, 1}; }
  uint8_t* page(size_t i) { return bytes.data() + i * seg_len; }
};

inline std::string key_of(int i) { return "key-" + std::to_string(i); }

inline std::vector<std::string> key_range(int begin, int end) {
  std::vector<std::string> keys;
  for (int i = begin; i < end; ++i) keys.push_back(key_of(i));
  return keys;
}

/// Fills a page with a pattern derived from a seed; check_page verifies it.
inline void fill_page(uint8_t* page, uint32_t size, uint32_t seed) {
  uint32_t x = seed * 2654435761u + 1;
  for (uint32_t i = 0; i < size; ++i) {
    x = x * 1103515245u + 12345u;
    page[i] = static_cast<uint8_t>(x >> 16);
  }
}

inline bool check_page(const uint8_t* page, uint32_t size, uint32_t seed) {
  std::vector<uint8_t> want(size);
  fill_page(want.data(), size, seed);
  return std::memcmp(want.data(), page, size) == 0;
}

inline std::string unique_name(const char* tag) {
  return std::string("test-") + tag + "-" + std::to_string(getpid());
}

}  // namespace banaserve::kvpool::testutil
