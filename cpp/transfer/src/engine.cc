// SPDX-License-Identifier: Apache-2.0
#include "banaserve/transfer/engine.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>

#include "../backends/fake/fault_transport.h"

namespace banaserve::transfer {
namespace {

constexpr uint64_t kWatchdogPeriodMs = 5;

std::string random_engine_id() {
  std::random_device rd;
  std::mt19937_64 gen((static_cast<uint64_t>(rd()) << 32) ^ rd() ^ now_ns());
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%08x-%016llx", static_cast<unsigned>(getpid()),
                static_cast<unsigned long long>(gen()));
  return buf;
}

// Two engines can share memory directly iff they run under one kernel and in one pid namespace
// (the shm backend opens /proc/<pid>/fd/<fd> of its peer).
std::string current_host_id() {
  std::string boot;
  std::ifstream f("/proc/sys/kernel/random/boot_id");
  std::getline(f, boot);
  char ns[128] = {0};
  ssize_t n = readlink("/proc/self/ns/pid", ns, sizeof(ns) - 1);
  if (n > 0) ns[n] = 0;
  return boot + "/" + ns;
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

// Pre-faults [addr, addr + nbytes) with several threads: first touch costs ~1-2 us per 4 KiB page
// (about 0.3-0.5 s per GiB on one core), and it must happen at registration, not in a transfer.
void prefault(void* addr, uint64_t nbytes, int threads) {
  const uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  const uint64_t pages = (nbytes + page - 1) / page;
  const uint64_t n = std::max<uint64_t>(1, std::min<uint64_t>(threads, pages / 4096 + 1));
  auto work = [&](uint64_t first, uint64_t last) {
    char* p = static_cast<char*>(addr) + first * page;
    const uint64_t len = std::min(nbytes, last * page) - first * page;
    if (madvise(p, len, MADV_POPULATE_WRITE) == 0) return;
    for (uint64_t off = 0; off < len; off += page) {
      reinterpret_cast<volatile char*>(p)[off] = 0;  // older kernels: touch each page
    }
  };
  std::vector<std::thread> pool;
  const uint64_t per = (pages + n - 1) / n;
  for (uint64_t i = 1; i < n; ++i) {
    pool.emplace_back(work, i * per, std::min(pages, (i + 1) * per));
  }
  work(0, std::min(pages, per));
  for (auto& t : pool) t.join();
}

// Table generations are unique across all engines of the process (never reused, unlike
// addresses), so a prepared list can tell whether the table that validated it changed.
std::atomic<uint64_t> g_generation{1};
uint64_t next_generation() { return g_generation.fetch_add(1, std::memory_order_relaxed); }
std::shared_ptr<RegionTable> stamped(std::shared_ptr<RegionTable> table) {
  table->set_generation(next_generation());
  return table;
}

std::shared_ptr<const RegionTable> regions_trampoline(void* engine) {
  return static_cast<Engine*>(engine)->local_regions();
}

}  // namespace

Engine::Engine(EngineConfig config)
    : config_(std::move(config)), regions_(stamped(std::make_shared<RegionTable>())) {}

Engine::~Engine() { stop(); }

void Engine::set_fault(const FaultSpec& spec) { fault_ = spec; }

Status Engine::start() {
  if (started_) return BANASERVE_STATUS(StatusCode::kInternal, "engine already started");
  if (config_.tcp_lanes < 1 || config_.tcp_lanes > 64) {
    return BANASERVE_INVALID("tcp_lanes must be in [1, 64], got " + std::to_string(config_.tcp_lanes));
  }
  if (config_.copy_threads < 1 || config_.copy_threads > 64) {
    return BANASERVE_INVALID("copy_threads must be in [1, 64], got " +
                             std::to_string(config_.copy_threads));
  }
  self_.engine_id = config_.engine_id.empty() ? random_engine_id() : config_.engine_id;
  self_.host_id = current_host_id();
  self_.pid = static_cast<int32_t>(getpid());

  for (const auto& name : config_.backends) {
    if (!is_known_backend(name)) {
      return BANASERVE_INVALID("unknown transfer backend '" + name + "'");
    }
  }
  // local first, then the chosen ones this build has, in the order of backend_names.h
  std::vector<std::string> wanted{backend::kLocal};
  for (const auto& name : available_transports()) {
    if (name != backend::kLocal &&
        std::find(config_.backends.begin(), config_.backends.end(), name) != config_.backends.end()) {
      wanted.push_back(name);
    }
  }
  if (!config_.force_backend.empty() &&
      std::find(wanted.begin(), wanted.end(), config_.force_backend) == wanted.end()) {
    return BANASERVE_INVALID("forced backend '" + config_.force_backend +
                             "' is not available or not enabled in this engine");
  }
  TransportContext ctx;
  ctx.config = &config_;
  ctx.self = &self_;
  ctx.local_regions = &regions_trampoline;
  ctx.engine = this;
  ctx.inbox = &inbox_;
  ctx.counters = &counters_;
  ctx.peer_lost = [](void* engine, const std::string& id, const Status& why) {
    static_cast<Engine*>(engine)->on_peer_lost(id, why);
  };
  for (const auto& name : wanted) {
    BANASERVE_ASSIGN_OR_RETURN(std::unique_ptr<Transport> t, create_transport(name));
    Status st = t->start(ctx);
    if (!st.ok()) {
      for (auto& started : transports_) started->stop();
      transports_.clear();
      return st.with_context(std::string("starting the ") + name + " backend");
    }
    t->fill_metadata(&self_);
    transports_.push_back(std::move(t));
  }
  if (fault_.fail_after_posts || fault_.delay_ms || fault_.drop) {
    const size_t n = transports_.size();
    for (size_t i = 0; i < n; ++i) {
      auto wrapped = make_fault_transport(transports_[i].get(), fault_);
      (void)wrapped->start(ctx);
      transports_.push_back(std::move(wrapped));  // decorators after their inner backends
    }
  }
  stopping_ = false;
  watchdog_ = std::thread([this] { watchdog_loop(); });
  started_ = true;
  return Status();
}

void Engine::stop() {
  if (!started_) return;
  {
    std::lock_guard<std::mutex> lock(live_mu_);
    stopping_ = true;
  }
  watchdog_cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  const Status why = BANASERVE_STATUS(StatusCode::kUnavailable, "transfer engine stopped");
  std::vector<std::shared_ptr<Batch>> live;
  {
    std::lock_guard<std::mutex> lock(live_mu_);
    for (auto& w : live_) {
      if (auto b = w.lock()) live.push_back(std::move(b));
    }
    live_.clear();
  }
  for (auto& b : live) b->abort(why);
  inbox_.fail_all(why);
  // Decorators first (they sit at the back), then the real backends.
  for (auto it = transports_.rbegin(); it != transports_.rend(); ++it) (*it)->stop();
  {
    std::lock_guard<std::mutex> lock(mu_);
    peers_.clear();
    for (auto& [id, a] : allocations_) {
      munmap(a.addr, a.nbytes);
      close(a.fd);
    }
    allocations_.clear();
    regions_ = stamped(std::make_shared<RegionTable>());
  }
  transports_.clear();
  started_ = false;
}

EngineMetadata Engine::metadata() const {
  std::lock_guard<std::mutex> lock(mu_);
  EngineMetadata md = self_;
  md.regions = regions_->regions();
  return md;
}

std::shared_ptr<const RegionTable> Engine::local_regions() const {
  std::lock_guard<std::mutex> lock(mu_);
  return regions_;
}

StatusOr<RegionInfo> Engine::register_memory(uint64_t addr, uint64_t nbytes, Device device) {
  if (device.kind != MemoryKind::kHost) {
    bool device_capable = false;
    for (const auto& t : transports_) device_capable = device_capable || t->capabilities().device_memory;
    if (!device_capable) {
      return BANASERVE_STATUS(StatusCode::kNotImplemented,
                              "device memory registration needs the CUDA backend, which is not "
                              "part of this build (or not enabled in this engine)");
    }
  }
  RegionInfo info;
  info.addr = addr;
  info.nbytes = nbytes;
  info.device = device;
  return insert_region(std::move(info), nullptr);
}

// Lets every backend add its handles (rkey, IPC handle), then publishes the region. On failure
// every backend that saw the region forgets it again.
StatusOr<RegionInfo> Engine::insert_region(RegionInfo info, const Allocation* allocation) {
  {
    // Reject overlaps before any backend pins or maps the memory.
    std::lock_guard<std::mutex> lock(mu_);
    RegionTable probe(*regions_);
    RegionInfo check = info;
    check.id = UINT64_MAX;
    BANASERVE_RETURN_IF_ERROR(probe.insert(check));
  }
  size_t seen = 0;
  Status st;
  for (; seen < transports_.size() && st.ok(); ++seen) {
    st = transports_[seen]->on_register(&info).with_context(std::string(transports_[seen]->name()) +
                                                             " registration");
  }
  if (st.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    info.id = next_region_id_;
    auto table = std::make_shared<RegionTable>(*regions_);  // copy-on-write: readers keep theirs
    st = table->insert(info);
    if (st.ok()) {
      ++next_region_id_;
      regions_ = stamped(std::move(table));
      if (allocation != nullptr) allocations_[info.id] = *allocation;
      return info;
    }
  }
  for (size_t i = 0; i < seen; ++i) transports_[i]->on_unregister(info);
  return st;
}

StatusOr<RegionInfo> Engine::allocate(uint64_t nbytes) {
  if (nbytes == 0) return BANASERVE_INVALID("cannot allocate 0 bytes");
  int fd = memfd_create("banaserve-region", MFD_CLOEXEC);
  if (fd < 0) return BANASERVE_ERRNO(StatusCode::kResourceExhausted, "memfd_create");
  if (ftruncate(fd, static_cast<off_t>(nbytes)) != 0) {
    Status st = BANASERVE_ERRNO(StatusCode::kResourceExhausted, "ftruncate of the memfd");
    close(fd);
    return st;
  }
  void* addr = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (addr == MAP_FAILED) {
    Status st = BANASERVE_ERRNO(StatusCode::kResourceExhausted, "mmap of the memfd");
    close(fd);
    return st;
  }
  prefault(addr, nbytes, config_.copy_threads);
  RegionInfo info;
  info.addr = reinterpret_cast<uint64_t>(addr);
  info.nbytes = nbytes;
  info.shm_fd = fd;
  info.shm_offset = 0;
  const Allocation allocation{fd, addr, nbytes};
  StatusOr<RegionInfo> r = insert_region(std::move(info), &allocation);
  if (!r.ok()) {
    munmap(addr, nbytes);
    close(fd);
  }
  return r;
}

Status Engine::unregister_memory(uint64_t region_id) {
  RegionInfo gone;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const RegionInfo* found = regions_->find_id(region_id);
    if (found != nullptr) gone = *found;
    auto table = std::make_shared<RegionTable>(*regions_);
    BANASERVE_RETURN_IF_ERROR(table->erase(region_id));
    regions_ = stamped(std::move(table));
  }
  for (auto& t : transports_) t->on_unregister(gone);  // before the memory may go away
  std::lock_guard<std::mutex> lock(mu_);
  auto it = allocations_.find(region_id);
  if (it != allocations_.end()) {
    munmap(it->second.addr, it->second.nbytes);
    close(it->second.fd);
    allocations_.erase(it);
  }
  return Status();
}

bool Engine::needs_device_memory(const PeerRecord& peer) const {
  for (const RegionInfo& r : peer.regions.regions()) {
    if (r.device.kind != MemoryKind::kHost) return true;
  }
  return false;
}

// Capability-driven: reachability (in process / same host / cross host), the memory the peer
// publishes (device memory needs a device-capable backend, never a silent host fallback), and
// whether the peer published what the backend needs (can_serve); then the highest priority.
StatusOr<Transport*> Engine::choose_transport(const PeerRecord& peer) {
  const bool self = peer.metadata.engine_id == self_.engine_id;
  const bool device = needs_device_memory(peer);
  Transport* best = nullptr;
  int best_priority = -1;
  // With fault injection on, start() appended one decorator per real backend.
  const bool faulty = fault_.fail_after_posts || fault_.delay_ms || fault_.drop;
  const size_t real = faulty ? transports_.size() / 2 : transports_.size();
  for (size_t i = 0; i < real; ++i) {
    Transport* t = transports_[i].get();
    const Capabilities caps = t->capabilities();
    if (!config_.force_backend.empty() && config_.force_backend != t->name()) continue;
    bool reachable = self ? (caps.in_process || caps.same_host)
                          : (peer.same_host ? caps.same_host || caps.cross_host : caps.cross_host);
    if (caps.in_process && !self) reachable = false;
    if (!reachable) continue;
    if (device ? !caps.device_memory : !caps.host_memory) continue;
    if (!t->can_serve(peer)) continue;
    if (caps.priority > best_priority) {
      best = t;
      best_priority = caps.priority;
    }
  }
  if (best == nullptr) {
    return BANASERVE_STATUS(
        StatusCode::kUnavailable,
        "no enabled backend can reach peer " + peer.metadata.engine_id +
            (peer.same_host ? " (same host)" : " (another host)") +
            (device ? " with device memory" : "") +
            (config_.force_backend.empty() ? "" : "; forced backend: " + config_.force_backend));
  }
  // With fault injection on, the decorator of the chosen backend stands in for it.
  for (size_t i = real; i < transports_.size(); ++i) {
    if (std::strcmp(transports_[i]->name(), best->name()) == 0) return transports_[i].get();
  }
  return best;
}

StatusOr<std::string> Engine::add_peer(const EngineMetadata& md) {
  if (!started_) return BANASERVE_STATUS(StatusCode::kUnavailable, "engine not started");
  if (md.engine_id.empty()) return BANASERVE_INVALID("peer metadata has an empty engine_id");
  auto record = std::make_shared<PeerRecord>();
  record->metadata = md;
  record->same_host = md.host_id == self_.host_id;
  record->regions.set_generation(next_generation());
  for (const RegionInfo& r : md.regions) {
    Status st = record->regions.insert(r);
    if (!st.ok()) return st.with_context("peer " + md.engine_id + " published bad regions");
  }
  BANASERVE_ASSIGN_OR_RETURN(Transport* t, choose_transport(*record));
  BANASERVE_RETURN_IF_ERROR(t->connect(record).with_context(std::string(t->name()) + " connect"));
  std::lock_guard<std::mutex> lock(mu_);
  peers_[md.engine_id] = Peer{std::move(record), t};
  return std::string(t->name());
}

Status Engine::remove_peer(const std::string& engine_id) {
  Transport* t = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(engine_id);
    if (it == peers_.end()) {
      return BANASERVE_STATUS(StatusCode::kNotFound, "unknown peer " + engine_id);
    }
    t = it->second.transport;
    peers_.erase(it);
  }
  t->disconnect(engine_id);
  on_peer_lost(engine_id, BANASERVE_STATUS(StatusCode::kUnavailable, "peer removed"));
  return Status();
}

StatusOr<std::string> Engine::peer_backend(const std::string& engine_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = peers_.find(engine_id);
  if (it == peers_.end()) return BANASERVE_STATUS(StatusCode::kNotFound, "unknown peer " + engine_id);
  return std::string(it->second.transport->name());
}

StatusOr<std::string> Engine::peer_route(const std::string& engine_id) const {
  Transport* t = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(engine_id);
    if (it == peers_.end()) return BANASERVE_STATUS(StatusCode::kNotFound, "unknown peer " + engine_id);
    t = it->second.transport;
  }
  // Decorators do not forward describe_peer: ask the real backend of that name.
  for (const auto& real : transports_) {
    if (std::strcmp(real->name(), t->name()) == 0) return real->describe_peer(engine_id);
  }
  return std::string();
}

std::vector<std::string> Engine::peers() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> ids;
  for (const auto& [id, p] : peers_) ids.push_back(id);
  return ids;
}

namespace {
uint64_t generation_of(const RegionTable* table) { return table->generation(); }
}  // namespace

StatusOr<Engine::ValidationTable> Engine::validation_table(const std::string& peer_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  ValidationTable t;
  if (peer_id.empty() || peer_id == self_.engine_id) {
    t.local = regions_;
    t.table = regions_.get();
    t.generation = generation_of(regions_.get());
    return t;
  }
  auto it = peers_.find(peer_id);
  if (it == peers_.end()) return BANASERVE_STATUS(StatusCode::kNotFound, "unknown peer " + peer_id);
  t.peer = it->second.record;
  t.table = &t.peer->regions;
  t.owner = peer_id;
  t.generation = generation_of(&t.peer->regions);
  return t;
}

StatusOr<std::shared_ptr<const PreparedList>> Engine::prepare_descs(const std::string& peer_id,
                                                                    const uint64_t* addrs,
                                                                    const uint64_t* nbytes,
                                                                    size_t n, Device device) {
  BANASERVE_ASSIGN_OR_RETURN(ValidationTable t, validation_table(peer_id));
  BANASERVE_ASSIGN_OR_RETURN(PreparedList list,
                             transfer::prepare_descs(*t.table, addrs, nbytes, n, device));
  list.owner = t.owner;
  list.generation = t.generation;
  return std::shared_ptr<const PreparedList>(std::make_shared<PreparedList>(std::move(list)));
}

StatusOr<std::shared_ptr<const PreparedList>> Engine::prepare_layout(const std::string& peer_id,
                                                                     const uint64_t* bases,
                                                                     size_t num_buffers,
                                                                     uint64_t item_nbytes,
                                                                     uint64_t num_items,
                                                                     Device device) {
  BANASERVE_ASSIGN_OR_RETURN(ValidationTable t, validation_table(peer_id));
  BANASERVE_ASSIGN_OR_RETURN(
      PreparedList list,
      transfer::prepare_layout(*t.table, bases, num_buffers, item_nbytes, num_items, device));
  list.owner = t.owner;
  list.generation = t.generation;
  return std::shared_ptr<const PreparedList>(std::make_shared<PreparedList>(std::move(list)));
}

uint64_t Engine::deadline_from(int64_t timeout_ms) const {
  const uint64_t ms = timeout_ms < 0 ? config_.default_timeout_ms : static_cast<uint64_t>(timeout_ms);
  return now_ns() + ms * 1000000ull;
}

StatusOr<std::shared_ptr<Batch>> Engine::submit(const SubmitArgs& a) {
  if (!started_) return BANASERVE_STATUS(StatusCode::kUnavailable, "engine not started");
  if (a.local == nullptr || a.remote == nullptr) return BANASERVE_INVALID("missing prepared list");
  const bool to_self = a.peer_id.empty() || a.peer_id == self_.engine_id;
  std::shared_ptr<const PeerRecord> record;
  std::shared_ptr<const RegionTable> local_table;
  Transport* transport = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    local_table = regions_;
    if (!to_self) {
      auto it = peers_.find(a.peer_id);
      if (it == peers_.end()) {
        return BANASERVE_STATUS(StatusCode::kNotFound, "unknown peer " + a.peer_id);
      }
      record = it->second.record;
      transport = it->second.transport;
    }
  }
  if (to_self) {
    // Transfers inside this engine go through the local backend without add_peer.
    auto self_record = std::make_shared<PeerRecord>();
    self_record->metadata.engine_id = self_.engine_id;
    self_record->regions = *local_table;
    self_record->same_host = true;
    record = std::move(self_record);
    transport = transports_.front().get();  // local is always first
    if (a.local->device.kind != MemoryKind::kHost || a.remote->device.kind != MemoryKind::kHost) {
      // GPU memory inside this process (D2D, H2D, D2H): the device-capable backend.
      transport = nullptr;
      for (const auto& t : transports_) {
        if (t->capabilities().device_memory) transport = t.get();  // decorators sit last
      }
      if (transport == nullptr) {
        return BANASERVE_STATUS(StatusCode::kNotImplemented,
                                "device memory transfers need the cuda backend");
      }
    } else {
      for (size_t i = 1; i < transports_.size(); ++i) {
        if (std::strcmp(transports_[i]->name(), backend::kLocal) == 0) {
          transport = transports_[i].get();
        }
      }
    }
  }
  if (!a.local->owner.empty()) {
    return BANASERVE_INVALID("the local list was prepared for peer " + a.local->owner +
                             "; prepare it without a peer");
  }
  const std::string remote_owner = to_self ? "" : a.peer_id;
  if (a.remote->owner != remote_owner) {
    return BANASERVE_INVALID("the remote list was prepared for " +
                             (a.remote->owner.empty() ? std::string("this engine")
                                                      : "peer " + a.remote->owner) +
                             ", not for " + (to_self ? std::string("this engine") : "peer " + a.peer_id));
  }
  std::vector<CopyRun> runs;
  BANASERVE_RETURN_IF_ERROR(build_runs(*a.local, a.local_idx, *a.remote, a.remote_idx, a.n,
                                       a.buf_begin, a.buf_end, &runs));
  // Registrations changed since prepare: validate the runs themselves (slow path, rare).
  const bool local_stale = a.local->generation != generation_of(local_table.get());
  const bool remote_stale =
      a.remote->generation != (to_self ? generation_of(local_table.get()) : generation_of(&record->regions));
  if (local_stale || remote_stale) {
    const RegionTable& rt = record->regions;
    for (const CopyRun& r : runs) {
      if (local_stale) BANASERVE_RETURN_IF_ERROR(check_range(*local_table, r.local_addr, r.nbytes, a.local->device, "local"));
      if (remote_stale) BANASERVE_RETURN_IF_ERROR(check_range(rt, r.remote_addr, r.nbytes, a.remote->device, "remote"));
    }
  }
  const uint64_t nbytes = total_nbytes(runs.data(), runs.size());
  auto batch = std::make_shared<Batch>(next_batch_id_.fetch_add(1), a.op,
                                       to_self ? self_.engine_id : a.peer_id, nbytes,
                                       deadline_from(a.timeout_ms), a.tag);
  submitted_.fetch_add(1, std::memory_order_relaxed);
  track(batch);
  batch->mark_running();
  transport->post(*record, batch, std::move(runs));
  return batch;
}

void Engine::track(const std::shared_ptr<Batch>& batch) {
  std::lock_guard<std::mutex> lock(live_mu_);
  live_.push_back(batch);
}

void Engine::on_peer_lost(const std::string& engine_id, const Status& why) {
  counters_.peers_lost.fetch_add(1, std::memory_order_relaxed);
  std::vector<std::shared_ptr<Batch>> victims;
  {
    std::lock_guard<std::mutex> lock(live_mu_);
    for (auto& w : live_) {
      auto b = w.lock();
      if (b && b->peer_id() == engine_id && !is_terminal(b->state())) victims.push_back(std::move(b));
    }
  }
  const Status st = why.with_context("peer " + engine_id);
  for (auto& b : victims) b->abort(st);
  inbox_.fail_peer(engine_id, st);
}

void Engine::watchdog_loop() {
  std::unique_lock<std::mutex> lock(live_mu_);
  while (!stopping_) {
    watchdog_cv_.wait_for(lock, std::chrono::milliseconds(kWatchdogPeriodMs));
    if (stopping_) break;
    const uint64_t now = now_ns();
    std::vector<std::shared_ptr<Batch>> expired;
    size_t keep = 0;
    for (size_t i = 0; i < live_.size(); ++i) {
      auto b = live_[i].lock();
      if (!b) continue;  // nobody holds it any more; its backend finished with it
      const TransferState s = b->state();
      if (is_terminal(s)) {
        if (s == TransferState::kDone) done_.fetch_add(1, std::memory_order_relaxed);
        else if (s == TransferState::kCancelled) cancelled_.fetch_add(1, std::memory_order_relaxed);
        else failed_.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      if (now >= b->deadline_ns()) expired.push_back(b);
      live_[keep++] = live_[i];
    }
    live_.resize(keep);
    lock.unlock();
    for (auto& b : expired) {
      b->abort(BANASERVE_STATUS(StatusCode::kTimeout,
                                "batch " + std::to_string(b->id()) + " to peer " + b->peer_id() +
                                    " missed its deadline"));
    }
    inbox_.expire(now);
    lock.lock();
  }
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.batches_submitted = submitted_.load(std::memory_order_relaxed);
  s.batches_done = done_.load(std::memory_order_relaxed);
  s.batches_failed = failed_.load(std::memory_order_relaxed);
  s.batches_cancelled = cancelled_.load(std::memory_order_relaxed);
  s.bytes_written = counters_.bytes_written.load(std::memory_order_relaxed);
  s.bytes_read = counters_.bytes_read.load(std::memory_order_relaxed);
  s.bytes_served = counters_.bytes_served.load(std::memory_order_relaxed);
  s.frames_rejected = counters_.frames_rejected.load(std::memory_order_relaxed);
  s.connections_dropped = counters_.connections_dropped.load(std::memory_order_relaxed);
  s.peers_lost = counters_.peers_lost.load(std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& r : regions_->regions()) s.registered_nbytes += r.nbytes;
  s.regions = regions_->size();
  s.peers = peers_.size();
  s.inbox_streams = inbox_.size();
  return s;
}

std::shared_ptr<RecvStream> Engine::expect(uint64_t transfer_id, uint32_t num_layers,
                                           const std::string& from_engine, int64_t timeout_ms) {
  return inbox_.expect(transfer_id, num_layers, from_engine, deadline_from(timeout_ms));
}

StatusOr<std::shared_ptr<SendStream>> Engine::open_stream(
    const std::string& peer_id, uint64_t transfer_id, uint32_t num_layers,
    std::shared_ptr<const PreparedList> local, std::vector<int64_t> local_idx,
    std::shared_ptr<const PreparedList> remote, std::vector<int64_t> remote_idx,
    uint32_t buffers_per_layer, int64_t timeout_ms) {
  if (transfer_id == 0) return BANASERVE_INVALID("transfer_id 0 is reserved for untagged batches");
  if (num_layers == 0) return BANASERVE_INVALID("a stream needs at least one layer");
  if (buffers_per_layer == 0) return BANASERVE_INVALID("buffers_per_layer must be > 0");
  if (!local || !remote) return BANASERVE_INVALID("missing prepared list");
  if (local->kind != PreparedList::Kind::kLayout || remote->kind != PreparedList::Kind::kLayout) {
    return BANASERVE_INVALID("layer-wise streams need layouts (prepare_layout) on both sides");
  }
  if (local_idx.size() != remote_idx.size()) {
    return BANASERVE_INVALID("local and remote index arrays differ in length");
  }
  const uint64_t needed = static_cast<uint64_t>(num_layers) * buffers_per_layer;
  if (local->num_buffers() != needed || remote->num_buffers() != needed) {
    return BANASERVE_INVALID("layouts have " + std::to_string(local->num_buffers()) + " / " +
                             std::to_string(remote->num_buffers()) + " buffers; " +
                             std::to_string(num_layers) + " layers x " +
                             std::to_string(buffers_per_layer) + " buffers per layer needs " +
                             std::to_string(needed));
  }
  // Validate the indices once here so mark_layer_ready cannot fail on them later.
  std::vector<CopyRun> probe;
  BANASERVE_RETURN_IF_ERROR(build_runs(*local, local_idx.data(), *remote, remote_idx.data(),
                                       local_idx.size(), 0, 0, &probe));
  return std::make_shared<SendStream>(this, peer_id, transfer_id, num_layers, std::move(local),
                                      std::move(local_idx), std::move(remote),
                                      std::move(remote_idx), buffers_per_layer, timeout_ms);
}

SendStream::SendStream(Engine* engine, std::string peer_id, uint64_t transfer_id,
                       uint32_t num_layers, std::shared_ptr<const PreparedList> local,
                       std::vector<int64_t> local_idx, std::shared_ptr<const PreparedList> remote,
                       std::vector<int64_t> remote_idx, uint32_t buffers_per_layer,
                       int64_t timeout_ms)
    : engine_(engine), peer_id_(std::move(peer_id)), transfer_id_(transfer_id),
      num_layers_(num_layers), local_(std::move(local)), remote_(std::move(remote)),
      local_idx_(std::move(local_idx)), remote_idx_(std::move(remote_idx)),
      buffers_per_layer_(buffers_per_layer), timeout_ms_(timeout_ms), batches_(num_layers),
      claimed_(num_layers, false) {}

SendStream::~SendStream() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    fence_stop_ = true;
  }
  fence_cv_.notify_all();
  if (fence_thread_.joinable()) fence_thread_.join();
}

Status SendStream::mark_layer_ready(uint32_t layer) {
  if (layer >= num_layers_) {
    return BANASERVE_STATUS(StatusCode::kOutOfRange, "layer " + std::to_string(layer) + " of a " +
                                                         std::to_string(num_layers_) + "-layer stream");
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (claimed_[layer]) {
      return BANASERVE_STATUS(StatusCode::kAlreadyExists,
                              "layer " + std::to_string(layer) + " already marked ready");
    }
    claimed_[layer] = true;
  }
  return post_layer(layer);
}

Status SendStream::mark_layer_ready_after(uint32_t layer, std::shared_ptr<ReadyFence> fence) {
  if (layer >= num_layers_) {
    return BANASERVE_STATUS(StatusCode::kOutOfRange, "layer " + std::to_string(layer) + " of a " +
                                                         std::to_string(num_layers_) + "-layer stream");
  }
  if (!fence) return BANASERVE_INVALID("missing fence");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (claimed_[layer]) {
      return BANASERVE_STATUS(StatusCode::kAlreadyExists,
                              "layer " + std::to_string(layer) + " already marked ready");
    }
    claimed_[layer] = true;
    fenced_.emplace_back(layer, std::move(fence));
    if (!fence_thread_.joinable()) fence_thread_ = std::thread([this] { fence_loop(); });
  }
  fence_cv_.notify_all();
  return Status();
}

void SendStream::fence_loop() {
  const uint64_t deadline = engine_->deadline_from(timeout_ms_);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    fence_cv_.wait(lock, [&] { return fence_stop_ || !fenced_.empty(); });
    if (fence_stop_) return;
    auto [layer, fence] = fenced_.front();
    fenced_.pop_front();
    lock.unlock();
    Status failed;
    for (uint32_t polls = 0;; ++polls) {
      StatusOr<bool> ready = fence->query();
      if (!ready.ok()) {
        failed = ready.status().with_context("fence of layer " + std::to_string(layer));
        break;
      }
      if (ready.value()) break;
      if (now_ns() >= deadline) {
        failed = BANASERVE_STATUS(StatusCode::kTimeout, "the fence of layer " + std::to_string(layer) +
                                                            " was not ready before the deadline");
        break;
      }
      {
        std::lock_guard<std::mutex> stop_lock(mu_);
        if (fence_stop_) return;
      }
      // Spin briefly (a GPU layer takes ~100 us-ms), then back off to 50 us polls.
      if (polls > 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (failed.ok()) {
      (void)post_layer(layer);  // a submit error lands in post_error_
    } else {
      std::lock_guard<std::mutex> err_lock(mu_);
      if (post_error_.ok()) post_error_ = failed;
    }
    lock.lock();
  }
}

Status SendStream::post_layer(uint32_t layer) {
  Engine::SubmitArgs args;
  args.op = Op::kWrite;
  args.peer_id = peer_id_;
  args.local = local_.get();
  args.local_idx = local_idx_.data();
  args.remote = remote_.get();
  args.remote_idx = remote_idx_.data();
  args.n = local_idx_.size();
  args.buf_begin = layer * buffers_per_layer_;
  args.buf_end = (layer + 1) * buffers_per_layer_;
  args.tag = NotifyTag{transfer_id_, layer, num_layers_};
  args.timeout_ms = timeout_ms_;
  auto batch = engine_->submit(args);
  std::lock_guard<std::mutex> lock(mu_);
  if (!batch.ok()) {
    if (post_error_.ok()) post_error_ = batch.status();
    return batch.status();
  }
  batches_[layer] = std::move(batch).value();
  return Status();
}

Status SendStream::wait(int64_t timeout_ms) {
  const uint64_t deadline = timeout_ms < 0 ? 0 : now_ns() + static_cast<uint64_t>(timeout_ms) * 1000000ull;
  for (uint32_t i = 0; i < num_layers_; ++i) {
    std::shared_ptr<Batch> batch;
    // A layer may be marked by another thread while we wait (the producer's layer loop).
    for (;;) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!post_error_.ok()) return post_error_;
        batch = batches_[i];
      }
      if (batch) break;
      if (deadline != 0 && now_ns() >= deadline) {
        return BANASERVE_STATUS(StatusCode::kTimeout,
                                "layer " + std::to_string(i) + " was never marked ready");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    int64_t left = -1;
    if (deadline != 0) {
      const uint64_t now = now_ns();
      left = now >= deadline ? 0 : static_cast<int64_t>((deadline - now) / 1000000ull);
    }
    BANASERVE_RETURN_IF_ERROR(batch->wait(left));
  }
  return Status();
}

void SendStream::cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& b : batches_) {
    if (b) b->cancel();
  }
}

TransferState SendStream::state() const {
  std::lock_guard<std::mutex> lock(mu_);
  bool all_done = true;
  bool any_running = false;
  for (const auto& b : batches_) {
    if (!b) {
      all_done = false;
      continue;
    }
    const TransferState s = b->state();
    if (s == TransferState::kFailed) return s;
    if (s == TransferState::kCancelled) return s;
    if (s != TransferState::kDone) all_done = false;
    any_running = true;  // posted: running, or done while later layers are still unmarked
  }
  if (!post_error_.ok()) return TransferState::kFailed;
  if (all_done) return TransferState::kDone;
  return any_running ? TransferState::kRunning : TransferState::kPending;
}

uint32_t SendStream::layers_posted() const {
  std::lock_guard<std::mutex> lock(mu_);
  uint32_t n = 0;
  for (const auto& b : batches_) n += b ? 1 : 0;
  return n;
}

}  // namespace banaserve::transfer
