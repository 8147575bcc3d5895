// SPDX-License-Identifier: Apache-2.0
// The cross-process notification ring: order, capacity, validation, concurrent producers in
// separate processes (fork over a MAP_SHARED mapping) and the futex sleep protocol.
#include "backends/shm/control_ring.h"

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "test_util.h"

namespace banaserve::transfer::shm {
namespace {

struct SharedArea {
  explicit SharedArea(size_t n) : nbytes(n) {
    mem = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(mem != MAP_FAILED);
  }
  ~SharedArea() { munmap(mem, nbytes); }
  void* mem;
  size_t nbytes;
};

Notice make_notice(const std::string& src, uint64_t tid, uint32_t layer) {
  Notice n{};
  CHECK(copy_engine_id(n.source, src));
  n.transfer_id = tid;
  n.layer = layer;
  n.num_layers = 99;
  return n;
}

SHM_TEST(ring_fifo_full_and_wraparound) {
  SharedArea area(control_area_nbytes(4));
  auto ring = ControlRing::init(area.mem, area.nbytes, 4, 123, "owner");
  CHECK_OK(ring.status());
  ControlRing r = ring.value();
  CHECK(r.empty());
  Notice out;
  CHECK(!r.try_pop(&out));
  for (uint64_t lap = 0; lap < 5; ++lap) {
    for (uint32_t i = 0; i < 4; ++i) CHECK(r.try_push(make_notice("a", lap, i)));
    CHECK(!r.try_push(make_notice("a", lap, 4)));  // full
    for (uint32_t i = 0; i < 4; ++i) {
      CHECK(r.try_pop(&out));
      CHECK_EQ(out.transfer_id, lap);
      CHECK_EQ(out.layer, i);
      CHECK(std::string(out.source) == "a");
    }
    CHECK(r.empty());
  }
}

SHM_TEST(ring_init_and_attach_validate) {
  SharedArea area(control_area_nbytes(8));
  CHECK_EQ(static_cast<int>(ControlRing::init(area.mem, area.nbytes, 6, 1, "x").status().code()),
           static_cast<int>(StatusCode::kInvalidArgument));
  CHECK(!ControlRing::init(area.mem, control_area_nbytes(8) - 1, 8, 1, "x").ok());
  CHECK(!ControlRing::init(area.mem, area.nbytes, 8, 1, std::string(200, 'x')).ok());
  CHECK(!ControlRing::attach(area.mem, area.nbytes).ok());  // not formatted yet (zero magic)
  CHECK_OK(ControlRing::init(area.mem, area.nbytes, 8, 77, "engine-7").status());
  auto att = ControlRing::attach(area.mem, area.nbytes);
  CHECK_OK(att.status());
  CHECK_EQ(att.value().capacity(), 8u);
  CHECK_EQ(att.value().header()->owner_pid, 77);
  CHECK(std::string(att.value().header()->owner_id) == "engine-7");
  CHECK(!ControlRing::attach(area.mem, control_area_nbytes(4)).ok());  // truncated area
  auto* hdr = static_cast<ControlHeader*>(area.mem);
  hdr->version = 99;
  CHECK_EQ(static_cast<int>(ControlRing::attach(area.mem, area.nbytes).status().code()),
           static_cast<int>(StatusCode::kProtocolError));
}

SHM_TEST(ring_many_producer_processes_one_consumer) {
  constexpr uint32_t kCap = 64;
  constexpr int kProducers = 3;
  constexpr uint64_t kEach = 20000;
  SharedArea area(control_area_nbytes(kCap));
  auto init = ControlRing::init(area.mem, area.nbytes, kCap, getpid(), "consumer");
  CHECK_OK(init.status());
  ControlRing consumer = init.value();
  std::vector<pid_t> kids;
  for (int p = 0; p < kProducers; ++p) {
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
      auto att = ControlRing::attach(area.mem, area.nbytes);
      if (!att.ok()) _exit(2);
      ControlRing r = att.value();
      Notice n = make_notice("producer-" + std::to_string(p), 0, 0);
      for (uint64_t i = 0; i < kEach; ++i) {
        n.transfer_id = i;
        while (!r.try_push(n)) sched_yield();
        r.wake_if_sleeping();
      }
      _exit(0);
    }
    kids.push_back(pid);
  }
  std::vector<uint64_t> next(kProducers, 0);
  uint64_t got = 0;
  Notice out;
  while (got < kEach * kProducers) {
    if (!consumer.try_pop(&out)) {
      uint32_t seen = consumer.prepare_sleep();
      if (consumer.empty()) consumer.wait(seen, 1000);
      consumer.finish_sleep();
      continue;
    }
    std::string src(out.source);
    CHECK(src.rfind("producer-", 0) == 0);
    int p = std::stoi(src.substr(9));
    CHECK(p >= 0 && p < kProducers);
    CHECK_EQ(out.transfer_id, next[p]);  // per-producer order, nothing lost or duplicated
    ++next[p];
    ++got;
  }
  CHECK(consumer.empty());
  for (pid_t pid : kids) {
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
}

SHM_TEST(ring_sleeping_consumer_is_woken_by_another_process) {
  SharedArea area(control_area_nbytes(8));
  auto init = ControlRing::init(area.mem, area.nbytes, 8, getpid(), "c");
  CHECK_OK(init.status());
  ControlRing r = init.value();
  uint32_t seen = r.prepare_sleep();
  CHECK(r.empty());
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    usleep(50000);  // let the parent block in FUTEX_WAIT
    auto att = ControlRing::attach(area.mem, area.nbytes);
    if (!att.ok()) _exit(2);
    ControlRing p = att.value();
    if (!p.try_push(make_notice("k", 5, 1))) _exit(3);
    p.wake_if_sleeping();
    _exit(0);
  }
  // Spurious returns (EINTR) just loop; the 20 s bound only stops a broken wake-up from hanging.
  Notice out{};
  bool popped = false;
  for (int i = 0; i < 1000 && !popped; ++i) {
    if (r.empty()) r.wait(seen, 20000);
    r.finish_sleep();
    popped = r.try_pop(&out);
    if (!popped) seen = r.prepare_sleep();
  }
  CHECK(popped);
  CHECK_EQ(out.transfer_id, 5u);
  int status = 0;
  CHECK_EQ(waitpid(pid, &status, 0), pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

}  // namespace
}  // namespace banaserve::transfer::shm

int main(int argc, char** argv) { return banaserve::transfer::shm::testing::run_tests(argc, argv); }
