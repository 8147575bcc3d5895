// SPDX-License-Identifier: Apache-2.0
// Single-process behaviour of the shared-memory pool: put/get/exists, two-phase put, typed
// errors, eviction, pinning, attach/close.
#include <atomic>
#include <thread>

#include "check.h"
#include "pool_util.h"

using namespace banaserve;
using namespace banaserve::kvpool;
using namespace banaserve::kvpool::testutil;

namespace {

std::unique_ptr<Pool> make_pool(const std::string& name, uint64_t pages, uint32_t page_size,
                                uint32_t max_key_len = 64) {
  (void)Pool::unlink(name);
  PoolOptions opts;
  opts.capacity_bytes = pages * page_size;
  opts.page_size = page_size;
  opts.max_key_len = max_key_len;
  opts.max_clients = 8;
  opts.ops_per_client = 4;
  opts.populate = false;
  auto pool = Pool::create(name, opts);
  if (!pool.ok()) {
    std::fprintf(stderr, "create failed: %s\n", pool.status().to_string().c_str());
    std::abort();
  }
  return std::move(pool).value();
}

}  // namespace

TEST_CASE(put_then_get_round_trips_and_exists_counts_leading_hits) {
  std::string name = unique_name("roundtrip");
  auto pool = make_pool(name, 64, 4096);
  Keys keys(key_range(0, 10));
  Pages src(10, 4096);
  for (int i = 0; i < 10; ++i) fill_page(src.page(i), 4096, i);
  std::vector<uint8_t> results(10, 99);
  CHECK_OK(pool->put(keys.list(), src.io(), results.data()));
  for (int i = 0; i < 10; ++i) CHECK_EQ(results[i], uint8_t(PutResult::kStored));

  Keys probe({key_of(0), key_of(1), "missing", key_of(3)});
  std::vector<uint8_t> found(4);
  size_t leading = 0;
  CHECK_OK(pool->exists(probe.list(), found.data(), &leading));
  CHECK_EQ(leading, 2u);
  CHECK_EQ(found[2], 0);
  CHECK_EQ(found[3], 1);
  CHECK_OK(pool->exists(probe.list(), nullptr, &leading));
  CHECK_EQ(leading, 2u);

  Pages dst(4, 4096);
  size_t hits = 0;
  CHECK_OK(pool->get(probe.list(), dst.io(), found.data(), &hits));
  CHECK_EQ(hits, 3u);
  CHECK(check_page(dst.page(0), 4096, 0));
  CHECK(check_page(dst.page(1), 4096, 1));
  CHECK(check_page(dst.page(3), 4096, 3));
  CHECK_EQ(found[2], 0);

  auto st = pool->stats();
  CHECK(st.ok());
  CHECK_EQ(st->committed_pages, 10u);
  CHECK_EQ(st->hits, 3u);
  CHECK_EQ(st->misses, 1u);
  CHECK_EQ(st->free_pages, 54u);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(second_writer_of_a_key_learns_it_exists) {
  std::string name = unique_name("dup");
  auto pool = make_pool(name, 16, 256);
  Keys keys({"a", "b"});
  Pages src(2, 256);
  fill_page(src.page(0), 256, 1);
  fill_page(src.page(1), 256, 2);
  std::vector<uint8_t> r(2);
  CHECK_OK(pool->put(keys.list(), src.io(), r.data()));
  fill_page(src.page(0), 256, 7);
  CHECK_OK(pool->put(keys.list(), src.io(), r.data()));
  CHECK_EQ(r[0], uint8_t(PutResult::kExists));
  Pages dst(2, 256);
  CHECK_OK(pool->get(keys.list(), dst.io(), nullptr, nullptr));
  CHECK(check_page(dst.page(0), 256, 1));  // first writer's value kept
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(reserved_pages_are_invisible_until_commit_and_concurrent_reservers_lose) {
  std::string name = unique_name("twophase");
  auto pool = make_pool(name, 16, 256);
  auto other = Pool::open(name);
  CHECK(other.ok());
  Keys keys({"k"});
  uint32_t slot = kNone;
  uint8_t result = 99;
  CHECK_OK(pool->reserve(keys.list(), &slot, &result));
  CHECK_EQ(result, uint8_t(PutResult::kStored));
  CHECK(slot != kNone);

  size_t leading = 9;
  CHECK_OK(other.value()->exists(keys.list(), nullptr, &leading));
  CHECK_EQ(leading, 0u);
  Pages dst(1, 256);
  size_t hits = 9;
  CHECK_OK(other.value()->get(keys.list(), dst.io(), nullptr, &hits));
  CHECK_EQ(hits, 0u);
  // A second client (same process, other record) reserving the same key is told it is in flight.
  uint32_t slot2 = 0;
  uint8_t result2 = 99;
  CHECK_OK(other.value()->reserve(keys.list(), &slot2, &result2));
  CHECK_EQ(result2, uint8_t(PutResult::kInFlight));
  CHECK_EQ(slot2, kNone);
  // Another client cannot write into or commit my reservation.
  CHECK(!other.value()->page_address(slot).ok());
  CHECK(!other.value()->commit(&slot, 1).ok());

  auto addr = pool->page_address(slot);
  CHECK(addr.ok());
  fill_page(addr.value(), 256, 42);
  CHECK_OK(pool->commit(&slot, 1));
  CHECK_OK(other.value()->get(keys.list(), dst.io(), nullptr, &hits));
  CHECK_EQ(hits, 1u);
  CHECK(check_page(dst.page(0), 256, 42));

  // Abort frees the page and the key.
  Keys k2({"k2"});
  CHECK_OK(pool->reserve(k2.list(), &slot, &result));
  CHECK_OK(pool->abort(&slot, 1));
  CHECK_OK(pool->exists(k2.list(), nullptr, &leading));
  CHECK_EQ(leading, 0u);
  CHECK_EQ(pool->stats()->reserved_pages, 0u);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(bad_keys_and_page_sizes_are_invalid_argument) {
  std::string name = unique_name("bad");
  auto pool = make_pool(name, 8, 512, 16);
  Keys too_long({std::string(17, 'x')});
  Keys empty({""});
  Pages src(1, 512);
  std::vector<uint8_t> r(1);
  Status s = pool->put(too_long.list(), src.io(), r.data());
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(s.message().find("at most 16") != std::string::npos);
  CHECK(pool->put(empty.list(), src.io(), r.data()).code() == StatusCode::kInvalidArgument);
  size_t leading = 0;
  CHECK(pool->exists(too_long.list(), nullptr, &leading).code() ==
           StatusCode::kInvalidArgument);
  Keys ok({"fine"});
  uint64_t wrong_len = 256;
  IoList wrong{src.addrs.data(), &wrong_len, 1};
  s = pool->put(ok.list(), wrong, r.data());
  CHECK(s.code() == StatusCode::kInvalidArgument);
  CHECK(s.message().find("page size is 512") != std::string::npos);
  CHECK(pool->get(ok.list(), wrong, nullptr, nullptr).code() == StatusCode::kInvalidArgument);
  CHECK_EQ(pool->stats()->committed_pages, 0u);
  CHECK(Pool::open("bad name!").status().code() == StatusCode::kInvalidArgument);
  CHECK(Pool::open("no-such-pool-xyz").status().code() == StatusCode::kNotFound);
  PoolOptions opts;
  opts.capacity_bytes = 4096;
  opts.page_size = 512;
  CHECK(Pool::create(name, opts).status().code() == StatusCode::kAlreadyExists);
  opts.page_size = 8192;
  CHECK(Pool::create(name + "x", opts).status().code() == StatusCode::kInvalidArgument);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(split_pages_scatter_and_gather_in_pieces) {
  std::string name = unique_name("pieces");
  auto pool = make_pool(name, 8, 1000);
  std::vector<uint8_t> a(2 * 600), b(2 * 400);  // two "layers": 600 + 400 bytes per page
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint8_t>(i * 7);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 13 + 1);
  std::vector<uint64_t> addrs = {reinterpret_cast<uint64_t>(a.data()), reinterpret_cast<uint64_t>(b.data()),
                                 reinterpret_cast<uint64_t>(a.data() + 600),
                                 reinterpret_cast<uint64_t>(b.data() + 400)};
  std::vector<uint64_t> lens = {600, 400};
  IoList io{addrs.data(), lens.data(), 2};
  Keys keys({"p0", "p1"});
  std::vector<uint8_t> r(2);
  CHECK_OK(pool->put(keys.list(), io, r.data()));
  std::vector<uint8_t> a2(a.size()), b2(b.size());
  std::vector<uint64_t> out = {reinterpret_cast<uint64_t>(a2.data()), reinterpret_cast<uint64_t>(b2.data()),
                               reinterpret_cast<uint64_t>(a2.data() + 600),
                               reinterpret_cast<uint64_t>(b2.data() + 400)};
  IoList dst{out.data(), lens.data(), 2};
  size_t hits = 0;
  CHECK_OK(pool->get(keys.list(), dst, nullptr, &hits));
  CHECK_EQ(hits, 2u);
  CHECK(a == a2);
  CHECK(b == b2);
  // Whole-page read returns the pieces concatenated.
  Pages whole(1, 1000);
  Keys k1({"p1"});
  CHECK_OK(pool->get(k1.list(), whole.io(), nullptr, &hits));
  CHECK(std::memcmp(whole.page(0), a.data() + 600, 600) == 0);
  CHECK(std::memcmp(whole.page(0) + 600, b.data() + 400, 400) == 0);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(eviction_at_the_high_watermark_keeps_recent_pages) {
  std::string name = unique_name("evict");
  auto pool = make_pool(name, 100, 128);
  Pages src(1, 128);
  std::vector<uint8_t> r(1);
  for (int i = 0; i < 300; ++i) {
    fill_page(src.page(0), 128, i);
    Keys k({key_of(i)});
    CHECK_OK(pool->put(k.list(), src.io(), r.data()));
    CHECK_EQ(r[0], uint8_t(PutResult::kStored));
  }
  auto st = pool->stats();
  CHECK(st->committed_pages <= 95u);
  CHECK(st->evictions >= 200u);
  CHECK_EQ(st->committed_pages + st->free_pages, 100u);
  // The most recent key survives and still reads back intact.
  Keys last({key_of(299)});
  Pages dst(1, 128);
  size_t hits = 0;
  CHECK_OK(pool->get(last.list(), dst.io(), nullptr, &hits));
  CHECK_EQ(hits, 1u);
  CHECK(check_page(dst.page(0), 128, 299));
  // Every surviving key still holds its own data.
  Keys all(key_range(0, 300));
  Pages many(300, 128);
  std::vector<uint8_t> found(300);
  CHECK_OK(pool->get(all.list(), many.io(), found.data(), &hits));
  CHECK_EQ(hits, st->committed_pages);
  for (int i = 0; i < 300; ++i) {
    if (found[i]) CHECK(check_page(many.page(i), 128, i));
  }
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(full_pool_of_reserved_pages_reports_no_space_without_hanging) {
  std::string name = unique_name("full");
  auto pool = make_pool(name, 8, 64);
  Keys keys(key_range(0, 8));
  std::vector<uint32_t> slots(8);
  std::vector<uint8_t> r(8);
  CHECK_OK(pool->reserve(keys.list(), slots.data(), r.data()));
  auto other = Pool::open(name);
  Keys more({"extra"});
  Pages src(1, 64);
  uint8_t res = 99;
  CHECK_OK(other.value()->put(more.list(), src.io(), &res));
  CHECK_EQ(res, uint8_t(PutResult::kNoSpace));
  CHECK_EQ(other.value()->stats()->put_no_space, 1u);
  CHECK_OK(pool->commit(slots.data(), 8));
  CHECK_OK(other.value()->put(more.list(), src.io(), &res));  // now evictable
  CHECK_EQ(res, uint8_t(PutResult::kStored));
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(a_page_being_read_is_never_evicted) {
  // A reader copies a large page over and over while a writer floods a 4-page pool: CLOCK passes
  // the hot page many times (clearing its reference bit), so only the pin keeps it alive mid-copy.
  std::string name = unique_name("pin");
  const uint32_t page = 8 << 20;
  auto pool = make_pool(name, 4, page);
  Pages src(1, page);
  std::vector<uint8_t> r(1);
  fill_page(src.page(0), page, 5);
  Keys hot({"hot"});
  CHECK_OK(pool->put(hot.list(), src.io(), r.data()));
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0}, reads{0};
  std::thread reader([&] {
    auto p = Pool::open(name);
    Pages dst(1, page);
    while (!stop.load()) {
      size_t hits = 0;
      if (!p.value()->get(hot.list(), dst.io(), nullptr, &hits).ok()) bad++;
      if (hits == 1) {
        reads++;
        if (!check_page(dst.page(0), page, 5)) bad++;
      } else {
        // evicted between reads (allowed): put it back so the race continues
        fill_page(src.page(0), page, 5);
      }
    }
  });
  Pages junk(1, page);
  fill_page(junk.page(0), page, 77);
  for (int i = 0; i < 150; ++i) {
    Keys k({key_of(i)});
    CHECK_OK(pool->put(k.list(), junk.io(), r.data()));
    if (i % 3 == 0) CHECK_OK(pool->put(hot.list(), src.io(), r.data()));
  }
  stop = true;
  reader.join();
  CHECK_EQ(bad.load(), 0);
  CHECK(reads.load() > 0);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(closed_pool_fails_with_unavailable) {
  std::string name = unique_name("closed");
  auto pool = make_pool(name, 4, 64);
  auto client = Pool::open(name);
  CHECK(client.ok());
  CHECK_OK(pool->close_segment());
  Keys k({"a"});
  size_t leading = 0;
  Status s = client.value()->exists(k.list(), nullptr, &leading);
  CHECK(s.code() == StatusCode::kUnavailable);
  CHECK(Pool::open(name).status().code() == StatusCode::kUnavailable);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(remove_and_clear_free_committed_pages) {
  std::string name = unique_name("remove");
  auto pool = make_pool(name, 16, 64);
  Keys keys(key_range(0, 6));
  Pages src(6, 64);
  std::vector<uint8_t> r(6);
  CHECK_OK(pool->put(keys.list(), src.io(), r.data()));
  Keys two({key_of(1), key_of(2), "nope"});
  size_t removed = 0;
  CHECK_OK(pool->remove(two.list(), &removed));
  CHECK_EQ(removed, 2u);
  CHECK_OK(pool->clear(&removed));
  CHECK_EQ(removed, 4u);
  CHECK_EQ(pool->stats()->free_pages, 16u);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(pinned_pages_are_readable_in_place_and_never_evicted) {
  std::string name = unique_name("pinapi");
  auto pool = make_pool(name, 4, 128);
  Keys keys(key_range(0, 4));
  Pages src(4, 128);
  for (int i = 0; i < 4; ++i) fill_page(src.page(i), 128, i);
  std::vector<uint8_t> r(4);
  CHECK_OK(pool->put(keys.list(), src.io(), r.data()));
  Keys probe({key_of(0), key_of(1), key_of(2), key_of(3), "absent"});
  std::vector<uint64_t> addrs(5);
  auto handle = pool->pin(probe.list(), addrs.data());
  CHECK(handle.ok());
  CHECK_EQ(addrs[4], 0u);
  for (int i = 0; i < 4; ++i) {
    CHECK(check_page(reinterpret_cast<const uint8_t*>(addrs[i]), 128, i));
  }
  // Full pool, every page pinned: a put is refused, not blocked, and nothing is evicted.
  Keys more({"new"});
  uint8_t res = 99;
  CHECK_OK(pool->put(more.list(), src.io(), &res));
  CHECK_EQ(res, uint8_t(PutResult::kNoSpace));
  size_t removed = 9;
  CHECK_OK(pool->remove(keys.list(), &removed));
  CHECK_EQ(removed, 0u);
  CHECK_EQ(pool->stats()->pinned_pages, 4u);
  CHECK_OK(pool->unpin(handle.value()));
  CHECK(pool->unpin(handle.value()).code() == StatusCode::kNotFound);
  CHECK_OK(pool->put(more.list(), src.io(), &res));
  CHECK_EQ(res, uint8_t(PutResult::kStored));
  // Handles run out after ops_per_client (4 here) pins: a typed error.
  std::vector<uint32_t> held;
  for (int i = 0; i < 4; ++i) held.push_back(pool->pin(more.list(), addrs.data()).value());
  CHECK(pool->pin(more.list(), addrs.data()).status().code() == StatusCode::kResourceExhausted);
  for (uint32_t h : held) CHECK_OK(pool->unpin(h));
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(page_of_is_region_arithmetic) {
  PageRegion r;
  r.addr = 0x10000;
  r.stride = 4096;
  r.num_pages = 3;
  CHECK_EQ(r.nbytes(), 3u * 4096u);
  CHECK_EQ(page_of(r, 0), 0x10000u);
  CHECK_EQ(page_of(r, 2), 0x10000u + 2u * 4096u);
  r.stride = uint64_t(1) << 33;  // no 32-bit overflow for big pools
  CHECK_EQ(page_of(r, 3), 0x10000u + (uint64_t(3) << 33));
}

TEST_CASE(page_region_gives_every_reserved_and_pinned_page_address) {
  std::string name = unique_name("region");
  auto pool = make_pool(name, 8, 256);
  PageRegion region = pool->page_region();
  CHECK_EQ(region.num_pages, 8u);
  CHECK(region.stride >= 256u);
  Keys keys(key_range(0, 8));
  std::vector<uint32_t> slots(8);
  std::vector<uint8_t> results(8);
  CHECK_OK(pool->reserve(keys.list(), slots.data(), results.data()));
  for (int i = 0; i < 8; ++i) {
    CHECK_EQ(results[i], uint8_t(PutResult::kStored));
    CHECK(slots[i] < region.num_pages);
    auto addr = pool->page_address(slots[i]);
    CHECK(addr.ok());
    CHECK_EQ(page_of(region, slots[i]), reinterpret_cast<uint64_t>(addr.value()));
    fill_page(reinterpret_cast<uint8_t*>(page_of(region, slots[i])), 256, i);
  }
  CHECK_OK(pool->commit(slots.data(), slots.size()));
  std::vector<uint64_t> addrs(8);
  auto handle = pool->pin(keys.list(), addrs.data());
  CHECK(handle.ok());
  for (int i = 0; i < 8; ++i) {
    CHECK_EQ(addrs[i], page_of(region, slots[i]));
    CHECK(check_page(reinterpret_cast<const uint8_t*>(addrs[i]), 256, i));
  }
  CHECK_OK(pool->unpin(handle.value()));
  CHECK_OK(Pool::unlink(name));
}

int main() { return banaserve::testing::run_all(); }
