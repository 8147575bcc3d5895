// SPDX-License-Identifier: Apache-2.0
#include "backends/shm/shm_transport.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <utility>

#include "backends/shm/control_ring.h"
#include "backends/shm/copy_plan.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

namespace banaserve::transfer {
namespace {

using shm::ControlRing;
using shm::Notice;
using shm::ResolvedRun;
using shm::RunCursor;

constexpr size_t kMaxIov = IOV_MAX;
constexpr uint64_t kMinPartNbytes = uint64_t{128} << 10;
constexpr uint64_t kPartNbytes = uint64_t{512} << 10;  // target size of a claimable part
constexpr size_t kMaxParts = 64;
constexpr uint64_t kDeliverySpinNs = 20000;  // spin this long after the last notice, then sleep
constexpr int kDeliverySleepMs = 100;        // futex wait bound (stop() also wakes explicitly)

Status unavailable(const std::string& msg) {
  return Status(StatusCode::kUnavailable, msg, __FILE__, __LINE__);
}

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

/// A MAP_SHARED mapping of one of the peer's memfds (a region's or its control area).
struct Mapping {
  void* base = nullptr;
  size_t nbytes = 0;
  int32_t fd = -1;  // the fd number in the peer's process
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base != nullptr) munmap(base, nbytes);
  }
  uint64_t addr() const { return reinterpret_cast<uint64_t>(base); }
};

StatusOr<std::shared_ptr<Mapping>> map_peer_fd(int32_t pid, int32_t fd, uint64_t min_nbytes,
                                               const std::string& what) {
  std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  int f = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (f < 0) {
    int err = errno;
    std::string hint;
    if (err == ENOENT) hint = " (peer process gone or stale metadata)";
    if (err == EACCES || err == EPERM) {
      hint = " (needs the same uid and ptrace read access to the peer process)";
    }
    return errno_status(StatusCode::kUnavailable, "shm: cannot open " + what + " " + path + hint,
                        err, __FILE__, __LINE__);
  }
  struct stat st;
  if (fstat(f, &st) != 0) {
    int err = errno;
    close(f);
    return errno_status(StatusCode::kUnavailable, "shm: fstat " + path, err, __FILE__, __LINE__);
  }
  auto size = static_cast<uint64_t>(st.st_size);
  if (size < min_nbytes || size == 0) {
    close(f);
    return unavailable("shm: " + what + " " + path + " holds " + std::to_string(size) +
                       " bytes but the metadata needs " + std::to_string(min_nbytes) +
                       " (stale metadata?)");
  }
  void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, f, 0);
  int err = errno;
  close(f);
  if (p == MAP_FAILED) {
    return errno_status(StatusCode::kUnavailable, "shm: mmap " + what + " " + path, err, __FILE__,
                        __LINE__);
  }
  auto m = std::make_shared<Mapping>();
  m->base = p;
  m->nbytes = size;
  m->fd = fd;
  return m;
}

/// Field 22 of /proc/<pid>/stat (start time in clock ticks), 0 if unreadable.
uint64_t process_start_time(int32_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(in, line)) return 0;
  size_t close_paren = line.rfind(')');
  if (close_paren == std::string::npos) return 0;
  std::istringstream rest(line.substr(close_paren + 2));
  std::string field;
  for (int i = 3; i <= 22 && (rest >> field); ++i) {
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  }
  return 0;
}

/// Whether a peer process still exists. Shared by every PeerState of the same process.
struct Liveness {
  int32_t pid = 0;
  int pidfd = -1;
  uint64_t start_time = 0;
  std::atomic<bool> gone{false};
  std::mutex mu;
  Status why;  // guarded by mu

  ~Liveness() {
    if (pidfd >= 0) close(pidfd);
  }
  bool alive() const {
    if (pidfd >= 0) {
      struct pollfd p = {pidfd, POLLIN, 0};
      return poll(&p, 1, 0) == 0;  // readable once the process exited
    }
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    return start_time == 0 || process_start_time(pid) == start_time;
  }
  /// Marks the peer gone; true for the first caller only.
  bool mark_gone(const Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    if (gone.load(std::memory_order_acquire)) return false;
    why = s;
    gone.store(true, std::memory_order_release);
    return true;
  }
  Status reason() {
    std::lock_guard<std::mutex> lock(mu);
    return why;
  }
};

StatusOr<std::shared_ptr<Liveness>> watch_process(int32_t pid) {
  auto live = std::make_shared<Liveness>();
  live->pid = pid;
  live->pidfd = static_cast<int>(syscall(SYS_pidfd_open, pid, 0));
  if (live->pidfd < 0) {
    int err = errno;
    if (err == ESRCH) return unavailable("shm: peer pid " + std::to_string(pid) + " does not exist");
    live->start_time = process_start_time(pid);  // older kernel: kill(0) + start time
    if (live->start_time == 0) {
      return unavailable("shm: peer pid " + std::to_string(pid) + " is not visible in /proc");
    }
  }
  return live;
}

struct RegionMap {
  std::shared_ptr<Mapping> map;
  uint64_t shm_offset = 0;
};

struct PeerState {
  std::string engine_id;
  int32_t pid = 0;
  std::shared_ptr<Liveness> live;
  std::shared_ptr<Mapping> control;
  ControlRing ring;
  std::atomic<bool> disconnected{false};
  std::mutex mu;
  std::unordered_map<uint64_t, RegionMap> regions;  // by region id; guarded by mu

  Status usable() {
    if (disconnected.load(std::memory_order_acquire)) {
      return unavailable("shm: peer " + engine_id + " was disconnected");
    }
    if (live->gone.load(std::memory_order_acquire)) return live->reason();
    return Status();
  }
};

struct Part {
  std::vector<ResolvedRun> mapped;  // memcpy through our mapping of the peer's memfd
  std::vector<ResolvedRun> cma;     // process_vm_writev / process_vm_readv
};

/// One posted batch as the backend tracks it. Big batches are cut into parts; whoever runs next
/// (a copy worker, or the posting thread helping) claims the next unclaimed part.
struct Job {
  std::shared_ptr<Batch> batch;
  std::shared_ptr<PeerState> peer;
  Op op = Op::kWrite;
  bool notify = false;
  std::vector<Part> parts;
  std::atomic<uint32_t> next_part{0};
  std::atomic<uint32_t> parts_left{1};
  std::mutex mu;
  Status first_error;  // guarded by mu
};

/// A token in the workers' queue: "claim a part of this job" (a no-op once all are claimed).
struct WorkItem {
  std::shared_ptr<Job> job;
};

uint64_t part_nbytes(const Part& part) {
  uint64_t n = 0;
  for (const auto& r : part.mapped) n += r.nbytes;
  for (const auto& r : part.cma) n += r.nbytes;
  return n;
}

Status cma_error(int err, Op op, int32_t pid, const std::string& peer) {
  const char* call = op == Op::kWrite ? "process_vm_writev" : "process_vm_readv";
  std::string where = std::string("shm: ") + call + " (peer " + peer + ", pid " +
                      std::to_string(pid) + ")";
  switch (err) {
    case EPERM:
      return errno_status(StatusCode::kUnavailable,
                          where + " denied: cross-memory attach needs ptrace access to the peer "
                                  "(same uid and kernel.yama.ptrace_scope 0, or CAP_SYS_PTRACE); "
                                  "memory from Engine.allocate() uses the mapped path instead",
                          err, __FILE__, __LINE__);
    case ESRCH:
      return errno_status(StatusCode::kUnavailable, where + ": peer process is gone", err,
                          __FILE__, __LINE__);
    case ENOMEM:
      return errno_status(StatusCode::kResourceExhausted, where, err, __FILE__, __LINE__);
    case EFAULT:
      return errno_status(StatusCode::kInternal,
                          where + ": registered memory is no longer mapped in one of the processes",
                          err, __FILE__, __LINE__);
    default:
      return errno_status(StatusCode::kInternal, where, err, __FILE__, __LINE__);
  }
}

}  // namespace

struct ShmTransport::Impl {
  TransportContext ctx;
  bool started = false;
  bool stopped = false;
  std::atomic<bool> running{false};
  std::atomic<int> posting{0};

  // This engine's control area.
  int control_fd = -1;
  void* control_mem = nullptr;
  size_t control_nbytes = 0;
  ControlRing ring;
  std::thread delivery;
  std::atomic<bool> delivery_stop{false};

  // Copy workers.
  std::vector<std::thread> workers;
  std::mutex q_mu;
  std::condition_variable q_cv;
  std::deque<WorkItem> queue;  // guarded by q_mu
  bool q_stop = false;         // guarded by q_mu

  // Liveness.
  std::thread liveness;
  std::mutex live_mu;
  std::condition_variable live_cv;
  bool live_stop = false;  // guarded by live_mu

  mutable std::mutex peers_mu;
  std::unordered_map<std::string, std::shared_ptr<PeerState>> peers;  // guarded by peers_mu

  std::shared_ptr<PeerState> find_peer(const std::string& id) const {
    std::lock_guard<std::mutex> lock(peers_mu);
    auto it = peers.find(id);
    return it == peers.end() ? nullptr : it->second;
  }

  // ---- data path -------------------------------------------------------------------------
  Status resolve(const PeerRecord& rec, PeerState& ps, const CopyRun* runs, size_t n, Part* part);
  Status run_part(Job& job, Part& part);
  Status copy_cma(Job& job, const std::vector<ResolvedRun>& runs, RunCursor* cur,
                  uint64_t budget, uint64_t* moved);
  void finish_part(const std::shared_ptr<Job>& job, Status st, uint64_t nbytes);
  Status push_notice(Job& job, const Status& overall);
  bool run_next_part(const std::shared_ptr<Job>& job);
  void worker_loop();

  // ---- control ---------------------------------------------------------------------------
  void delivery_loop();
  void liveness_loop();
  void check_peers();
};

// ---- data path ------------------------------------------------------------------------------

Status ShmTransport::Impl::resolve(const PeerRecord& rec, PeerState& ps, const CopyRun* runs,
                                   size_t n, Part* part) {
  const RegionInfo* region = nullptr;
  const RegionMap* rmap = nullptr;
  std::lock_guard<std::mutex> lock(ps.mu);
  for (size_t i = 0; i < n; ++i) {
    const CopyRun& r = runs[i];
    if (region == nullptr || r.remote_addr < region->addr ||
        r.remote_addr + r.nbytes > region->addr + region->nbytes) {
      region = rec.regions.find(r.remote_addr, r.nbytes, Device{});
      if (region == nullptr) {
        return BANASERVE_INVALID("shm: remote range [" + std::to_string(r.remote_addr) + ", +" +
                                 std::to_string(r.nbytes) + ") is not registered by peer " +
                                 ps.engine_id);
      }
      rmap = nullptr;
      if (region->shm_fd >= 0) {
        auto it = ps.regions.find(region->id);
        if (it == ps.regions.end() || it->second.map->fd != region->shm_fd ||
            it->second.shm_offset != region->shm_offset) {
          // A region published after connect(): map it once, here.
          BANASERVE_ASSIGN_OR_RETURN(
              auto m, map_peer_fd(ps.pid, region->shm_fd, region->shm_offset + region->nbytes,
                                  "region " + std::to_string(region->id)));
          it = ps.regions.insert_or_assign(region->id, RegionMap{m, region->shm_offset}).first;
        }
        rmap = &it->second;
      }
    }
    if (rmap != nullptr) {
      part->mapped.push_back(
          {r.local_addr, shm::mapped_address(rmap->map->addr(), *region, r.remote_addr), r.nbytes});
    } else {
      part->cma.push_back({r.local_addr, r.remote_addr, r.nbytes});
    }
  }
  return Status();
}

Status ShmTransport::Impl::copy_cma(Job& job, const std::vector<ResolvedRun>& runs,
                                    RunCursor* cur, uint64_t budget, uint64_t* moved) {
  struct iovec local[kMaxIov];
  struct iovec remote[kMaxIov];
  uint64_t want = 0;
  size_t k = shm::fill_iovecs(runs.data(), runs.size(), *cur, budget, kMaxIov, local, remote,
                              &want);
  *moved = 0;
  if (k == 0) {
    shm::advance_cursor(runs.data(), runs.size(), cur, 0);  // skip trailing empty runs
    return Status();
  }
  const PeerState& ps = *job.peer;
  ssize_t got = job.op == Op::kWrite
                    ? process_vm_writev(ps.pid, local, k, remote, k, 0)
                    : process_vm_readv(ps.pid, local, k, remote, k, 0);
  if (got < 0) return cma_error(errno, job.op, ps.pid, ps.engine_id);
  if (got == 0) return cma_error(EFAULT, job.op, ps.pid, ps.engine_id);
  *moved = shm::advance_cursor(runs.data(), runs.size(), cur, static_cast<uint64_t>(got));
  return Status();
}

Status ShmTransport::Impl::run_part(Job& job, Part& part) {
  Batch& batch = *job.batch;
  RunCursor mcur, ccur;
  const auto& mapped = part.mapped;
  const auto& cma = part.cma;
  for (;;) {
    bool more_mapped = !shm::cursor_done(mapped.data(), mapped.size(), mcur);
    bool more_cma = !shm::cursor_done(cma.data(), cma.size(), ccur);
    if (!more_mapped && !more_cma) return Status();
    if (batch.cancel_requested()) {
      return Status(StatusCode::kCancelled, "shm: cancelled", __FILE__, __LINE__);
    }
    if (!running.load(std::memory_order_acquire)) {
      return unavailable("shm: transport stopped");
    }
    BANASERVE_RETURN_IF_ERROR(job.peer->usable());
    IoSection io(batch.io());
    if (!io.open()) return unavailable("shm: batch was aborted");
    uint64_t budget = kChunkNbytes;
    if (more_mapped) {
      budget -= shm::copy_chunk(mapped.data(), mapped.size(), &mcur, budget, job.op);
    }
    while (budget > 0 && !shm::cursor_done(cma.data(), cma.size(), ccur)) {
      uint64_t moved = 0;
      BANASERVE_RETURN_IF_ERROR(copy_cma(job, cma, &ccur, budget, &moved));
      budget -= moved;
      if (moved == 0) break;
    }
  }
}

Status ShmTransport::Impl::push_notice(Job& job, const Status& overall) {
  PeerState& ps = *job.peer;
  Notice notice{};
  shm::copy_engine_id(notice.source, ctx.self->engine_id);  // length checked at start()
  const NotifyTag& tag = job.batch->tag();
  notice.transfer_id = tag.transfer_id;
  notice.layer = tag.layer;
  notice.num_layers = tag.num_layers;
  notice.status_code = static_cast<uint32_t>(overall.code());
  const uint64_t deadline = now_ns() + uint64_t{kRingFullTimeoutMs} * 1000000;
  for (uint32_t attempt = 0;; ++attempt) {
    if (ps.ring.try_push(notice)) {
      ps.ring.wake_if_sleeping();
      return Status();
    }
    ps.ring.wake();  // make sure the receiver drains
    BANASERVE_RETURN_IF_ERROR(ps.usable());
    if (now_ns() >= deadline) {
      return Status(StatusCode::kResourceExhausted,
                    "shm: notification ring of peer " + ps.engine_id + " stayed full for " +
                        std::to_string(kRingFullTimeoutMs) + " ms",
                    __FILE__, __LINE__);
    }
    if (attempt < 64) {
      cpu_relax();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(attempt < 256 ? 20 : 500));
    }
  }
}

void ShmTransport::Impl::finish_part(const std::shared_ptr<Job>& job, Status st,
                                     uint64_t nbytes) {
  if (!st.ok()) {
    std::lock_guard<std::mutex> lock(job->mu);
    if (job->first_error.ok()) job->first_error = st;
  } else if (nbytes > 0 && ctx.counters != nullptr) {
    auto& c = job->op == Op::kWrite ? ctx.counters->bytes_written : ctx.counters->bytes_read;
    c.fetch_add(nbytes, std::memory_order_relaxed);
  }
  if (job->parts_left.fetch_sub(1, std::memory_order_acq_rel) == 1 && job->notify &&
      job->peer->usable().ok()) {
    Status overall;
    {
      std::lock_guard<std::mutex> lock(job->mu);
      overall = job->first_error;
    }
    // Every part is finished: the receiver learns the batch's outcome (bytes in place, or why
    // not) once, before the sender's handle turns terminal.
    Status pushed = push_notice(*job, overall);
    if (!pushed.ok() && st.ok()) st = pushed;
  }
  job->batch->complete_part(st);
}

bool ShmTransport::Impl::run_next_part(const std::shared_ptr<Job>& job) {
  uint32_t i = job->next_part.fetch_add(1, std::memory_order_acq_rel);
  if (i >= job->parts.size()) return false;
  Part& part = job->parts[i];
  Status st = run_part(*job, part);
  finish_part(job, st, part_nbytes(part));
  return true;
}

void ShmTransport::Impl::worker_loop() {
  for (;;) {
    WorkItem item;
    {
      std::unique_lock<std::mutex> lock(q_mu);
      q_cv.wait(lock, [&] { return q_stop || !queue.empty(); });
      if (q_stop) return;  // stop() completes what is left in the queue
      item = std::move(queue.front());
      queue.pop_front();
    }
    while (run_next_part(item.job)) {
    }
  }
}

// ---- control --------------------------------------------------------------------------------

void ShmTransport::Impl::delivery_loop() {
  Notice notice;
  uint64_t last = now_ns();
  while (!delivery_stop.load(std::memory_order_acquire)) {
    if (ring.try_pop(&notice)) {
      Status st;
      if (notice.status_code > static_cast<uint32_t>(StatusCode::kCudaError)) {
        st = Status(StatusCode::kProtocolError,
                    "shm: bad status code " + std::to_string(notice.status_code) + " from peer",
                    __FILE__, __LINE__);
      } else if (notice.status_code != 0) {
        auto code = static_cast<StatusCode>(notice.status_code);
        st = Status(code,
                    std::string("shm: sender ") + notice.source + " reported " +
                        status_code_name(code) + " for transfer " +
                        std::to_string(notice.transfer_id) + " layer " +
                        std::to_string(notice.layer),
                    __FILE__, __LINE__);
      }
      NotifyTag tag;
      tag.transfer_id = notice.transfer_id;
      tag.layer = notice.layer;
      tag.num_layers = notice.num_layers;
      uint64_t now = now_ns();
      ctx.inbox->deliver(notice.source, tag, st, now + ctx.config->default_timeout_ms * 1000000);
      last = now;
      continue;
    }
    if (now_ns() - last < kDeliverySpinNs) {
      cpu_relax();
      continue;
    }
    uint32_t seen = ring.prepare_sleep();
    if (ring.empty() && !delivery_stop.load(std::memory_order_acquire)) {
      ring.wait(seen, kDeliverySleepMs);
    }
    ring.finish_sleep();
    last = now_ns();
  }
}

void ShmTransport::Impl::check_peers() {
  std::vector<std::shared_ptr<PeerState>> snapshot;
  {
    std::lock_guard<std::mutex> lock(peers_mu);
    snapshot.reserve(peers.size());
    for (auto& kv : peers) snapshot.push_back(kv.second);
  }
  for (auto& ps : snapshot) {
    if (ps->live->gone.load(std::memory_order_acquire) || ps->live->alive()) continue;
    Status why = unavailable("shm: peer " + ps->engine_id + " (pid " + std::to_string(ps->pid) +
                             ") exited");
    if (ps->live->mark_gone(why) && ctx.peer_lost != nullptr) {
      ctx.peer_lost(ctx.engine, ps->engine_id, why);
    }
  }
}

void ShmTransport::Impl::liveness_loop() {
  auto interval = std::chrono::milliseconds(std::max<uint32_t>(1, ctx.config->peer_check_interval_ms));
  std::unique_lock<std::mutex> lock(live_mu);
  while (!live_stop) {
    live_cv.wait_for(lock, interval, [&] { return live_stop; });
    if (live_stop) break;
    lock.unlock();
    check_peers();
    lock.lock();
  }
}

// ---- ShmTransport ---------------------------------------------------------------------------

ShmTransport::ShmTransport() : impl_(std::make_unique<Impl>()) {}

ShmTransport::~ShmTransport() { stop(); }

Capabilities ShmTransport::capabilities() const {
  Capabilities caps;
  caps.host_memory = true;
  caps.device_memory = false;
  caps.same_host = true;
  caps.cross_host = false;
  caps.in_process = false;
  caps.notifications = true;
  caps.cancellation = true;
  caps.priority = 100;  // above tcp for same-host peers
  return caps;
}

Status ShmTransport::start(const TransportContext& ctx) {
  Impl& m = *impl_;
  if (m.started) return BANASERVE_STATUS(StatusCode::kInternal, "shm: start() called twice");
  if (ctx.config == nullptr || ctx.self == nullptr || ctx.inbox == nullptr) {
    return BANASERVE_INVALID("shm: start() needs config, self and inbox");
  }
  if (ctx.self->engine_id.empty() || ctx.self->engine_id.size() >= shm::kEngineIdCapacity) {
    return BANASERVE_INVALID("shm: engine id must be 1.." +
                             std::to_string(shm::kEngineIdCapacity - 1) + " bytes, got '" +
                             ctx.self->engine_id + "'");
  }
  m.ctx = ctx;

  m.control_nbytes = shm::control_area_nbytes(kRingCapacity);
  m.control_fd = static_cast<int>(syscall(SYS_memfd_create, "banaserve-shm-control", MFD_CLOEXEC));
  if (m.control_fd < 0) return BANASERVE_ERRNO(StatusCode::kInternal, "shm: memfd_create");
  if (ftruncate(m.control_fd, static_cast<off_t>(m.control_nbytes)) != 0) {
    Status s = BANASERVE_ERRNO(StatusCode::kInternal, "shm: ftruncate control area");
    close(m.control_fd);
    m.control_fd = -1;
    return s;
  }
  m.control_mem = mmap(nullptr, m.control_nbytes, PROT_READ | PROT_WRITE,
                       MAP_SHARED | MAP_POPULATE, m.control_fd, 0);
  if (m.control_mem == MAP_FAILED) {
    Status s = BANASERVE_ERRNO(StatusCode::kInternal, "shm: mmap control area");
    m.control_mem = nullptr;
    close(m.control_fd);
    m.control_fd = -1;
    return s;
  }
  auto ring = ControlRing::init(m.control_mem, m.control_nbytes, kRingCapacity,
                                static_cast<int32_t>(getpid()), ctx.self->engine_id);
  if (!ring.ok()) {
    munmap(m.control_mem, m.control_nbytes);
    close(m.control_fd);
    m.control_mem = nullptr;
    m.control_fd = -1;
    return ring.status();
  }
  m.ring = ring.value();

  m.started = true;
  m.running.store(true, std::memory_order_seq_cst);
  m.delivery = std::thread([&m] { m.delivery_loop(); });
  int threads = std::max(0, ctx.config->copy_threads);
  for (int i = 0; i < threads; ++i) m.workers.emplace_back([&m] { m.worker_loop(); });
  m.liveness = std::thread([&m] { m.liveness_loop(); });
  return Status();
}

void ShmTransport::stop() {
  Impl& m = *impl_;
  if (!m.started || m.stopped) return;
  m.stopped = true;
  m.running.store(false, std::memory_order_seq_cst);
  // Posts that passed the running check finish (inline copies are small); later ones see it.
  while (m.posting.load(std::memory_order_seq_cst) > 0) std::this_thread::yield();

  {
    std::lock_guard<std::mutex> lock(m.q_mu);
    m.q_stop = true;
  }
  m.q_cv.notify_all();
  for (auto& t : m.workers) t.join();
  m.workers.clear();
  std::deque<WorkItem> left;
  {
    std::lock_guard<std::mutex> lock(m.q_mu);
    left.swap(m.queue);
  }
  for (auto& item : left) {
    const auto& job = item.job;
    while (job->next_part.fetch_add(1, std::memory_order_acq_rel) < job->parts.size()) {
      m.finish_part(job, unavailable("shm: transport stopped"), 0);
    }
  }

  {
    std::lock_guard<std::mutex> lock(m.live_mu);
    m.live_stop = true;
  }
  m.live_cv.notify_all();
  if (m.liveness.joinable()) m.liveness.join();

  m.delivery_stop.store(true, std::memory_order_release);
  m.ring.wake();
  if (m.delivery.joinable()) m.delivery.join();

  {
    std::lock_guard<std::mutex> lock(m.peers_mu);
    for (auto& kv : m.peers) kv.second->disconnected.store(true, std::memory_order_release);
    m.peers.clear();
  }
  if (m.control_mem != nullptr) munmap(m.control_mem, m.control_nbytes);
  m.control_mem = nullptr;
  if (m.control_fd >= 0) close(m.control_fd);
  m.control_fd = -1;
  m.ring = ControlRing();
}

void ShmTransport::fill_metadata(EngineMetadata* md) const {
  md->control_fd = impl_->running.load(std::memory_order_acquire) ? impl_->control_fd : -1;
}

Status ShmTransport::connect(std::shared_ptr<const PeerRecord> peer) {
  Impl& m = *impl_;
  if (!m.running.load(std::memory_order_acquire)) return unavailable("shm: transport not running");
  if (!peer) return BANASERVE_INVALID("shm: connect() needs a peer record");
  const EngineMetadata& md = peer->metadata;
  if (md.pid <= 0) return BANASERVE_INVALID("shm: peer " + md.engine_id + " has no pid");
  if (md.control_fd < 0) {
    return unavailable("shm: peer " + md.engine_id +
                       " publishes no shm control area (shm disabled there)");
  }
  std::shared_ptr<PeerState> old = m.find_peer(md.engine_id);
  bool same_process = old && old->pid == md.pid && !old->live->gone.load();

  auto ps = std::make_shared<PeerState>();
  ps->engine_id = md.engine_id;
  ps->pid = md.pid;
  if (same_process) {
    ps->live = old->live;
  } else {
    BANASERVE_ASSIGN_OR_RETURN(ps->live, watch_process(md.pid));
  }
  if (same_process && old->control->fd == md.control_fd) {
    ps->control = old->control;
    ps->ring = old->ring;
  } else {
    BANASERVE_ASSIGN_OR_RETURN(
        ps->control, map_peer_fd(md.pid, md.control_fd, sizeof(shm::ControlHeader), "control area"));
    BANASERVE_ASSIGN_OR_RETURN(ps->ring, ControlRing::attach(ps->control->base, ps->control->nbytes));
    const shm::ControlHeader* hdr = ps->ring.header();
    if (hdr->owner_pid != md.pid ||
        std::string(hdr->owner_id, strnlen(hdr->owner_id, shm::kEngineIdCapacity)) != md.engine_id) {
      return unavailable("shm: control area at pid " + std::to_string(md.pid) + " fd " +
                         std::to_string(md.control_fd) + " does not belong to engine " +
                         md.engine_id + " (stale metadata?)");
    }
  }
  std::unordered_map<uint64_t, RegionMap> old_maps;
  if (same_process) {
    std::lock_guard<std::mutex> lock(old->mu);
    old_maps = old->regions;
  }
  for (const RegionInfo& r : peer->regions.regions()) {
    if (r.shm_fd < 0 || r.device.kind != MemoryKind::kHost) continue;
    auto it = old_maps.find(r.id);
    if (it != old_maps.end() && it->second.map->fd == r.shm_fd &&
        it->second.shm_offset == r.shm_offset && shm::region_fits_file(r, it->second.map->nbytes)) {
      ps->regions.emplace(r.id, it->second);
      continue;
    }
    BANASERVE_ASSIGN_OR_RETURN(auto map, map_peer_fd(md.pid, r.shm_fd, 0,
                                                     "region " + std::to_string(r.id)));
    if (!shm::region_fits_file(r, map->nbytes)) {
      return unavailable("shm: region " + std::to_string(r.id) + " of peer " + md.engine_id +
                         " does not fit its memfd (stale metadata?)");
    }
    ps->regions.emplace(r.id, RegionMap{map, r.shm_offset});
  }
  {
    std::lock_guard<std::mutex> lock(m.peers_mu);
    m.peers[md.engine_id] = ps;
  }
  if (old && !same_process) old->disconnected.store(true, std::memory_order_release);
  return Status();
}

void ShmTransport::disconnect(const std::string& engine_id) {
  Impl& m = *impl_;
  std::shared_ptr<PeerState> ps;
  {
    std::lock_guard<std::mutex> lock(m.peers_mu);
    auto it = m.peers.find(engine_id);
    if (it == m.peers.end()) return;
    ps = std::move(it->second);
    m.peers.erase(it);
  }
  // In-flight parts stop at their next chunk; the mappings go with the last reference.
  ps->disconnected.store(true, std::memory_order_release);
}

void ShmTransport::post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
                        std::vector<CopyRun> runs) {
  Impl& m = *impl_;
  m.posting.fetch_add(1, std::memory_order_seq_cst);
  struct Leave {
    std::atomic<int>& n;
    ~Leave() { n.fetch_sub(1, std::memory_order_seq_cst); }
  } leave{m.posting};

  if (!m.running.load(std::memory_order_seq_cst)) {
    batch->complete_part(unavailable("shm: transport not running"));
    return;
  }
  std::shared_ptr<PeerState> ps = m.find_peer(peer.metadata.engine_id);
  if (!ps) {
    batch->complete_part(unavailable("shm: peer " + peer.metadata.engine_id + " is not connected"));
    return;
  }
  if (Status s = ps->usable(); !s.ok()) {
    batch->complete_part(s);
    return;
  }
  auto job = std::make_shared<Job>();
  job->batch = batch;
  job->peer = ps;
  job->op = batch->op();
  job->notify = batch->op() == Op::kWrite && batch->tag().transfer_id != 0;
  batch->mark_running();

  const uint64_t total = total_nbytes(runs.data(), runs.size());
  if (total < kParallelThreshold || m.workers.empty()) {
    // Small batch: copy inline on the caller's thread (no wake-up on the latency path).
    Part part;
    Status st = m.resolve(peer, *ps, runs.data(), runs.size(), &part);
    if (st.ok()) st = m.run_part(*job, part);
    m.finish_part(job, st, total);
    return;
  }

  // Tagged batches (layer-wise streams) stay asynchronous so the next layer's compute overlaps
  // the copy. Untagged ones are typically waited for at once: the posting thread helps copy,
  // which also keeps throughput up when the workers are slow to be scheduled (busy box).
  // Parts are small (about kPartNbytes) and claimed one at a time, so a thread that gets
  // preempted holds back little of the batch while the others take the rest.
  const bool helping = !job->notify;
  const size_t threads = m.workers.size() + (helping ? 1 : 0);
  const size_t max_parts =
      std::clamp<size_t>(static_cast<size_t>(total / kPartNbytes), threads, kMaxParts);
  auto bounds = split_runs(&runs, max_parts, kMinPartNbytes);
  job->parts.resize(bounds.size());
  for (size_t i = 0; i < bounds.size(); ++i) {
    Status st = m.resolve(peer, *ps, runs.data() + bounds[i].first,
                          bounds[i].second - bounds[i].first, &job->parts[i]);
    if (!st.ok()) {
      job->parts.clear();
      m.finish_part(job, st, 0);  // nothing has moved; the batch has one part
      return;
    }
  }
  const auto nparts = static_cast<uint32_t>(job->parts.size());
  job->parts_left.store(nparts, std::memory_order_release);
  if (nparts != 1) batch->set_parts(nparts);
  const auto tokens = static_cast<uint32_t>(
      std::min<size_t>(m.workers.size(), helping ? nparts - 1 : nparts));
  if (tokens > 0) {
    {
      std::lock_guard<std::mutex> lock(m.q_mu);
      for (uint32_t i = 0; i < tokens; ++i) m.queue.push_back(WorkItem{job});
    }
    if (tokens == 1) {
      m.q_cv.notify_one();
    } else {
      m.q_cv.notify_all();
    }
  }
  if (helping) {
    while (m.run_next_part(job)) {
    }
  }
}

std::unique_ptr<Transport> make_shm_transport() { return std::make_unique<ShmTransport>(); }

}  // namespace banaserve::transfer
