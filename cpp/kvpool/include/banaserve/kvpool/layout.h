// SPDX-License-Identifier: Apache-2.0
// Shared-memory segment layout of a KV pool: pure arithmetic (offsets, sizes, hashing), no I/O.
//
//   [ Header | client table | bucket heads | slot table | page data ]
//
// Every region starts on a 64-byte boundary, the page data on a 4 KiB boundary. The slot table is
// the source of truth: the bucket chains and the free list are derived from it and rebuilt when a
// process dies holding the pool lock.
#pragma once

#include <cstddef>
#include <cstdint>

#include "banaserve/common/status.h"

namespace banaserve::kvpool {

inline constexpr uint64_t kMagic = 0x4c4f4f5056584e42ULL;  // "BNXVPOOL" little-endian
inline constexpr uint32_t kLayoutVersion = 1;
inline constexpr uint32_t kNone = 0xffffffffu;
inline constexpr uint32_t kMaxKeyLenLimit = 1024;
inline constexpr uint32_t kOpChunk = 256;  // pages pinned by one op record at a time

/// Sizes chosen at creation; stored in the header so openers read them back.
struct Geometry {
  uint64_t num_pages = 0;
  uint32_t page_size = 0;
  uint32_t max_key_len = 0;
  uint32_t max_clients = 0;
  uint32_t ops_per_client = 0;
};

/// Byte offsets of each region from the start of the segment.
struct Layout {
  uint64_t header_bytes = 0;
  uint64_t clients_offset = 0;
  uint64_t client_stride = 0;
  uint64_t buckets_offset = 0;
  uint64_t num_buckets = 0;  // power of two
  uint64_t slots_offset = 0;
  uint64_t slot_stride = 0;
  uint64_t pages_offset = 0;
  uint64_t page_stride = 0;
  uint64_t total_bytes = 0;
  uint64_t num_pages = 0;
  /// Bytes that are not page data (header, clients, buckets, slots, padding).
  uint64_t overhead_bytes() const { return total_bytes - num_pages * page_stride; }
};

/// Bytes of one slot record for keys up to max_key_len.
uint64_t slot_stride(uint32_t max_key_len);
/// Bytes of one client record (its op records included).
uint64_t client_stride(uint32_t ops_per_client);
/// Smallest power of two >= n (n >= 1).
uint64_t next_pow2(uint64_t n);
uint64_t align_up(uint64_t value, uint64_t alignment);

/// Validates geometry and computes the layout; InvalidArgument names the offending field.
StatusOr<Layout> compute_layout(const Geometry& geometry, uint64_t header_bytes);

/// Largest page count whose whole segment fits in total_bytes (0 if none fits).
uint64_t pages_for_budget(uint64_t total_bytes, const Geometry& geometry, uint64_t header_bytes);

/// 64-bit hash of a key (word-at-a-time; never 0).
uint64_t hash_key(const char* data, size_t len);

/// Number of slots to evict so that, after placing `need` more pages, at most
/// low_mark pages are in use; 0 while used + need stays at or below high_mark.
uint64_t eviction_target(uint64_t used, uint64_t need, uint64_t high_mark, uint64_t low_mark,
                         uint64_t num_pages);

}  // namespace banaserve::kvpool
