// SPDX-License-Identifier: Apache-2.0
// Processes killed at any point: mid-put (reservation held), holding the pool lock, and at random
// times in a put/get loop. Afterwards no partial page is visible, no lock is stuck, and the pool
// keeps working.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <random>
#include <thread>

#include "check.h"
#include "pool_util.h"

namespace banaserve::kvpool {
struct PoolTestPeer {
  static Status lock(Pool& pool) { return pool.lock(); }
};
}  // namespace banaserve::kvpool

using namespace banaserve;
using namespace banaserve::kvpool;
using namespace banaserve::kvpool::testutil;

namespace {

std::unique_ptr<Pool> make_pool(const std::string& name, uint64_t pages, uint32_t page_size) {
  (void)Pool::unlink(name);
  PoolOptions opts;
  opts.capacity_bytes = pages * page_size;
  opts.page_size = page_size;
  opts.max_key_len = 32;
  opts.max_clients = 8;
  opts.ops_per_client = 4;
  opts.populate = false;
  auto pool = Pool::create(name, opts);
  if (!pool.ok()) std::abort();
  return std::move(pool).value();
}

int wait_child(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

// Every committed key must read back as its full pattern (the seed is the key's number).
int count_corrupt(Pool& pool, int max_key, uint32_t page_size, size_t* hits_out) {
  Keys keys(key_range(0, max_key));
  Pages dst(max_key, page_size);
  std::vector<uint8_t> found(max_key);
  size_t hits = 0;
  if (!pool.get(keys.list(), dst.io(), found.data(), &hits).ok()) return -1;
  int bad = 0;
  for (int i = 0; i < max_key; ++i) {
    if (found[i] && !check_page(dst.page(i), page_size, i)) bad++;
  }
  *hits_out = hits;
  return bad;
}

}  // namespace

TEST_CASE(writer_dead_after_reserve_leaves_nothing_visible_and_space_is_reclaimed) {
  std::string name = unique_name("deadres");
  auto pool = make_pool(name, 4, 256);
  pid_t pid = fork();
  if (pid == 0) {
    auto p = Pool::open(name);
    Keys keys(key_range(0, 4));
    std::vector<uint32_t> slots(4);
    std::vector<uint8_t> r(4);
    if (!p.value()->reserve(keys.list(), slots.data(), r.data()).ok()) _exit(2);
    std::memset(p.value()->page_address(slots[0]).value(), 0xab, 100);  // half-written page
    _exit(0);                                                 // dies without commit
  }
  wait_child(pid);
  Keys keys(key_range(0, 4));
  size_t leading = 9;
  CHECK_OK(pool->exists(keys.list(), nullptr, &leading));
  CHECK_EQ(leading, 0u);
  // Pool is full of the dead writer's reservations; a put reclaims them and succeeds.
  Pages src(4, 256);
  for (int i = 0; i < 4; ++i) fill_page(src.page(i), 256, i);
  std::vector<uint8_t> r(4);
  CHECK_OK(pool->put(keys.list(), src.io(), r.data()));
  for (int i = 0; i < 4; ++i) CHECK_EQ(r[i], uint8_t(PutResult::kStored));
  size_t hits = 0;
  CHECK_EQ(count_corrupt(*pool, 4, 256, &hits), 0);
  CHECK_EQ(hits, 4u);
  CHECK(pool->stats()->reaped_clients >= 1u);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(process_dead_holding_the_lock_is_recovered) {
  std::string name = unique_name("deadlock");
  auto pool = make_pool(name, 16, 256);
  Keys keys(key_range(0, 5));
  Pages src(5, 256);
  for (int i = 0; i < 5; ++i) fill_page(src.page(i), 256, i);
  std::vector<uint8_t> r(5);
  CHECK_OK(pool->put(keys.list(), src.io(), r.data()));
  pid_t pid = fork();
  if (pid == 0) {
    auto p = Pool::open(name);
    Keys mine({key_of(7), key_of(8)});
    std::vector<uint32_t> slots(2);
    std::vector<uint8_t> rr(2);
    if (!p.value()->reserve(mine.list(), slots.data(), rr.data()).ok()) _exit(2);
    if (!PoolTestPeer::lock(*p.value()).ok()) _exit(3);
    raise(SIGKILL);  // dies holding the mutex and two reservations
  }
  wait_child(pid);
  size_t leading = 0;
  CHECK_OK(pool->exists(keys.list(), nullptr, &leading));  // would hang if the lock stuck
  CHECK_EQ(leading, 5u);
  auto st = pool->stats();
  CHECK_EQ(st->lock_recoveries, 1u);
  CHECK_EQ(st->reserved_pages, 0u);
  CHECK_EQ(st->committed_pages, 5u);
  CHECK_EQ(st->free_pages, 11u);
  size_t hits = 0;
  CHECK_EQ(count_corrupt(*pool, 9, 256, &hits), 0);
  CHECK_EQ(hits, 5u);
  // Still fully usable.
  Keys more({key_of(7)});
  Pages one(1, 256);
  fill_page(one.page(0), 256, 7);
  uint8_t res = 0;
  CHECK_OK(pool->put(more.list(), one.io(), &res));
  CHECK_EQ(res, uint8_t(PutResult::kStored));
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(reader_dead_holding_pins_releases_them) {
  std::string name = unique_name("deadpin");
  const uint32_t page = 4 << 20;  // large pages so the kill lands mid-copy often
  auto pool = make_pool(name, 4, page);
  Keys keys(key_range(0, 2));
  Pages src(2, page);
  std::vector<uint8_t> r(2);
  CHECK_OK(pool->put(keys.list(), src.io(), r.data()));
  for (int round = 0; round < 5; ++round) {
    pid_t pid = fork();
    if (pid == 0) {
      auto p = Pool::open(name);
      Pages dst(2, page);
      for (;;) (void)p.value()->get(keys.list(), dst.io(), nullptr, nullptr);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20 + 7 * round));
    kill(pid, SIGKILL);
    wait_child(pid);
  }
  size_t reaped = 0;
  CHECK_OK(pool->reap(&reaped));
  auto st = pool->stats();
  CHECK_EQ(st->pinned_pages, 0u);
  CHECK_EQ(st->clients, 1u);  // only this process remains attached
  size_t removed = 0;
  CHECK_OK(pool->clear(&removed));  // pinned pages could not be removed
  CHECK_EQ(removed, 2u);
  CHECK_OK(Pool::unlink(name));
}

TEST_CASE(writer_killed_at_random_times_never_exposes_a_partial_page) {
  std::string name = unique_name("randkill");
  const uint32_t page = 256 << 10;
  const int max_key = 64;
  auto pool = make_pool(name, 32, page);  // smaller than the key space: eviction runs too
  std::mt19937 rng(1234);
  for (int round = 0; round < 25; ++round) {
    pid_t pid = fork();
    if (pid == 0) {
      auto p = Pool::open(name);
      Pages src(4, page);
      std::mt19937 local(static_cast<unsigned>(getpid()));
      for (;;) {
        int base = static_cast<int>(local() % (max_key - 4));
        std::vector<std::string> names;
        for (int i = 0; i < 4; ++i) {
          fill_page(src.page(i), page, base + i);
          names.push_back(key_of(base + i));
        }
        Keys keys(names);
        std::vector<uint8_t> r(4);
        (void)p.value()->put(keys.list(), src.io(), r.data());
      }
    }
    std::this_thread::sleep_for(std::chrono::microseconds(2000 + rng() % 8000));
    kill(pid, SIGKILL);
    wait_child(pid);
    size_t hits = 0;
    CHECK_EQ(count_corrupt(*pool, max_key, page, &hits), 0);
  }
  size_t reaped = 0;
  CHECK_OK(pool->reap(&reaped));
  auto st = pool->stats();
  CHECK_EQ(st->reserved_pages, 0u);
  CHECK_EQ(st->committed_pages + st->free_pages, 32u);
  CHECK(st->puts > 0u);
  CHECK_OK(Pool::unlink(name));
}

int main() { return banaserve::testing::run_all(); }
