// SPDX-License-Identifier: Apache-2.0
// Pure helpers of the shm copy loop: address translation, cursors, iovec batching, chunked copy.
#include "backends/shm/copy_plan.h"

#include <numeric>
#include <vector>

#include "test_util.h"

namespace banaserve::transfer::shm {
namespace {

uint64_t addr(const void* p) { return reinterpret_cast<uint64_t>(p); }

SHM_TEST(mapped_address_translates_offsets) {
  RegionInfo r;
  r.addr = 0x7f0000001000;
  r.nbytes = 8192;
  r.shm_offset = 4096;
  CHECK_EQ(mapped_address(0x10000, r, r.addr), 0x10000 + 4096);
  CHECK_EQ(mapped_address(0x10000, r, r.addr + 100), 0x10000 + 4096 + 100);
  CHECK(region_fits_file(r, 4096 + 8192));
  CHECK(!region_fits_file(r, 4096 + 8191));
  r.shm_offset = ~uint64_t{0} - 10;  // overflow must not pass
  CHECK(!region_fits_file(r, 1 << 20));
}

SHM_TEST(cursor_skips_empty_runs_and_stops_at_end) {
  std::vector<ResolvedRun> runs = {{0, 0, 0}, {0, 0, 10}, {0, 0, 0}, {0, 0, 5}, {0, 0, 0}};
  RunCursor cur;
  CHECK(!cursor_done(runs.data(), runs.size(), cur));
  CHECK_EQ(advance_cursor(runs.data(), runs.size(), &cur, 4), 4u);
  CHECK_EQ(cur.index, 1u);
  CHECK_EQ(cur.offset, 4u);
  CHECK_EQ(advance_cursor(runs.data(), runs.size(), &cur, 6), 6u);
  CHECK_EQ(advance_cursor(runs.data(), runs.size(), &cur, 100), 5u);
  CHECK(cursor_done(runs.data(), runs.size(), cur));
  std::vector<ResolvedRun> empty = {{0, 0, 0}, {0, 0, 0}};
  RunCursor c2;
  CHECK(cursor_done(empty.data(), empty.size(), c2));
  CHECK(cursor_done(nullptr, 0, RunCursor{}));
}

SHM_TEST(fill_iovecs_respects_byte_and_count_limits) {
  std::vector<ResolvedRun> runs;
  for (uint64_t i = 0; i < 10; ++i) runs.push_back({1000 * i, 5000 * i, i == 3 ? uint64_t{0} : uint64_t{100}});
  struct iovec l[4], r[4];
  uint64_t n = 0;
  RunCursor cur{1, 30};
  size_t k = fill_iovecs(runs.data(), runs.size(), cur, 1000, 4, l, r, &n);
  CHECK_EQ(k, 4u);  // runs 1 (70 bytes), 2, 4, 5: run 3 is empty
  CHECK_EQ(n, 70u + 300u);
  CHECK_EQ(addr(l[0].iov_base), 1030u);
  CHECK_EQ(addr(r[0].iov_base), 5030u);
  CHECK_EQ(addr(l[2].iov_base), 4000u);
  k = fill_iovecs(runs.data(), runs.size(), RunCursor{}, 150, 4, l, r, &n);
  CHECK_EQ(k, 2u);
  CHECK_EQ(n, 150u);
  CHECK_EQ(l[1].iov_len, 50u);
}

SHM_TEST(copy_chunk_moves_bytes_in_both_directions) {
  std::vector<unsigned char> a(10000), b(10000, 0);
  std::iota(a.begin(), a.end(), 0);
  std::vector<ResolvedRun> runs = {{addr(&a[1]), addr(&b[5003]), 4097},
                                   {addr(&a[9000]), addr(&b[10]), 0},
                                   {addr(&a[5000]), addr(&b[0]), 7}};
  RunCursor cur;
  uint64_t total = 0;
  int chunks = 0;
  while (!cursor_done(runs.data(), runs.size(), cur)) {
    total += copy_chunk(runs.data(), runs.size(), &cur, 1000, Op::kWrite);
    ++chunks;
  }
  CHECK_EQ(total, 4104u);
  CHECK_EQ(chunks, 5);
  for (int i = 0; i < 4097; ++i) CHECK_EQ(b[5003 + i], a[1 + i]);
  for (int i = 0; i < 7; ++i) CHECK_EQ(b[i], a[5000 + i]);
  CHECK_EQ(b[7], 0);
  std::vector<unsigned char> c(10000, 0);
  std::vector<ResolvedRun> back = {{addr(&c[0]), addr(&b[5003]), 4097}};
  RunCursor bc;
  CHECK_EQ(copy_chunk(back.data(), back.size(), &bc, 1 << 20, Op::kRead), 4097u);
  for (int i = 0; i < 4097; ++i) CHECK_EQ(c[i], a[1 + i]);
}

}  // namespace
}  // namespace banaserve::transfer::shm

int main(int argc, char** argv) { return banaserve::transfer::shm::testing::run_tests(argc, argv); }
