// SPDX-License-Identifier: Apache-2.0
// The ucx backend: one-sided UCP RMA (put for kWrite, get for kRead) on memory registered with
// ucp_mem_map, rkeys and the worker address published in the engine metadata, per-batch
// notifications as UCP active messages sent after a flush (so they arrive after the data).
//
// Threads: one progress thread owns every operation on the worker; post() only queues. connect()
// creates the endpoint from the caller's thread (the worker is thread-safe, UCS_THREAD_MODE_MULTI)
// so that the transports UCX picked can be reported at once (describe_peer).
//
// Termination contract (completion.h): a batch's operations run inside one IoSection. While
// waiting for them the progress thread watches the gate, the deadline, cancellation and the
// peer's health; on any of those it force-closes the endpoint, which cancels the outstanding
// operations, before it leaves the section. Only then can the engine publish a terminal state.
#include "ucx_transport.h"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "ucx_util.h"

namespace banaserve::transfer {
namespace {

constexpr unsigned kAmNotify = 7;  // active-message id of the per-batch notification

struct NotifyHeader {
  uint64_t transfer_id;
  uint32_t layer;
  uint32_t num_layers;
  uint32_t sender_len;  // the sender's engine id follows the header in the AM payload
  uint32_t status;      // 0: ok
};

Status ucs_error(ucs_status_t st, const std::string& what) {
  return BANASERVE_STATUS(st == UCS_ERR_CANCELED ? StatusCode::kCancelled : StatusCode::kUnavailable,
                          what + ": " + ucs_status_string(st));
}

// Completion of one UCX request: the callbacks count down and keep the first error.
// Heap-allocated: when operations to a dead peer never complete, the tracker is orphaned (the
// last callback, if any ever comes, frees it) instead of leaving a dangling stack pointer.
struct Tracker {
  virtual ~Tracker() = default;  // the notification's tracker carries its header
  uint64_t outstanding = 0;
  ucs_status_t first_error = UCS_OK;
  bool orphaned = false;
};

void on_request_done(void* request, ucs_status_t status, void* user) {
  auto* t = static_cast<Tracker*>(user);
  if (status != UCS_OK && t->first_error == UCS_OK) t->first_error = status;
  --t->outstanding;
  ucp_request_free(request);
  if (t->orphaned && t->outstanding == 0) delete t;
}

// Frees the tracker now, or hands it to the callbacks still to come.
void release(Tracker* t) {
  if (t->outstanding == 0) {
    delete t;
  } else {
    t->orphaned = true;
  }
}

constexpr uint64_t kGiveUpNs = 200 * 1000000ull;  // after a force-close, how long to drain

struct EndpointState {
  std::string engine_id;
  std::string address;
  int32_t pid = 0;
  bool same_host = false;
  ucp_ep_h ep = nullptr;
  std::string route;            // what ucp_ep_print_info reported (guarded by the transport's mu_)
  std::string note;             // appended to the route (e.g. how peer failure is detected)
  bool route_final = false;     // refreshed once after the first batch, when wire-up is over
  std::atomic<bool> failed{false};
  ucs_status_t failure = UCS_OK;
  bool lost_reported = false;
  std::unordered_map<uint64_t, std::pair<std::string, ucp_rkey_h>> rkeys;  // by region id
};

struct Job {
  std::shared_ptr<Batch> batch;
  std::string peer_id;
  RegionTable regions;  // the peer's registrations at post time (rkeys)
  std::vector<CopyRun> runs;
};

class UcxTransport final : public Transport {
 public:
  ~UcxTransport() override { stop(); }

  const char* name() const override { return backend::kUcx; }

  Capabilities capabilities() const override {
    Capabilities caps;
    caps.host_memory = true;
    caps.device_memory = false;  // the distribution's UCX has no CUDA support
    caps.same_host = true;
    caps.cross_host = true;
    caps.notifications = true;
    caps.cancellation = true;
    caps.priority = 50;  // below shm (100) on one host, above tcp (10) across hosts
    return caps;
  }

  Status start(const TransportContext& ctx) override {
    ctx_ = ctx;
    ucp_config_t* config = nullptr;
    ucs_status_t st = ucp_config_read(nullptr, nullptr, &config);
    if (st != UCS_OK) return ucs_error(st, "ucp_config_read");
    // An engine told to stay on loopback keeps UCX's network transports on loopback too, unless
    // the user chose the devices (UCX_NET_DEVICES); otherwise UCX listens on every interface.
    const std::string& host = ctx.config->tcp_host;
    if ((host.rfind("127.", 0) == 0 || host == "localhost") && std::getenv("UCX_NET_DEVICES") == nullptr) {
      (void)ucp_config_modify(config, "NET_DEVICES", "lo");
    }
    ucp_params_t params;
    std::memset(&params, 0, sizeof(params));
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 1;
    st = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (st != UCS_OK) return ucs_error(st, "ucp_init");
    ucp_worker_params_t wp;
    std::memset(&wp, 0, sizeof(wp));
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_MULTI;
    st = ucp_worker_create(context_, &wp, &worker_);
    if (st != UCS_OK) {
      cleanup();
      return ucs_error(st, "ucp_worker_create");
    }
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    st = ucp_worker_get_address(worker_, &addr, &len);
    if (st != UCS_OK) {
      cleanup();
      return ucs_error(st, "ucp_worker_get_address");
    }
    address_.assign(reinterpret_cast<const char*>(addr), len);
    ucp_worker_release_address(worker_, addr);
    st = ucp_worker_get_efd(worker_, &worker_fd_);
    if (st != UCS_OK) {
      cleanup();
      return ucs_error(st, "ucp_worker_get_efd");
    }
    ucp_am_handler_param_t am;
    std::memset(&am, 0, sizeof(am));
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                    UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.id = kAmNotify;
    am.cb = &UcxTransport::on_notify;
    am.arg = this;
    st = ucp_worker_set_am_recv_handler(worker_, &am);
    if (st != UCS_OK) {
      cleanup();
      return ucs_error(st, "ucp_worker_set_am_recv_handler");
    }
    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd_ < 0) {
      cleanup();
      return BANASERVE_ERRNO(StatusCode::kResourceExhausted, "eventfd");
    }
    worker_info_ = ucx::worker_transports(worker_);
    stopping_ = false;
    thread_ = std::thread([this] { loop(); });
    return Status();
  }

  void stop() override {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake();
    thread_.join();
    cleanup();
  }

  void fill_metadata(EngineMetadata* md) const override { md->ucx_address = address_; }

  bool can_serve(const PeerRecord& peer) const override { return !peer.metadata.ucx_address.empty(); }

  Status on_register(RegionInfo* region) override {
    if (region->device.kind != MemoryKind::kHost) return Status();  // not ours
    ucp_mem_map_params_t mp;
    std::memset(&mp, 0, sizeof(mp));
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = reinterpret_cast<void*>(region->addr);
    mp.length = region->nbytes;
    ucp_mem_h memh = nullptr;
    ucs_status_t st = ucp_mem_map(context_, &mp, &memh);
    if (st != UCS_OK) return ucs_error(st, "ucp_mem_map of the region");
    void* packed = nullptr;
    size_t packed_len = 0;
    st = ucp_rkey_pack(context_, memh, &packed, &packed_len);
    if (st != UCS_OK) {
      ucp_mem_unmap(context_, memh);
      return ucs_error(st, "ucp_rkey_pack");
    }
    region->rkey.assign(static_cast<const char*>(packed), packed_len);
    ucp_rkey_buffer_release(packed);
    std::lock_guard<std::mutex> lock(mu_);
    memhs_[region->addr] = memh;
    return Status();
  }

  void on_unregister(const RegionInfo& region) override {
    ucp_mem_h memh = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = memhs_.find(region.addr);
      if (it == memhs_.end()) return;
      memh = it->second;
      memhs_.erase(it);
    }
    ucp_mem_unmap(context_, memh);
  }

  std::string describe_peer(const std::string& engine_id) const override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = eps_.find(engine_id);
    return it == eps_.end() ? worker_info_ : it->second->route;
  }

  Status connect(std::shared_ptr<const PeerRecord> peer) override {
    const EngineMetadata& md = peer->metadata;
    if (md.ucx_address.empty()) {
      return BANASERVE_STATUS(StatusCode::kUnavailable,
                              "peer " + md.engine_id + " has no ucx endpoint in its metadata");
    }
    std::lock_guard<std::mutex> lock(mu_);
    auto it = eps_.find(md.engine_id);
    if (it != eps_.end() && it->second->address == md.ucx_address && !it->second->failed) {
      return Status();  // metadata update: same endpoint; new rkeys come with each post
    }
    auto state = std::make_shared<EndpointState>();
    state->engine_id = md.engine_id;
    state->address = md.ucx_address;
    state->pid = md.pid;
    state->same_host = peer->same_host;
    ucp_ep_params_t ep;
    std::memset(&ep, 0, sizeof(ep));
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(state->address.data());
    // Across hosts UCX reports a failed peer through the error handler. On one host, UCX 1.13's
    // shared-memory transports cannot (an endpoint asking for it is refused), so the pid check of
    // check_peers detects a dead peer instead; the route says so.
    const bool by_pid = peer->same_host && md.pid > 0;
    ep.err_mode = by_pid ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &UcxTransport::on_ep_error;
    ep.err_handler.arg = state.get();
    // Non-blocking: wire-up with the peer happens during progress.
    ucs_status_t st = ucp_ep_create(worker_, &ep, &state->ep);
    const std::string note = by_pid ? " [peer failure by pid check]" : "";
    if (st != UCS_OK) return ucs_error(st, "ucp_ep_create for peer " + md.engine_id);
    state->note = note;
    state->route = ucx::endpoint_route(state->ep) + note;
    if (it != eps_.end()) retired_.push_back(it->second);  // closed by the progress thread
    eps_[md.engine_id] = std::move(state);
    wake();
    return Status();
  }

  void disconnect(const std::string& engine_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = eps_.find(engine_id);
    if (it == eps_.end()) return;
    retired_.push_back(it->second);
    eps_.erase(it);
    wake();
  }

  void post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
            std::vector<CopyRun> runs) override {
    Job job{std::move(batch), peer.metadata.engine_id, peer.regions, std::move(runs)};
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!stopping_) {
        jobs_.push_back(std::move(job));
        job.batch = nullptr;
      }
    }
    if (job.batch) {
      job.batch->complete_part(BANASERVE_STATUS(StatusCode::kUnavailable, "ucx backend stopped"));
      return;
    }
    wake();
  }

 private:
  static void on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
    auto* state = static_cast<EndpointState*>(arg);
    state->failure = status;
    state->failed.store(true, std::memory_order_release);
  }

  static ucs_status_t on_notify(void* arg, const void* header, size_t header_len, void* data,
                                size_t length, const ucp_am_recv_param_t*) {
    auto* self = static_cast<UcxTransport*>(arg);
    NotifyHeader h;
    if (header_len != sizeof(h)) {
      self->ctx_.counters->frames_rejected.fetch_add(1, std::memory_order_relaxed);
      return UCS_OK;
    }
    std::memcpy(&h, header, sizeof(h));
    if (h.sender_len != length || h.transfer_id == 0 || h.layer >= h.num_layers) {
      self->ctx_.counters->frames_rejected.fetch_add(1, std::memory_order_relaxed);
      return UCS_OK;
    }
    const std::string sender(static_cast<const char*>(data), length);
    const uint64_t early = now_ns() + self->ctx_.config->default_timeout_ms * 1000000ull;
    self->ctx_.inbox->deliver(sender, NotifyTag{h.transfer_id, h.layer, h.num_layers}, Status(),
                              early);
    return UCS_OK;
  }

  void wake() {
    if (wake_fd_ < 0) return;
    const uint64_t one = 1;
    ssize_t n = write(wake_fd_, &one, sizeof(one));
    (void)n;
  }

  void progress_all() {
    while (ucp_worker_progress(worker_) != 0) {
    }
  }

  // Closes an endpoint from the progress thread; force-close cancels outstanding operations.
  void close_endpoint(EndpointState* s, bool force) {
    if (s->ep == nullptr) return;
    for (auto& [id, rk] : s->rkeys) ucp_rkey_destroy(rk.second);
    s->rkeys.clear();
    ucp_request_param_t p;
    std::memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucs_status_ptr_t req = ucp_ep_close_nbx(s->ep, &p);
    s->ep = nullptr;
    if (UCS_PTR_IS_PTR(req)) {
      const uint64_t deadline = now_ns() + 500 * 1000000ull;  // a graceful close may wait for peer
      while (ucp_request_check_status(req) == UCS_INPROGRESS && now_ns() < deadline) {
        ucp_worker_progress(worker_);
      }
      if (ucp_request_check_status(req) == UCS_INPROGRESS) {
        ucp_request_cancel(worker_, req);
        const uint64_t give_up = now_ns() + kGiveUpNs;
        while (ucp_request_check_status(req) == UCS_INPROGRESS && now_ns() < give_up) {
          ucp_worker_progress(worker_);
        }
      }
      ucp_request_free(req);  // frees now, or once UCX completes it
    }
  }

  // Same-host peers are checked by pid: an endpoint to a dead process may never error out on
  // a shared-memory transport.
  void check_peers() {
    std::vector<std::pair<std::string, Status>> lost;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [id, s] : eps_) {
        if (s->lost_reported) continue;
        bool dead = s->failed.load(std::memory_order_acquire);
        Status why = dead ? ucs_error(s->failure, "ucx endpoint failed") : Status();
        if (!dead && s->same_host && s->pid > 0 && kill(s->pid, 0) != 0 && errno == ESRCH) {
          dead = true;
          why = BANASERVE_STATUS(StatusCode::kUnavailable, "peer process " +
                                                               std::to_string(s->pid) + " exited");
        }
        if (dead) {
          s->lost_reported = true;
          lost.emplace_back(id, why);
        }
      }
    }
    for (auto& [id, why] : lost) {
      ctx_.counters->connections_dropped.fetch_add(1, std::memory_order_relaxed);
      ctx_.peer_lost(ctx_.engine, id, why);
    }
  }

  void loop() {
    uint64_t next_check = 0;
    const uint64_t interval_ns = uint64_t{ctx_.config->peer_check_interval_ms} * 1000000ull;
    for (;;) {
      std::deque<Job> jobs;
      std::vector<std::shared_ptr<EndpointState>> retired;
      bool stopping;
      {
        std::lock_guard<std::mutex> lock(mu_);
        jobs.swap(jobs_);
        retired.swap(retired_);
        stopping = stopping_;
      }
      for (auto& s : retired) close_endpoint(s.get(), /*force=*/true);
      if (stopping) {
        for (auto& j : jobs) {
          j.batch->complete_part(BANASERVE_STATUS(StatusCode::kUnavailable, "ucx backend stopped"));
        }
        return;
      }
      for (auto& j : jobs) run(j);
      progress_all();
      const uint64_t now = now_ns();
      if (now >= next_check) {
        check_peers();
        next_check = now + interval_ns;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!jobs_.empty() || !retired_.empty() || stopping_) continue;
      }
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      pollfd fds[2] = {{worker_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
      const int timeout_ms = static_cast<int>(std::max<uint32_t>(1, ctx_.config->peer_check_interval_ms));
      (void)poll(fds, 2, timeout_ms);
      if (fds[1].revents & POLLIN) {
        uint64_t v;
        ssize_t n = read(wake_fd_, &v, sizeof(v));
        (void)n;
      }
    }
  }

  std::shared_ptr<EndpointState> endpoint(const std::string& id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = eps_.find(id);
    return it == eps_.end() ? nullptr : it->second;
  }

  StatusOr<ucp_rkey_h> rkey_for(EndpointState* s, const RegionInfo& r) {
    auto it = s->rkeys.find(r.id);
    if (it != s->rkeys.end() && it->second.first == r.rkey) return it->second.second;
    if (r.rkey.empty()) {
      return BANASERVE_STATUS(StatusCode::kUnavailable,
                              "the peer published no ucx rkey for region " + std::to_string(r.id));
    }
    ucp_rkey_h rk = nullptr;
    ucs_status_t st = ucp_ep_rkey_unpack(s->ep, r.rkey.data(), &rk);
    if (st != UCS_OK) return ucs_error(st, "ucp_ep_rkey_unpack");
    if (it != s->rkeys.end()) ucp_rkey_destroy(it->second.second);
    s->rkeys[r.id] = {r.rkey, rk};
    return rk;
  }

  // Why a batch must stop waiting, or OK to keep waiting.
  Status interruption(Batch& b, EndpointState* s) {
    if (b.io().closed()) return BANASERVE_STATUS(StatusCode::kUnavailable, "batch aborted");
    if (b.cancel_requested()) return BANASERVE_STATUS(StatusCode::kCancelled, "cancelled by the caller");
    if (now_ns() >= b.deadline_ns()) return BANASERVE_STATUS(StatusCode::kTimeout, "deadline passed");
    if (s->failed.load(std::memory_order_acquire)) return ucs_error(s->failure, "ucx endpoint failed");
    return Status();
  }

  Status wait_tracker(Batch& b, EndpointState* s, Tracker& t) {
    if (s->ep == nullptr) {
      return t.outstanding == 0 ? Status()
                                : BANASERVE_STATUS(StatusCode::kUnavailable, "ucx endpoint closed");
    }
    uint64_t spins = 0;
    while (t.outstanding != 0) {
      if (ucp_worker_progress(worker_) == 0 && (++spins & 1023) == 0) {
        Status why = interruption(b, s);
        if (!why.ok()) {
          // Force-close cancels every outstanding operation; their callbacks run inside.
          close_endpoint(s, /*force=*/true);
          s->failed.store(true, std::memory_order_release);
          if (s->failure == UCS_OK) s->failure = UCS_ERR_CANCELED;
          const uint64_t give_up = now_ns() + kGiveUpNs;
          while (t.outstanding != 0 && now_ns() < give_up) ucp_worker_progress(worker_);
          // Still outstanding: the peer is gone and its endpoint closed; nothing will arrive.
          return why;
        }
      }
    }
    return t.first_error == UCS_OK ? Status() : ucs_error(t.first_error, "ucx operation");
  }

  Status run_ops(Job& j, EndpointState* s) {
    Tracker* tracker = new Tracker;
    Status st = issue_ops(j, s, *tracker);
    release(tracker);
    return st;
  }

  Status issue_ops(Job& j, EndpointState* s, Tracker& t) {
    Batch& b = *j.batch;
    ucp_request_param_t p;
    std::memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &on_request_done;
    p.user_data = &t;
    for (const CopyRun& r : j.runs) {
      if (r.nbytes == 0) continue;
      if (b.cancel_requested()) {
        // Let what was issued finish, then report the cancellation.
        Status st = wait_tracker(b, s, t);
        return st.ok() ? BANASERVE_STATUS(StatusCode::kCancelled, "cancelled by the caller") : st;
      }
      const RegionInfo* region = j.regions.find(r.remote_addr, r.nbytes, Device{});
      if (region == nullptr) {
        (void)wait_tracker(b, s, t);
        return BANASERVE_STATUS(StatusCode::kInvalidArgument, "remote range outside the peer's regions");
      }
      StatusOr<ucp_rkey_h> rk = rkey_for(s, *region);
      if (!rk.ok()) {
        (void)wait_tracker(b, s, t);
        return rk.status();
      }
      void* local = reinterpret_cast<void*>(r.local_addr);
      ucs_status_ptr_t req = b.op() == Op::kWrite
                                 ? ucp_put_nbx(s->ep, local, r.nbytes, r.remote_addr, rk.value(), &p)
                                 : ucp_get_nbx(s->ep, local, r.nbytes, r.remote_addr, rk.value(), &p);
      if (UCS_PTR_IS_ERR(req)) {
        (void)wait_tracker(b, s, t);
        return ucs_error(UCS_PTR_STATUS(req), b.op() == Op::kWrite ? "ucp_put_nbx" : "ucp_get_nbx");
      }
      if (UCS_PTR_IS_PTR(req)) ++t.outstanding;
    }
    // Flush: completes once every put is visible in the peer's memory and every get landed here.
    ucs_status_ptr_t req = ucp_ep_flush_nbx(s->ep, &p);
    if (UCS_PTR_IS_ERR(req)) {
      (void)wait_tracker(b, s, t);
      return ucs_error(UCS_PTR_STATUS(req), "ucp_ep_flush_nbx");
    }
    if (UCS_PTR_IS_PTR(req)) ++t.outstanding;
    return wait_tracker(b, s, t);
  }

  Status send_notify(Job& j, EndpointState* s) {
    Batch& b = *j.batch;
    const std::string& me = ctx_.self->engine_id;
    // Header and payload must stay valid until the send completes or is given up on: keep them
    // with the tracker's lifetime (no COPY_HEADER flag in UCX 1.13).
    struct Notify : Tracker {
      NotifyHeader h;
      std::string me;
    };
    auto* n = new Notify;
    n->h = NotifyHeader{b.tag().transfer_id, b.tag().layer, b.tag().num_layers,
                        static_cast<uint32_t>(me.size()), 0};
    n->me = me;
    Tracker& t = *n;
    ucp_request_param_t p;
    std::memset(&p, 0, sizeof(p));
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &on_request_done;
    p.user_data = &t;
    ucs_status_ptr_t req =
        ucp_am_send_nbx(s->ep, kAmNotify, &n->h, sizeof(n->h), n->me.data(), n->me.size(), &p);
    Status st;
    if (UCS_PTR_IS_ERR(req)) {
      st = ucs_error(UCS_PTR_STATUS(req), "ucp_am_send_nbx");
    } else {
      if (UCS_PTR_IS_PTR(req)) ++t.outstanding;
      st = wait_tracker(b, s, t);
    }
    release(n);
    return st;
  }

  void run(Job& j) {
    Batch& b = *j.batch;
    std::shared_ptr<EndpointState> s = endpoint(j.peer_id);
    Status status;
    if (!s || s->ep == nullptr || s->failed.load(std::memory_order_acquire)) {
      status = BANASERVE_STATUS(StatusCode::kUnavailable,
                                "no usable ucx endpoint to peer " + j.peer_id);
    } else {
      IoSection io(b.io());
      if (!io.open()) return;  // aborted before it started: the engine already finished it
      status = run_ops(j, s.get());
      if (status.ok() && b.op() == Op::kWrite && b.tag().transfer_id != 0) {
        status = send_notify(j, s.get());
      }
    }
    if (status.ok()) {
      auto& counter = b.op() == Op::kWrite ? ctx_.counters->bytes_written : ctx_.counters->bytes_read;
      counter.fetch_add(b.nbytes(), std::memory_order_relaxed);
    }
    if (status.ok() && !s->route_final && s->ep != nullptr) {
      // Before wire-up UCX reports a provisional configuration; report what it settled on.
      std::string route = ucx::endpoint_route(s->ep);
      std::lock_guard<std::mutex> lock(mu_);
      s->route = std::move(route) + s->note;
      s->route_final = true;
    }
    b.complete_part(status);
    if (s && s->failed.load(std::memory_order_acquire)) check_peers();
  }

  void cleanup() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [id, s] : eps_) retired_.push_back(s);
      eps_.clear();
    }
    if (worker_ != nullptr) {
      for (auto& s : retired_) close_endpoint(s.get(), /*force=*/true);
    }
    retired_.clear();
    if (context_ != nullptr) {
      for (auto& [addr, memh] : memhs_) ucp_mem_unmap(context_, memh);
    }
    memhs_.clear();
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    worker_ = nullptr;
    if (context_ != nullptr) ucp_cleanup(context_);
    context_ = nullptr;
    if (wake_fd_ >= 0) close(wake_fd_);
    wake_fd_ = -1;
  }

  TransportContext ctx_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int worker_fd_ = -1;
  int wake_fd_ = -1;
  std::string address_;
  std::string worker_info_;
  std::thread thread_;

  mutable std::mutex mu_;  // guards everything below
  bool stopping_ = false;
  std::deque<Job> jobs_;
  std::unordered_map<std::string, std::shared_ptr<EndpointState>> eps_;
  std::vector<std::shared_ptr<EndpointState>> retired_;
  std::map<uint64_t, ucp_mem_h> memhs_;  // by region addr
};

}  // namespace

std::unique_ptr<Transport> make_ucx_transport() { return std::make_unique<UcxTransport>(); }

}  // namespace banaserve::transfer
