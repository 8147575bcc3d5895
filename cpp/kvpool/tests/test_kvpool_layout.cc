// SPDX-License-Identifier: Apache-2.0
// Pure arithmetic of the segment layout: offsets, alignment, budgets, hashing, eviction targets.
#include <set>
#include <string>

#include "banaserve/kvpool/layout.h"
#include "check.h"

using namespace banaserve::kvpool;

TEST_CASE(layout_regions_are_ordered_aligned_and_disjoint) {
  Geometry g{1000, 16384, 128, 64, 8};
  auto l = compute_layout(g, 512);
  CHECK(l.ok());
  CHECK_EQ(l->clients_offset % 64, 0u);
  CHECK_EQ(l->buckets_offset % 64, 0u);
  CHECK_EQ(l->slots_offset % 64, 0u);
  CHECK_EQ(l->pages_offset % 4096, 0u);
  CHECK(l->clients_offset >= 512);
  CHECK(l->buckets_offset >= l->clients_offset + l->client_stride * 64);
  CHECK(l->slots_offset >= l->buckets_offset + 4 * l->num_buckets);
  CHECK(l->pages_offset >= l->slots_offset + l->slot_stride * 1000);
  CHECK(l->total_bytes >= l->pages_offset + l->page_stride * 1000);
  CHECK_EQ(l->num_buckets, 1024u);
  CHECK_EQ(l->page_stride, 16384u);
  CHECK_EQ(l->slot_stride, 160u);
}

TEST_CASE(layout_rejects_bad_geometry) {
  CHECK(!compute_layout(Geometry{0, 4096, 128, 8, 8}, 512).ok());
  CHECK(!compute_layout(Geometry{10, 0, 128, 8, 8}, 512).ok());
  CHECK(!compute_layout(Geometry{10, 4096, 0, 8, 8}, 512).ok());
  CHECK(!compute_layout(Geometry{10, 4096, kMaxKeyLenLimit + 1, 8, 8}, 512).ok());
  CHECK(!compute_layout(Geometry{10, 4096, 128, 0, 8}, 512).ok());
  CHECK(!compute_layout(Geometry{10, 4096, 128, 8, 0}, 512).ok());
  CHECK(!compute_layout(Geometry{1ULL << 31, 4096, 128, 8, 8}, 512).ok());
  auto bad = compute_layout(Geometry{10, 0, 128, 8, 8}, 512);
  CHECK(bad.status().code() == banaserve::StatusCode::kInvalidArgument);
}

TEST_CASE(index_overhead_is_below_two_percent_for_16k_pages_in_a_gib) {
  Geometry g{65536, 16384, 128, 64, 8};  // 1 GiB of pages
  auto l = compute_layout(g, 512);
  CHECK(l.ok());
  double ratio = static_cast<double>(l->overhead_bytes()) / (65536.0 * 16384.0);
  CHECK(ratio < 0.02);
}

TEST_CASE(odd_page_sizes_get_a_64_byte_stride) {
  auto l = compute_layout(Geometry{3, 100, 16, 1, 1}, 512);
  CHECK(l.ok());
  CHECK_EQ(l->page_stride, 128u);
  CHECK_EQ(l->slot_stride, 48u);
}

TEST_CASE(pages_for_budget_is_the_largest_fitting_count) {
  Geometry g{0, 16384, 128, 8, 8};
  uint64_t budget = 64ULL << 20;
  uint64_t n = pages_for_budget(budget, g, 512);
  CHECK(n > 0);
  g.num_pages = n;
  CHECK(compute_layout(g, 512)->total_bytes <= budget);
  g.num_pages = n + 1;
  CHECK(compute_layout(g, 512)->total_bytes > budget);
  CHECK_EQ(pages_for_budget(1000, Geometry{0, 16384, 128, 8, 8}, 512), 0u);
}

TEST_CASE(next_pow2_and_align) {
  CHECK_EQ(next_pow2(1), 1u);
  CHECK_EQ(next_pow2(3), 4u);
  CHECK_EQ(next_pow2(1024), 1024u);
  CHECK_EQ(next_pow2(1025), 2048u);
  CHECK_EQ(align_up(0, 64), 0u);
  CHECK_EQ(align_up(1, 64), 64u);
  CHECK_EQ(align_up(64, 64), 64u);
}

TEST_CASE(hash_distinguishes_nearby_keys_and_is_never_zero) {
  std::set<uint64_t> seen;
  std::set<uint64_t> low_bits;
  for (int i = 0; i < 20000; ++i) {
    std::string key = "prefix-" + std::to_string(i);
    uint64_t h = hash_key(key.data(), key.size());
    CHECK(h != 0);
    seen.insert(h);
    low_bits.insert(h & 1023);
  }
  CHECK_EQ(seen.size(), 20000u);
  CHECK(low_bits.size() > 1000);  // buckets come from the low bits: all 1024 should be hit
  std::string a(64, 'a');
  std::string b = a;
  b[63] = 'b';
  CHECK(hash_key(a.data(), 64) != hash_key(b.data(), 64));
  CHECK(hash_key(a.data(), 63) != hash_key(a.data(), 64));
  CHECK_EQ(hash_key(a.data(), 64), hash_key(a.data(), 64));
}

TEST_CASE(eviction_target_respects_watermarks) {
  // 100 pages, high 95, low 90.
  CHECK_EQ(eviction_target(0, 10, 95, 90, 100), 0u);
  CHECK_EQ(eviction_target(85, 10, 95, 90, 100), 0u);   // exactly at the high mark
  CHECK_EQ(eviction_target(86, 10, 95, 90, 100), 6u);   // 96 -> down to 90
  CHECK_EQ(eviction_target(100, 1, 95, 90, 100), 11u);  // full
  CHECK_EQ(eviction_target(50, 200, 95, 90, 100), 50u); // cannot evict more than in use
  CHECK_EQ(eviction_target(10, 5, 100, 100, 10), 5u);   // high mark above capacity
}

int main() { return banaserve::testing::run_all(); }
