// SPDX-License-Identifier: Apache-2.0
#include "banaserve/kvpool/layout.h"

#include <cstring>
#include <string>

namespace banaserve::kvpool {

namespace {
constexpr uint64_t kSlotFixedBytes = 32;    // see Slot in pool.cc
constexpr uint64_t kClientFixedBytes = 64;  // see ClientRecord in pool.cc
constexpr uint64_t kOpFixedBytes = 8;       // see OpRecord in pool.cc
constexpr uint64_t kMaxPages = 1ULL << 31;  // slot ids are u32 with kNone reserved
}  // namespace

uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

uint64_t next_pow2(uint64_t n) {
  uint64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

uint64_t slot_stride(uint32_t max_key_len) { return align_up(kSlotFixedBytes + max_key_len, 8); }

uint64_t client_stride(uint32_t ops_per_client) {
  return align_up(kClientFixedBytes + ops_per_client * (kOpFixedBytes + 4ULL * kOpChunk), 64);
}

StatusOr<Layout> compute_layout(const Geometry& g, uint64_t header_bytes) {
  if (g.page_size == 0) return BANASERVE_INVALID("page_size must be > 0");
  if (g.num_pages == 0) return BANASERVE_INVALID("the pool must hold at least one page");
  if (g.num_pages >= kMaxPages) {
    return BANASERVE_INVALID("num_pages " + std::to_string(g.num_pages) + " exceeds 2^31 - 1");
  }
  if (g.max_key_len == 0 || g.max_key_len > kMaxKeyLenLimit) {
    return BANASERVE_INVALID("max_key_len must be in 1.." + std::to_string(kMaxKeyLenLimit));
  }
  if (g.max_clients == 0 || g.max_clients > 4096) {
    return BANASERVE_INVALID("max_clients must be in 1..4096");
  }
  if (g.ops_per_client == 0 || g.ops_per_client > 256) {
    return BANASERVE_INVALID("ops_per_client must be in 1..256");
  }
  Layout l;
  l.num_pages = g.num_pages;
  l.header_bytes = align_up(header_bytes, 64);
  l.clients_offset = l.header_bytes;
  l.client_stride = client_stride(g.ops_per_client);
  l.buckets_offset = align_up(l.clients_offset + l.client_stride * g.max_clients, 64);
  l.num_buckets = next_pow2(g.num_pages);
  l.slots_offset = align_up(l.buckets_offset + 4 * l.num_buckets, 64);
  l.slot_stride = slot_stride(g.max_key_len);
  l.pages_offset = align_up(l.slots_offset + l.slot_stride * g.num_pages, 4096);
  l.page_stride = align_up(g.page_size, 64);
  l.total_bytes = align_up(l.pages_offset + l.page_stride * g.num_pages, 4096);
  return l;
}

uint64_t pages_for_budget(uint64_t total_bytes, const Geometry& geometry, uint64_t header_bytes) {
  if (geometry.page_size == 0) return 0;
  Geometry g = geometry;
  uint64_t lo = 0;
  uint64_t hi = total_bytes / geometry.page_size + 1;
  if (hi >= kMaxPages) hi = kMaxPages - 1;
  while (lo < hi) {  // largest n with layout(n).total_bytes <= total_bytes
    uint64_t mid = (lo + hi + 1) / 2;
    g.num_pages = mid;
    auto l = compute_layout(g, header_bytes);
    if (l.ok() && l->total_bytes <= total_bytes) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

uint64_t hash_key(const char* data, size_t len) {
  // Word-at-a-time multiply-xorshift; keys are short (<= 1 KiB), mostly 64-char hex digests.
  constexpr uint64_t kMul = 0x9e3779b97f4a7c15ULL;
  uint64_t h = 0x243f6a8885a308d3ULL ^ (len * kMul);
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t w;
    std::memcpy(&w, data + i, 8);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
  }
  if (i < len) {
    uint64_t w = 0;
    std::memcpy(&w, data + i, len - i);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
  }
  h ^= h >> 32;
  h *= 0xd6e8feb86659fd93ULL;
  h ^= h >> 32;
  return h == 0 ? 1 : h;
}

uint64_t eviction_target(uint64_t used, uint64_t need, uint64_t high_mark, uint64_t low_mark,
                         uint64_t num_pages) {
  uint64_t cap = high_mark < num_pages ? high_mark : num_pages;
  if (used + need <= cap) return 0;
  uint64_t low = low_mark < cap ? low_mark : cap;
  uint64_t target = used + need > low ? used + need - low : 0;
  return target > used ? used : target;
}

}  // namespace banaserve::kvpool
