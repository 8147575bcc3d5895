// SPDX-License-Identifier: Apache-2.0
#include "tcp_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>

#include "wire.h"

namespace banaserve::transfer {

namespace w = tcp_wire;

namespace {

constexpr size_t kIovBatch = 1024;                      // iovecs per sendmsg/readv (IOV_MAX)
constexpr uint64_t kFramePayload = uint64_t{4} << 20;   // payload bytes per frame we send
constexpr size_t kFrameRuns = 8192;                     // runs per frame we send
constexpr uint64_t kSplitMinPart = uint64_t{256} << 10;  // no lane split below 2 x this
constexpr uint64_t kInlineMax = uint64_t{64} << 10;     // posts this small are sent by the caller
constexpr int kIoTimeoutMs = 100;                       // bound of one blocking socket call
constexpr int kConnectTimeoutMs = 5000;
constexpr int kHelloTimeoutMs = 5000;
constexpr size_t kScratchBytes = 64 << 10;
constexpr uint64_t kNoteTtlNs = uint64_t{300} * 1000000000;

alignas(64) const uint8_t kZeros[kScratchBytes] = {};

bool transient(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }

void set_stream_options(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  timeval tv{0, kIoTimeoutMs * 1000};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
}

/// A cursor over an iovec list: what is left to send or receive.
class IovList {
 public:
  void clear() {
    v_.clear();
    i_ = 0;
    total_ = 0;
  }
  void add(const void* p, uint64_t n) {
    if (n == 0) return;
    v_.push_back(iovec{const_cast<void*>(p), static_cast<size_t>(n)});
    total_ += n;
  }
  bool done() const { return i_ >= v_.size(); }
  uint64_t remaining() const { return total_; }
  /// Points msg at up to kIovBatch iovecs from the cursor.
  void fill(msghdr* msg) {
    msg->msg_iov = v_.data() + i_;
    msg->msg_iovlen = std::min(kIovBatch, v_.size() - i_);
  }
  void advance(size_t n) {
    total_ -= n;
    while (n > 0 && i_ < v_.size()) {
      if (n >= v_[i_].iov_len) {
        n -= v_[i_].iov_len;
        ++i_;
      } else {
        v_[i_].iov_base = static_cast<uint8_t*>(v_[i_].iov_base) + n;
        v_[i_].iov_len -= n;
        n = 0;
      }
    }
  }

 private:
  std::vector<iovec> v_;
  size_t i_ = 0;
  uint64_t total_ = 0;
};

enum class IoEnd { kOk, kEof, kError, kStopped, kGateClosed };

struct IoResult {
  IoEnd end = IoEnd::kOk;
  int err = 0;
  uint64_t done = 0;  // bytes moved
};

Status io_status(const IoResult& r, const char* what) {
  switch (r.end) {
    case IoEnd::kOk:
    case IoEnd::kGateClosed:
      return Status();
    case IoEnd::kEof:
      return BANASERVE_STATUS(StatusCode::kUnavailable, std::string(what) + ": connection closed by peer");
    case IoEnd::kStopped:
      return BANASERVE_STATUS(StatusCode::kUnavailable, std::string(what) + ": transport stopping");
    case IoEnd::kError:
      break;
  }
  return errno_status(StatusCode::kUnavailable, what, r.err, __FILE__, __LINE__);
}

/// Sends everything in list. With a gate, every sendmsg runs inside a section of it; when the
/// gate is closed the call returns kGateClosed with the list positioned where it stopped.
IoResult send_list(int fd, IovList& list, const std::atomic<bool>& stop, IoGate* gate) {
  IoResult r;
  while (!list.done()) {
    msghdr msg{};
    list.fill(&msg);
    if (gate != nullptr && !gate->enter()) {
      r.end = IoEnd::kGateClosed;
      return r;
    }
    ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL);
    int err = errno;
    if (gate != nullptr) gate->leave();
    if (n > 0) {
      list.advance(static_cast<size_t>(n));
      r.done += static_cast<uint64_t>(n);
      continue;
    }
    if (n < 0 && transient(err)) {
      if (stop.load(std::memory_order_acquire)) {
        r.end = IoEnd::kStopped;
        return r;
      }
      continue;
    }
    r.end = IoEnd::kError;
    r.err = n == 0 ? EPIPE : err;
    return r;
  }
  return r;
}

/// Receives into everything in list (readv). Gate handling as in send_list.
IoResult recv_list(int fd, IovList& list, const std::atomic<bool>& stop, IoGate* gate) {
  IoResult r;
  while (!list.done()) {
    msghdr msg{};
    list.fill(&msg);
    if (gate != nullptr && !gate->enter()) {
      r.end = IoEnd::kGateClosed;
      return r;
    }
    ssize_t n = ::readv(fd, msg.msg_iov, static_cast<int>(msg.msg_iovlen));
    int err = errno;
    if (gate != nullptr) gate->leave();
    if (n > 0) {
      list.advance(static_cast<size_t>(n));
      r.done += static_cast<uint64_t>(n);
      continue;
    }
    if (n == 0) {
      r.end = IoEnd::kEof;
      return r;
    }
    if (transient(err)) {
      if (stop.load(std::memory_order_acquire)) {
        r.end = IoEnd::kStopped;
        return r;
      }
      continue;
    }
    r.end = IoEnd::kError;
    r.err = err;
    return r;
  }
  return r;
}

/// Receives exactly n bytes into one buffer (headers, tables, trailers: no allocation).
IoResult recv_exact(int fd, void* buf, size_t n, const std::atomic<bool>& stop) {
  IoResult r;
  uint8_t* p = static_cast<uint8_t*>(buf);
  while (r.done < n) {
    ssize_t k = ::recv(fd, p + r.done, n - r.done, 0);
    if (k > 0) {
      r.done += static_cast<uint64_t>(k);
      continue;
    }
    if (k == 0) {
      r.end = IoEnd::kEof;
      return r;
    }
    int err = errno;
    if (transient(err)) {
      if (stop.load(std::memory_order_acquire)) {
        r.end = IoEnd::kStopped;
        return r;
      }
      continue;
    }
    r.end = IoEnd::kError;
    r.err = err;
    return r;
  }
  return r;
}

/// Sends exactly n bytes from one buffer (acks: no allocation).
IoResult send_exact(int fd, const void* buf, size_t n, const std::atomic<bool>& stop) {
  IoResult r;
  const uint8_t* p = static_cast<const uint8_t*>(buf);
  while (r.done < n) {
    ssize_t k = ::send(fd, p + r.done, n - r.done, MSG_NOSIGNAL);
    if (k > 0) {
      r.done += static_cast<uint64_t>(k);
      continue;
    }
    int err = k == 0 ? EPIPE : errno;
    if (k < 0 && transient(err)) {
      if (stop.load(std::memory_order_acquire)) {
        r.end = IoEnd::kStopped;
        return r;
      }
      continue;
    }
    r.end = IoEnd::kError;
    r.err = err;
    return r;
  }
  return r;
}

/// Reads and throws away n bytes.
IoResult drain(int fd, uint64_t n, uint8_t* scratch, const std::atomic<bool>& stop) {
  IoResult total;
  while (n > 0) {
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, kScratchBytes));
    IoResult r = recv_exact(fd, scratch, chunk, stop);
    total.done += r.done;
    if (r.end != IoEnd::kOk) {
      total.end = r.end;
      total.err = r.err;
      return total;
    }
    n -= chunk;
  }
  return total;
}

/// Blocks until fd is readable (or hung up). Shutting the socket down wakes it.
bool wait_readable(int fd, const std::atomic<bool>& stop, int timeout_ms = -1) {
  pollfd p{fd, POLLIN, 0};
  int waited = 0;
  while (!stop.load(std::memory_order_acquire)) {
    int slice = timeout_ms < 0 ? 1000 : std::min(1000, timeout_ms - waited);
    if (timeout_ms >= 0 && slice <= 0) return false;
    int rc = ::poll(&p, 1, slice);
    if (rc > 0) return true;
    if (rc < 0 && errno != EINTR) return true;  // let the read report the error
    waited += slice;
  }
  return false;
}

Status resolve(const std::string& host, uint16_t port, sockaddr_in* out) {
  std::memset(out, 0, sizeof(*out));
  out->sin_family = AF_INET;
  out->sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &out->sin_addr) == 1) return Status();
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || res == nullptr) {
    return BANASERVE_STATUS(StatusCode::kUnavailable,
                            "cannot resolve tcp host '" + host + "': " + gai_strerror(rc));
  }
  out->sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  ::freeaddrinfo(res);
  return Status();
}

std::string hex_range(uint64_t addr, uint64_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "[0x%llx, +%llu)", static_cast<unsigned long long>(addr),
                static_cast<unsigned long long>(n));
  return buf;
}

Status status_from_wire(uint32_t code, std::string message) {
  return Status(static_cast<StatusCode>(code), "tcp peer: " + message, __FILE__, __LINE__);
}

}  // namespace

// ============================================================================================
// Initiator side: one Lane per connection to a peer.
// ============================================================================================

/// The slice of one batch that travels on one lane.
struct Part {
  std::shared_ptr<Batch> batch;
  std::vector<CopyRun> runs;
  uint64_t batch_nbytes = 0;
  // Frame cursor (only the thread holding the lane's send_mu_ moves it).
  size_t next_run = 0;
  uint64_t next_off = 0;
  uint32_t frames_sent = 0;
  // Guarded by the lane's mu_.
  uint32_t outstanding = 0;
  bool sending_done = false;
  bool completed = false;
  Status status;

  bool all_framed() const { return frames_sent > 0 && next_run >= runs.size(); }
};

/// A frame sent and waiting for its reply.
struct InFlight {
  uint64_t frame_id = 0;
  std::shared_ptr<Part> part;
  uint64_t nbytes = 0;
  std::vector<CopyRun> pieces;  // kRead: where the reply's payload goes
};

class Lane {
 public:
  Lane(TcpTransport::Impl* owner, std::string peer_id, std::string host, uint16_t port)
      : owner_(owner), peer_id_(std::move(peer_id)), host_(std::move(host)), port_(port) {}
  ~Lane() { join(); }

  void start() {
    sender_ = std::thread([this] { sender_loop(); });
    receiver_ = std::thread([this] { receiver_loop(); });
  }
  /// Fails everything queued or in flight with why and makes the threads exit. Does not join.
  void shut(const Status& why);
  void join() {
    if (sender_.joinable()) sender_.join();
    if (receiver_.joinable()) receiver_.join();
    std::lock_guard<std::mutex> sl(send_mu_);
    if (send_fd_ >= 0) ::close(send_fd_);
    send_fd_ = -1;
  }
  bool exited() const { return exited_.load() == 2; }
  void submit(std::shared_ptr<Part> part);

 private:
  void sender_loop();
  void receiver_loop();
  Status ensure_connected();  // needs send_mu_
  /// Sends the next frame of part (needs send_mu_). Returns false when the part stops sending
  /// (all framed, cancelled, aborted or the connection failed); *why says why it stopped early.
  bool send_next_frame(Part& part, const std::shared_ptr<Part>& ref, Status* why);
  void send_part(const std::shared_ptr<Part>& part);  // sender thread
  void fail_connection(uint64_t gen, const Status& why, bool peer_gone);
  // Fails every part in flight or queued on this lane with why (mu_ held); the parts now
  // complete are appended to *done, to be completed once mu_ is released.
  void fail_pending_locked(const Status& why, std::vector<std::shared_ptr<Part>>* done);
  void finish_sending(const std::shared_ptr<Part>& part, const Status& status);
  void finish_frame(const std::shared_ptr<Part>& part, const Status& status);
  Status serve_replies(int fd, uint64_t gen);
  static bool ready_locked(Part& p) {
    if (p.completed || !p.sending_done || p.outstanding != 0) return false;
    p.completed = true;
    return true;
  }

  TcpTransport::Impl* owner_;
  const std::string peer_id_;
  const std::string host_;
  const uint16_t port_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Part>> queue_;
  std::deque<InFlight> inflight_;
  bool connected_ = false;
  bool stopping_ = false;
  uint64_t gen_ = 0;
  int active_fd_ = -1;  // the connected socket (for shutdown); valid while connected_
  int recv_fd_ = -1;    // dup of the socket handed to the receiver thread

  std::mutex send_mu_;  // one frame at a time on the wire
  int send_fd_ = -1;    // guarded by send_mu_
  uint64_t send_gen_ = 0;
  uint64_t next_frame_id_ = 1;
  std::vector<uint8_t> head_;  // guarded by send_mu_: header + run table of the frame being sent
  IovList out_;

  std::atomic<bool> stop_flag_{false};
  std::atomic<int> exited_{0};
  std::thread sender_, receiver_;
};

struct PeerConn {
  std::string engine_id;
  std::string host;
  uint16_t port = 0;
  std::vector<std::unique_ptr<Lane>> lanes;
  std::atomic<uint32_t> next_lane{0};
};

// ============================================================================================
// Passive side: one thread per accepted connection.
// ============================================================================================

struct ServerConn {
  int fd = -1;
  std::thread thread;
  std::atomic<bool> done{false};
};

struct TcpTransport::Impl {
  TransportContext ctx;
  bool started = false;
  std::atomic<bool> stopping{false};
  int listen_fd = -1;
  uint16_t port = 0;
  std::string host;
  std::thread listener;

  std::mutex conns_mu;
  std::list<std::unique_ptr<ServerConn>> conns;

  std::mutex peers_mu;
  std::unordered_map<std::string, std::shared_ptr<PeerConn>> peers;
  std::vector<std::shared_ptr<PeerConn>> retired;

  // Multi-frame notified batches: bytes landed so far, by (sender, batch id).
  struct Note {
    uint64_t bytes = 0;
    bool failed = false;
    uint64_t created_ns = 0;
  };
  std::mutex notes_mu;
  std::map<std::pair<std::string, uint64_t>, Note> notes;

  int lanes_per_peer() const {
    int n = ctx.config != nullptr ? ctx.config->tcp_lanes : 2;
    return std::max(1, std::min(n, 64));
  }
  uint64_t early_deadline() const {
    uint64_t ms = ctx.config != nullptr ? ctx.config->default_timeout_ms : 30000;
    return now_ns() + ms * 1000000;
  }
  const std::string& self_id() const {
    static const std::string kNone = "?";
    return ctx.self != nullptr && !ctx.self->engine_id.empty() ? ctx.self->engine_id : kNone;
  }
  void peer_lost(const std::string& peer_id, const Status& why) {
    if (stopping.load()) return;  // the engine counts peers_lost itself
    if (ctx.peer_lost != nullptr) ctx.peer_lost(ctx.engine, peer_id, why);
  }
  void drop_connection() { ctx.counters->connections_dropped.fetch_add(1, std::memory_order_relaxed); }
  void reject_frame() { ctx.counters->frames_rejected.fetch_add(1, std::memory_order_relaxed); }

  void listen_loop();
  void serve(ServerConn* conn);
  Status serve_frames(int fd, const std::string& from, bool* counted);
  Status validate(const std::vector<w::WireRun>& runs) const;
  void note_write(const std::string& from, const w::FrameHeader& h, const Status& status);
  Status reply(int fd, w::FrameType type, uint64_t frame_id, const Status& status);
  void reap_locked();
};

// ---- Lane ------------------------------------------------------------------------------------

void Lane::submit(std::shared_ptr<Part> part) {
  bool small = part->batch_nbytes <= kInlineMax && part->runs.size() <= kIovBatch - 2;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) {
      part->sending_done = true;
      part->completed = true;
      part->batch->complete_part(
          BANASERVE_STATUS(StatusCode::kUnavailable, "tcp: peer " + peer_id_ + " disconnected"));
      return;
    }
    if (!(small && connected_ && queue_.empty())) {
      queue_.push_back(std::move(part));
      cv_.notify_all();
      return;
    }
  }
  // Idle, connected lane and a small batch: send from the caller's thread (saves a wake-up).
  // Never connects here: post() must not block on the network.
  std::unique_lock<std::mutex> sl(send_mu_, std::try_to_lock);
  if (sl.owns_lock()) {
    std::lock_guard<std::mutex> lock(mu_);
    if (connected_ && send_gen_ == gen_ && queue_.empty() && !stopping_) {
      // fall through to the inline send below
    } else {
      queue_.push_back(std::move(part));
      cv_.notify_all();
      return;
    }
  } else {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(part));
    cv_.notify_all();
    return;
  }
  Status why;
  while (send_next_frame(*part, part, &why)) {
  }
  sl.unlock();
  finish_sending(part, why);
}

void Lane::fail_pending_locked(const Status& why, std::vector<std::shared_ptr<Part>>* done) {
  for (InFlight& f : inflight_) {
    f.part->outstanding--;
    if (f.part->status.ok()) f.part->status = why;
    if (ready_locked(*f.part)) done->push_back(f.part);
  }
  inflight_.clear();
  for (auto& p : queue_) {
    p->sending_done = true;
    if (p->status.ok()) p->status = why;
    if (ready_locked(*p)) done->push_back(p);
  }
  queue_.clear();
}

void Lane::shut(const Status& why) {
  std::vector<std::shared_ptr<Part>> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    stop_flag_.store(true, std::memory_order_release);
    if (connected_) {
      connected_ = false;
      ::shutdown(active_fd_, SHUT_RDWR);
    }
    fail_pending_locked(why, &done);
    if (recv_fd_ >= 0) {
      ::close(recv_fd_);
      recv_fd_ = -1;
    }
    cv_.notify_all();
  }
  for (auto& p : done) p->batch->complete_part(p->status);
}

void Lane::fail_connection(uint64_t gen, const Status& why, bool peer_gone) {
  std::vector<std::shared_ptr<Part>> done;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!connected_ || gen_ != gen) return;
    connected_ = false;
    ::shutdown(active_fd_, SHUT_RDWR);
    // Queued parts were posted before the loss was seen: they were bound for the dead peer too.
    fail_pending_locked(why, &done);
  }
  // The engine hears of the loss first, so by the time a batch reports kUnavailable the loss is
  // already recorded (and the peer's other batches and streams are being failed).
  if (peer_gone) owner_->peer_lost(peer_id_, why);
  for (auto& p : done) p->batch->complete_part(p->status);
}

void Lane::finish_sending(const std::shared_ptr<Part>& part, const Status& status) {
  bool complete;
  {
    std::lock_guard<std::mutex> lock(mu_);
    part->sending_done = true;
    if (!status.ok() && part->status.ok()) part->status = status;
    complete = ready_locked(*part);
  }
  if (complete) part->batch->complete_part(part->status);
}

void Lane::finish_frame(const std::shared_ptr<Part>& part, const Status& status) {
  bool complete;
  {
    std::lock_guard<std::mutex> lock(mu_);
    part->outstanding--;
    if (!status.ok() && part->status.ok()) part->status = status;
    complete = ready_locked(*part);
  }
  if (complete) part->batch->complete_part(part->status);
}

Status Lane::ensure_connected() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return BANASERVE_STATUS(StatusCode::kUnavailable, "tcp: lane stopping");
    if (connected_) return Status();
  }
  if (send_fd_ >= 0) {
    ::close(send_fd_);
    send_fd_ = -1;
  }
  sockaddr_in addr;
  BANASERVE_RETURN_IF_ERROR(resolve(host_, port_, &addr));
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return BANASERVE_ERRNO(StatusCode::kInternal, "tcp: socket");
  auto fail = [&](Status s) {
    ::close(fd);
    return s;
  };
  std::string where = "tcp: connect to " + peer_id_ + " at " + host_ + ":" + std::to_string(port_);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    if (errno != EINPROGRESS) return fail(BANASERVE_ERRNO(StatusCode::kUnavailable, where));
    pollfd p{fd, POLLOUT, 0};
    int waited = 0;
    for (;;) {
      if (stop_flag_.load()) return fail(BANASERVE_STATUS(StatusCode::kUnavailable, where + ": stopping"));
      int rc = ::poll(&p, 1, kIoTimeoutMs);
      if (rc > 0) break;
      if (rc < 0 && errno != EINTR) return fail(BANASERVE_ERRNO(StatusCode::kUnavailable, where));
      waited += kIoTimeoutMs;
      if (waited >= kConnectTimeoutMs) {
        return fail(BANASERVE_STATUS(StatusCode::kUnavailable, where + ": timed out"));
      }
    }
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) return fail(errno_status(StatusCode::kUnavailable, where, err, __FILE__, __LINE__));
  }
  int flags = ::fcntl(fd, F_GETFL);
  ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  set_stream_options(fd);

  // HELLO: who we are, so the peer can attribute notifications.
  const std::string& me = owner_->self_id();
  uint8_t hdr[w::kHeaderSize];
  w::FrameHeader h;
  h.type = w::FrameType::kHello;
  h.payload_nbytes = me.size();
  w::encode_header(h, hdr);
  IovList hello;
  hello.add(hdr, sizeof(hdr));
  hello.add(me.data(), me.size());
  IoResult r = send_list(fd, hello, stop_flag_, nullptr);
  if (r.end != IoEnd::kOk) return fail(io_status(r, "tcp: hello"));

  int rfd = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (rfd < 0) return fail(BANASERVE_ERRNO(StatusCode::kInternal, "tcp: dup"));
  std::lock_guard<std::mutex> lock(mu_);
  if (stopping_) {
    ::close(rfd);
    return fail(BANASERVE_STATUS(StatusCode::kUnavailable, "tcp: lane stopping"));
  }
  send_fd_ = fd;
  active_fd_ = fd;
  send_gen_ = ++gen_;
  if (recv_fd_ >= 0) ::close(recv_fd_);
  recv_fd_ = rfd;
  connected_ = true;
  cv_.notify_all();
  return Status();
}

bool Lane::send_next_frame(Part& p, const std::shared_ptr<Part>& ref, Status* why) {
  Batch& batch = *p.batch;
  if (p.all_framed()) return false;
  if (batch.cancel_requested() || batch.io().closed()) {  // observed between frames
    *why = BANASERVE_STATUS(StatusCode::kCancelled, "tcp: cancelled");
    return false;
  }
  const bool write = batch.op() == Op::kWrite;

  // Cut the next frame out of the part's runs.
  InFlight f;
  uint64_t bytes = 0;
  size_t run = p.next_run;
  uint64_t off = p.next_off;
  while (run < p.runs.size() && f.pieces.size() < kFrameRuns) {
    const CopyRun& r = p.runs[run];
    uint64_t rem = r.nbytes - off;
    uint64_t take = std::min(rem, kFramePayload - bytes);
    if (take == 0 && rem > 0) break;
    f.pieces.push_back(CopyRun{r.local_addr + off, r.remote_addr + off, take});
    bytes += take;
    off += take;
    if (off == r.nbytes) {
      ++run;
      off = 0;
    }
  }

  w::FrameHeader h;
  h.type = write ? w::FrameType::kWrite : w::FrameType::kReadReq;
  h.frame_id = next_frame_id_++;
  h.batch_id = batch.id();
  if (write) {
    h.transfer_id = batch.tag().transfer_id;
    h.layer = batch.tag().layer;
    h.num_layers = batch.tag().num_layers;
  }
  h.run_count = static_cast<uint32_t>(f.pieces.size());
  h.payload_nbytes = bytes;
  h.batch_nbytes = p.batch_nbytes;
  head_.resize(w::kHeaderSize + f.pieces.size() * w::kRunEntrySize + w::kTrailerSize);
  w::encode_header(h, head_.data());
  for (size_t i = 0; i < f.pieces.size(); ++i) {
    w::encode_run(w::WireRun{f.pieces[i].remote_addr, f.pieces[i].nbytes},
                  head_.data() + w::kHeaderSize + i * w::kRunEntrySize);
  }
  const size_t table_end = w::kHeaderSize + f.pieces.size() * w::kRunEntrySize;
  uint8_t* trailer = head_.data() + table_end;
  w::encode_trailer(0, trailer);

  out_.clear();
  out_.add(head_.data(), table_end);
  if (write) {
    for (const CopyRun& c : f.pieces) out_.add(reinterpret_cast<const void*>(c.local_addr), c.nbytes);
    out_.add(trailer, w::kTrailerSize);
  }
  const uint64_t frame_total = out_.remaining();

  uint64_t gen;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!connected_ || gen_ != send_gen_) {
      *why = BANASERVE_STATUS(StatusCode::kUnavailable, "tcp: connection to " + peer_id_ + " lost");
      return false;
    }
    gen = gen_;
    f.frame_id = h.frame_id;
    f.part = ref;
    f.nbytes = bytes;
    if (write) f.pieces.clear();
    p.outstanding++;
    inflight_.push_back(std::move(f));
  }
  p.next_run = run;
  p.next_off = off;
  p.frames_sent++;

  IoResult r = send_list(send_fd_, out_, stop_flag_, write ? &batch.io() : nullptr);
  if (r.end == IoEnd::kGateClosed) {
    // The batch was aborted: its memory is off limits from now on.
    if (r.done == 0) {
      // Nothing of this frame is on the wire: take it back (it is the newest in flight).
      std::lock_guard<std::mutex> lock(mu_);
      if (connected_ && gen_ == gen && !inflight_.empty() &&
          inflight_.back().frame_id == h.frame_id) {
        inflight_.pop_back();
        p.outstanding--;
      }
      *why = BANASERVE_STATUS(StatusCode::kCancelled, "tcp: batch aborted");
      return false;
    }
    // Finish the frame without reading the batch's memory: zeros, then a CANCELLED trailer so
    // the receiver neither acknowledges the bytes nor notifies.
    uint64_t sent = r.done;
    const uint64_t payload_end = table_end + bytes;
    IovList rest;
    if (sent < table_end) rest.add(head_.data() + sent, table_end - sent);
    uint64_t zeros = sent < payload_end ? payload_end - std::max<uint64_t>(sent, table_end) : 0;
    while (zeros > 0) {
      uint64_t z = std::min<uint64_t>(zeros, kScratchBytes);
      rest.add(kZeros, z);
      zeros -= z;
    }
    uint64_t trailer_sent = sent > payload_end ? sent - payload_end : 0;
    if (trailer_sent == 0) w::encode_trailer(static_cast<uint32_t>(StatusCode::kCancelled), trailer);
    rest.add(trailer + trailer_sent, w::kTrailerSize - trailer_sent);
    r = send_list(send_fd_, rest, stop_flag_, nullptr);
    if (r.end != IoEnd::kOk) {
      Status s = io_status(r, "tcp: send");
      fail_connection(gen, s, r.end != IoEnd::kStopped);
      *why = s;
      return false;
    }
    *why = BANASERVE_STATUS(StatusCode::kCancelled, "tcp: batch aborted");
    return false;
  }
  if (r.end != IoEnd::kOk) {
    Status s = io_status(r, "tcp: send");
    fail_connection(gen, s, r.end != IoEnd::kStopped);
    *why = s;
    return false;
  }
  (void)frame_total;
  return true;
}

void Lane::send_part(const std::shared_ptr<Part>& part) {
  Status why;
  for (;;) {
    std::unique_lock<std::mutex> sl(send_mu_);
    Status c = ensure_connected();
    if (!c.ok()) {
      sl.unlock();
      // A refused or failed connect: every batch queued for this peer fails with it.
      std::vector<std::shared_ptr<Part>> failed;
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& p : queue_) {
          p->sending_done = true;
          if (p->status.ok()) p->status = c;
          if (ready_locked(*p)) failed.push_back(p);
        }
        queue_.clear();
      }
      if (!stop_flag_.load()) owner_->peer_lost(peer_id_, c);
      for (auto& p : failed) p->batch->complete_part(p->status);
      finish_sending(part, c);
      return;
    }
    // One frame per lock hold, so small posts from other threads can slip in between.
    if (!send_next_frame(*part, part, &why)) break;
  }
  finish_sending(part, why);
}

void Lane::sender_loop() {
  for (;;) {
    std::shared_ptr<Part> part;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) break;
      part = std::move(queue_.front());
      queue_.pop_front();
    }
    send_part(part);
  }
  exited_.fetch_add(1);
}

void Lane::receiver_loop() {
  for (;;) {
    int fd;
    uint64_t gen;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stopping_ || recv_fd_ >= 0; });
      if (stopping_) break;
      fd = recv_fd_;
      recv_fd_ = -1;
      gen = gen_;
    }
    Status why = serve_replies(fd, gen);
    ::close(fd);
    fail_connection(gen, why, !stop_flag_.load());
  }
  exited_.fetch_add(1);
}

Status Lane::serve_replies(int fd, uint64_t gen) {
  std::vector<uint8_t> scratch(kScratchBytes);
  std::string message;
  IovList in;
  for (;;) {
    // Blocking read (bounded per call by SO_RCVTIMEO, re-armed until stop): one syscall per
    // reply on the hot path, no poll first.
    uint8_t hb[w::kHeaderSize];
    IoResult r = recv_exact(fd, hb, sizeof(hb), stop_flag_);
    if (r.end != IoEnd::kOk) return io_status(r, "tcp: receive reply");
    w::FrameHeader h;
    Status s = w::decode_header(hb, sizeof(hb), &h);
    if (!s.ok()) return s.with_context("tcp: reply from " + peer_id_);
    if (h.type != w::FrameType::kAck && h.type != w::FrameType::kReadResp) {
      return BANASERVE_STATUS(StatusCode::kProtocolError, "tcp: unexpected frame from " + peer_id_);
    }
    InFlight f;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (gen_ != gen || !connected_) return BANASERVE_STATUS(StatusCode::kUnavailable, "tcp: connection replaced");
      if (inflight_.empty() || inflight_.front().frame_id != h.frame_id) {
        return BANASERVE_STATUS(StatusCode::kProtocolError,
                                "tcp: reply for unknown frame " + std::to_string(h.frame_id));
      }
      f = std::move(inflight_.front());
      inflight_.pop_front();
    }
    const bool want_read = f.part->batch->op() == Op::kRead;
    if ((h.type == w::FrameType::kReadResp) != want_read) {
      finish_frame(f.part, BANASERVE_STATUS(StatusCode::kProtocolError, "tcp: mismatched reply"));
      return BANASERVE_STATUS(StatusCode::kProtocolError, "tcp: mismatched reply type");
    }
    if (h.status != 0) {
      message.resize(h.payload_nbytes);
      r = recv_exact(fd, message.data(), message.size(), stop_flag_);
      Status err = status_from_wire(h.status, message);
      finish_frame(f.part, err);
      if (r.end != IoEnd::kOk) return io_status(r, "tcp: receive reply");
      continue;
    }
    if (!want_read) {
      owner_->ctx.counters->bytes_written.fetch_add(f.nbytes, std::memory_order_relaxed);
      finish_frame(f.part, Status());
      continue;
    }
    if (h.payload_nbytes != f.nbytes) {
      finish_frame(f.part, BANASERVE_STATUS(StatusCode::kProtocolError, "tcp: short read reply"));
      return BANASERVE_STATUS(StatusCode::kProtocolError, "tcp: read reply of the wrong size");
    }
    // Scatter straight into local memory, inside the batch's gate; discard once it closed.
    in.clear();
    for (const CopyRun& c : f.pieces) in.add(reinterpret_cast<void*>(c.local_addr), c.nbytes);
    r = recv_list(fd, in, stop_flag_, &f.part->batch->io());
    Status st;
    if (r.end == IoEnd::kGateClosed) {
      IoResult d = drain(fd, in.remaining(), scratch.data(), stop_flag_);
      st = BANASERVE_STATUS(StatusCode::kCancelled, "tcp: batch aborted");
      if (d.end != IoEnd::kOk) r = d;
      else r.end = IoEnd::kOk;
    }
    if (r.end != IoEnd::kOk) {
      Status e = io_status(r, "tcp: receive read payload");
      finish_frame(f.part, e);
      return e;
    }
    if (st.ok()) owner_->ctx.counters->bytes_read.fetch_add(f.nbytes, std::memory_order_relaxed);
    finish_frame(f.part, st);
  }
}

// ---- passive side ----------------------------------------------------------------------------

void TcpTransport::Impl::reap_locked() {
  for (auto it = conns.begin(); it != conns.end();) {
    if ((*it)->done.load()) {
      (*it)->thread.join();
      ::close((*it)->fd);
      it = conns.erase(it);
    } else {
      ++it;
    }
  }
}

void TcpTransport::Impl::listen_loop() {
  pollfd p{listen_fd, POLLIN, 0};
  while (!stopping.load()) {
    int rc = ::poll(&p, 1, 200);
    if (rc <= 0) continue;
    int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (!transient(errno)) std::this_thread::sleep_for(std::chrono::milliseconds(10));  // EMFILE...
      continue;
    }
    set_stream_options(fd);
    std::lock_guard<std::mutex> lock(conns_mu);
    reap_locked();
    if (stopping.load()) {
      ::close(fd);
      break;
    }
    auto conn = std::make_unique<ServerConn>();
    conn->fd = fd;
    ServerConn* raw = conn.get();
    conns.push_back(std::move(conn));
    raw->thread = std::thread([this, raw] { serve(raw); });
  }
}

Status TcpTransport::Impl::reply(int fd, w::FrameType type, uint64_t frame_id, const Status& status) {
  uint8_t hb[w::kHeaderSize];
  w::FrameHeader h;
  h.type = type;
  h.frame_id = frame_id;
  h.status = static_cast<uint32_t>(status.code());
  std::string msg = status.ok() ? std::string() : status.message();
  if (msg.size() > w::kMaxMessageBytes) msg.resize(w::kMaxMessageBytes);
  h.payload_nbytes = msg.size();
  w::encode_header(h, hb);
  if (msg.empty()) return io_status(send_exact(fd, hb, sizeof(hb), stopping), "tcp: reply");
  IovList out;
  out.add(hb, sizeof(hb));
  out.add(msg.data(), msg.size());
  return io_status(send_list(fd, out, stopping, nullptr), "tcp: reply");
}

Status TcpTransport::Impl::validate(const std::vector<w::WireRun>& runs) const {
  std::shared_ptr<const RegionTable> table = ctx.regions();
  const Device host{};
  for (const w::WireRun& r : runs) {
    if (table == nullptr || table->find(r.addr, r.nbytes, host) == nullptr) {
      return BANASERVE_STATUS(StatusCode::kInvalidArgument,
                              "remote range " + hex_range(r.addr, r.nbytes) +
                                  " is not inside a registered region of engine " + self_id());
    }
  }
  return Status();
}

void TcpTransport::Impl::note_write(const std::string& from, const w::FrameHeader& h,
                                    const Status& status) {
  if (h.transfer_id == 0) return;
  NotifyTag tag;
  tag.transfer_id = h.transfer_id;
  tag.layer = h.layer;
  tag.num_layers = h.num_layers;
  if (h.payload_nbytes == h.batch_nbytes) {  // the whole batch in one frame
    ctx.inbox->deliver(from, tag, status, early_deadline());
    return;
  }
  bool deliver = false;
  Status result = status;
  {
    std::lock_guard<std::mutex> lock(notes_mu);
    uint64_t now = now_ns();
    auto key = std::make_pair(from, h.batch_id);
    auto it = notes.find(key);
    if (it == notes.end()) {
      // Forget batches whose sender never finished them.
      for (auto s = notes.begin(); s != notes.end();) {
        s = now - s->second.created_ns > kNoteTtlNs ? notes.erase(s) : std::next(s);
      }
      it = notes.emplace(key, Note{0, false, now}).first;
    }
    Note& n = it->second;
    n.bytes += h.payload_nbytes;
    if (!status.ok() && !n.failed) {
      n.failed = true;
      deliver = true;
    }
    if (n.bytes >= h.batch_nbytes) {
      if (!n.failed) deliver = true;
      notes.erase(it);
    }
  }
  if (deliver) ctx.inbox->deliver(from, tag, result, early_deadline());
}

void TcpTransport::Impl::serve(ServerConn* conn) {
  int fd = conn->fd;
  std::string from;
  bool counted = false;
  Status why;
  // HELLO first, within a bounded time.
  uint8_t hb[w::kHeaderSize];
  w::FrameHeader h;
  if (!wait_readable(fd, stopping, kHelloTimeoutMs)) {
    why = BANASERVE_STATUS(StatusCode::kProtocolError, "no HELLO within the time limit");
  } else {
    IoResult r = recv_exact(fd, hb, sizeof(hb), stopping);
    if (r.end == IoEnd::kEof && r.done == 0) {
      why = Status();  // connected and left without a word: not an error
    } else if (r.end == IoEnd::kEof) {
      why = BANASERVE_STATUS(StatusCode::kProtocolError, "EOF inside the HELLO header");
    } else if (r.end != IoEnd::kOk) {
      why = io_status(r, "hello");
    } else {
      why = w::decode_header(hb, sizeof(hb), &h);
      if (why.ok() && h.type != w::FrameType::kHello) {
        why = BANASERVE_STATUS(StatusCode::kProtocolError, "first frame is not HELLO");
      }
      if (why.ok()) {
        from.resize(h.payload_nbytes);
        r = recv_exact(fd, from.data(), from.size(), stopping);
        if (r.end == IoEnd::kEof) {
          why = BANASERVE_STATUS(StatusCode::kProtocolError, "EOF inside the HELLO body");
        } else if (r.end != IoEnd::kOk) {
          why = io_status(r, "hello");
        }
      }
      if (why.ok()) why = serve_frames(fd, from, &counted);
    }
  }
  if (!why.ok() && !stopping.load()) {
    drop_connection();
    if (why.code() == StatusCode::kProtocolError && !counted) reject_frame();
  }
  ::shutdown(fd, SHUT_RDWR);
  conn->done.store(true);
}

/// Serves frames until the connection ends. OK on a clean close at a frame boundary; otherwise
/// the reason the connection is dropped (*counted: the frame was already counted as rejected).
Status TcpTransport::Impl::serve_frames(int fd, const std::string& from, bool* counted) {
  std::vector<uint8_t> scratch(kScratchBytes);
  std::vector<uint8_t> table;
  std::vector<w::WireRun> runs;
  IovList io;
  uint8_t hb[w::kHeaderSize];
  uint8_t trailer[w::kTrailerSize];
  for (;;) {
    *counted = false;
    IoResult r = recv_exact(fd, hb, sizeof(hb), stopping);
    if (r.end == IoEnd::kEof && r.done == 0) return Status();  // clean close
    if (r.end != IoEnd::kOk) {
      return r.end == IoEnd::kEof
                 ? BANASERVE_STATUS(StatusCode::kProtocolError, "EOF inside a frame header")
                 : io_status(r, "receive");
    }
    w::FrameHeader h;
    BANASERVE_RETURN_IF_ERROR(w::decode_header(hb, sizeof(hb), &h));
    if (h.type != w::FrameType::kWrite && h.type != w::FrameType::kReadReq) {
      return BANASERVE_STATUS(StatusCode::kProtocolError, "unexpected frame type from initiator");
    }
    table.resize(static_cast<size_t>(h.run_count) * w::kRunEntrySize);
    r = recv_exact(fd, table.data(), table.size(), stopping);
    if (r.end != IoEnd::kOk) {
      return r.end == IoEnd::kEof ? BANASERVE_STATUS(StatusCode::kProtocolError, "EOF inside a run table")
                                  : io_status(r, "receive");
    }
    BANASERVE_RETURN_IF_ERROR(w::decode_runs(table.data(), table.size(), h.run_count,
                                             h.payload_nbytes, &runs));
    Status valid = validate(runs);
    *counted = !valid.ok();  // a frame that fails later (truncated) is counted once
    if (!valid.ok()) reject_frame();

    if (h.type == w::FrameType::kReadReq) {
      if (!valid.ok()) {
        BANASERVE_RETURN_IF_ERROR(reply(fd, w::FrameType::kReadResp, h.frame_id, valid));
        continue;
      }
      w::FrameHeader rh;
      rh.type = w::FrameType::kReadResp;
      rh.frame_id = h.frame_id;
      rh.payload_nbytes = h.payload_nbytes;
      w::encode_header(rh, hb);
      io.clear();
      io.add(hb, sizeof(hb));
      for (const w::WireRun& run : runs) io.add(reinterpret_cast<const void*>(run.addr), run.nbytes);
      r = send_list(fd, io, stopping, nullptr);
      if (r.end != IoEnd::kOk) return io_status(r, "send read payload");
      ctx.counters->bytes_served.fetch_add(h.payload_nbytes, std::memory_order_relaxed);
      continue;
    }

    // WRITE: scatter (or discard), then the trailer, then notify and acknowledge.
    Status st = valid;
    std::shared_ptr<RecvStream> stream;
    IoGate* gate = nullptr;
    uint64_t payload_left = h.payload_nbytes;  // still to drain
    uint64_t trailer_got = 0;
    if (valid.ok()) {
      if (h.transfer_id != 0) {
        stream = ctx.inbox->stream_for(h.transfer_id, from, early_deadline());
        gate = &stream->io();
      }
      // Payload straight into place, and the trailer, in as few readv calls as possible.
      io.clear();
      for (const w::WireRun& run : runs) io.add(reinterpret_cast<void*>(run.addr), run.nbytes);
      io.add(trailer, sizeof(trailer));
      r = recv_list(fd, io, stopping, gate);
      payload_left = r.done >= h.payload_nbytes ? 0 : h.payload_nbytes - r.done;
      trailer_got = r.done > h.payload_nbytes ? r.done - h.payload_nbytes : 0;
      if (r.end == IoEnd::kGateClosed) {
        Status ss = stream->status();
        st = ss.ok() ? BANASERVE_STATUS(StatusCode::kCancelled, "receive stream closed") : ss;
      } else if (r.end != IoEnd::kOk) {
        return r.end == IoEnd::kEof ? BANASERVE_STATUS(StatusCode::kProtocolError, "EOF inside a frame payload")
                                    : io_status(r, "receive payload");
      }
    }
    if (payload_left > 0 || trailer_got < sizeof(trailer)) {
      r = drain(fd, payload_left, scratch.data(), stopping);
      if (r.end == IoEnd::kOk) {
        r = recv_exact(fd, trailer + trailer_got, sizeof(trailer) - trailer_got, stopping);
      }
      if (r.end != IoEnd::kOk) {
        return r.end == IoEnd::kEof ? BANASERVE_STATUS(StatusCode::kProtocolError, "EOF inside a frame payload")
                                    : io_status(r, "receive payload");
      }
    }
    uint32_t tstatus = 0;
    Status ts = w::decode_trailer(trailer, &tstatus);
    if (!ts.ok()) return ts;
    if (st.ok() && tstatus != 0) {
      st = BANASERVE_STATUS(StatusCode::kCancelled, "sender aborted the batch mid-frame");
    }
    if (st.ok()) ctx.counters->bytes_served.fetch_add(h.payload_nbytes, std::memory_order_relaxed);
    note_write(from, h, st);
    BANASERVE_RETURN_IF_ERROR(reply(fd, w::FrameType::kAck, h.frame_id, st));
  }
}

// ---- TcpTransport ----------------------------------------------------------------------------

TcpTransport::TcpTransport() : impl_(std::make_unique<Impl>()) {}

TcpTransport::~TcpTransport() { stop(); }

Capabilities TcpTransport::capabilities() const {
  Capabilities c;
  c.host_memory = true;
  c.device_memory = false;
  c.same_host = true;
  c.cross_host = true;
  c.in_process = false;
  c.notifications = true;
  c.cancellation = true;
  c.priority = 10;
  return c;
}

uint16_t TcpTransport::port() const { return impl_->port; }

Status TcpTransport::start(const TransportContext& ctx) {
  Impl& m = *impl_;
  if (m.started) return BANASERVE_STATUS(StatusCode::kInternal, "tcp transport started twice");
  if (ctx.counters == nullptr || ctx.inbox == nullptr || ctx.local_regions == nullptr) {
    return BANASERVE_INVALID("tcp transport: incomplete TransportContext");
  }
  m.ctx = ctx;
  if (m.self_id().size() > w::kMaxEngineIdBytes) {
    return BANASERVE_INVALID("tcp transport: engine_id longer than " +
                             std::to_string(w::kMaxEngineIdBytes) + " bytes");
  }
  m.host = ctx.config != nullptr ? ctx.config->tcp_host : "127.0.0.1";
  uint16_t want = ctx.config != nullptr ? ctx.config->tcp_port : 0;
  sockaddr_in addr;
  BANASERVE_RETURN_IF_ERROR(resolve(m.host, want, &addr));
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return BANASERVE_ERRNO(StatusCode::kInternal, "tcp: socket");
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    Status s = BANASERVE_ERRNO(StatusCode::kUnavailable,
                               "tcp: bind " + m.host + ":" + std::to_string(want));
    ::close(fd);
    return s;
  }
  if (::listen(fd, 256) != 0) {
    Status s = BANASERVE_ERRNO(StatusCode::kUnavailable, "tcp: listen");
    ::close(fd);
    return s;
  }
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  m.port = ntohs(addr.sin_port);
  m.listen_fd = fd;
  m.started = true;
  m.listener = std::thread([&m] { m.listen_loop(); });
  return Status();
}

void TcpTransport::stop() {
  Impl& m = *impl_;
  if (!m.started || m.stopping.exchange(true)) return;
  ::shutdown(m.listen_fd, SHUT_RDWR);  // wakes the listener's poll
  if (m.listener.joinable()) m.listener.join();
  ::close(m.listen_fd);
  m.listen_fd = -1;

  std::vector<std::shared_ptr<PeerConn>> peers;
  {
    std::lock_guard<std::mutex> lock(m.peers_mu);
    for (auto& kv : m.peers) peers.push_back(kv.second);
    m.peers.clear();
    for (auto& p : m.retired) peers.push_back(p);
    m.retired.clear();
  }
  const Status why = BANASERVE_STATUS(StatusCode::kUnavailable, "tcp transport stopped");
  for (auto& p : peers) {
    for (auto& lane : p->lanes) lane->shut(why);
  }
  for (auto& p : peers) {
    for (auto& lane : p->lanes) lane->join();
  }

  std::lock_guard<std::mutex> lock(m.conns_mu);
  for (auto& c : m.conns) ::shutdown(c->fd, SHUT_RDWR);
  for (auto& c : m.conns) {
    if (c->thread.joinable()) c->thread.join();
    ::close(c->fd);
  }
  m.conns.clear();
}

void TcpTransport::fill_metadata(EngineMetadata* md) const {
  md->tcp_host = impl_->host;
  md->tcp_port = impl_->port;
}

Status TcpTransport::connect(std::shared_ptr<const PeerRecord> peer) {
  Impl& m = *impl_;
  if (peer == nullptr) return BANASERVE_INVALID("tcp connect: null peer");
  const EngineMetadata& md = peer->metadata;
  if (md.tcp_host.empty() || md.tcp_port == 0) {
    return BANASERVE_STATUS(StatusCode::kUnavailable,
                            "tcp: peer " + md.engine_id + " publishes no tcp endpoint");
  }
  if (!m.started || m.stopping.load()) {
    return BANASERVE_STATUS(StatusCode::kUnavailable, "tcp transport not running");
  }
  std::shared_ptr<PeerConn> old;
  {
    std::lock_guard<std::mutex> lock(m.peers_mu);
    // Join lanes of forgotten peers whose threads have finished.
    for (auto it = m.retired.begin(); it != m.retired.end();) {
      bool all = std::all_of((*it)->lanes.begin(), (*it)->lanes.end(),
                             [](const std::unique_ptr<Lane>& l) { return l->exited(); });
      if (all) {
        for (auto& l : (*it)->lanes) l->join();
        it = m.retired.erase(it);
      } else {
        ++it;
      }
    }
    auto it = m.peers.find(md.engine_id);
    if (it != m.peers.end()) {
      if (it->second->host == md.tcp_host && it->second->port == md.tcp_port) return Status();
      old = it->second;
      m.retired.push_back(old);
      m.peers.erase(it);
    }
    auto pc = std::make_shared<PeerConn>();
    pc->engine_id = md.engine_id;
    pc->host = md.tcp_host;
    pc->port = md.tcp_port;
    int n = m.lanes_per_peer();
    for (int i = 0; i < n; ++i) {
      pc->lanes.push_back(std::make_unique<Lane>(&m, md.engine_id, md.tcp_host, md.tcp_port));
      pc->lanes.back()->start();
    }
    m.peers.emplace(md.engine_id, std::move(pc));
  }
  if (old != nullptr) {
    const Status why = BANASERVE_STATUS(StatusCode::kUnavailable,
                                        "tcp: peer " + md.engine_id + " changed its endpoint");
    for (auto& lane : old->lanes) lane->shut(why);
  }
  return Status();
}

void TcpTransport::disconnect(const std::string& engine_id) {
  Impl& m = *impl_;
  std::shared_ptr<PeerConn> pc;
  {
    std::lock_guard<std::mutex> lock(m.peers_mu);
    auto it = m.peers.find(engine_id);
    if (it == m.peers.end()) return;
    pc = it->second;
    m.peers.erase(it);
    m.retired.push_back(pc);  // joined later: we may be running on one of its threads
  }
  const Status why = BANASERVE_STATUS(StatusCode::kUnavailable, "tcp: peer " + engine_id + " disconnected");
  for (auto& lane : pc->lanes) lane->shut(why);
}

void TcpTransport::post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
                        std::vector<CopyRun> runs) {
  Impl& m = *impl_;
  const std::string& id = peer.metadata.engine_id;
  std::shared_ptr<PeerConn> pc;
  {
    std::lock_guard<std::mutex> lock(m.peers_mu);
    auto it = m.peers.find(id);
    if (it != m.peers.end()) pc = it->second;
  }
  if (pc == nullptr || pc->host != peer.metadata.tcp_host || pc->port != peer.metadata.tcp_port) {
    auto record = std::make_shared<PeerRecord>(peer);
    Status s = connect(record);
    if (s.ok()) {
      std::lock_guard<std::mutex> lock(m.peers_mu);
      auto it = m.peers.find(id);
      if (it != m.peers.end()) pc = it->second;
    }
    if (pc == nullptr) {
      batch->complete_part(s.ok() ? BANASERVE_STATUS(StatusCode::kUnavailable, "tcp: peer gone") : s);
      return;
    }
  }
  batch->mark_running();
  const uint64_t total = total_nbytes(runs.data(), runs.size());
  const size_t nlanes = pc->lanes.size();
  std::vector<std::pair<size_t, size_t>> ranges;
  if (nlanes > 1 && total >= 2 * kSplitMinPart) {
    ranges = split_runs(&runs, nlanes, kSplitMinPart);
  }
  if (ranges.empty()) ranges.emplace_back(0, runs.size());
  std::vector<std::shared_ptr<Part>> parts;
  parts.reserve(ranges.size());
  for (auto& r : ranges) {
    auto p = std::make_shared<Part>();
    p->batch = batch;
    p->batch_nbytes = total;
    if (ranges.size() == 1) {
      p->runs = std::move(runs);
    } else {
      p->runs.assign(runs.begin() + static_cast<std::ptrdiff_t>(r.first),
                     runs.begin() + static_cast<std::ptrdiff_t>(r.second));
    }
    parts.push_back(std::move(p));
  }
  if (parts.size() != 1) batch->set_parts(static_cast<uint32_t>(parts.size()));
  uint32_t first = pc->next_lane.fetch_add(1, std::memory_order_relaxed);
  for (size_t i = 0; i < parts.size(); ++i) {
    pc->lanes[(first + i) % nlanes]->submit(std::move(parts[i]));
  }
}

std::unique_ptr<Transport> make_tcp_transport() { return std::make_unique<TcpTransport>(); }

}  // namespace banaserve::transfer
