// SPDX-License-Identifier: Apache-2.0
// Tests of the tcp backend with two real TcpTransport instances on 127.0.0.1 (real sockets,
// real threads), each with its own hand-made TransportContext (regions, inbox, counters).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "check.h"
#include "tcp_transport.h"
#include "wire.h"

using namespace banaserve;
using namespace banaserve::transfer;
namespace w = banaserve::transfer::tcp_wire;

namespace {

/// One side: a TcpTransport plus the engine state it needs, and one registered buffer.
class Node {
 public:
  Node(const std::string& id, size_t nbytes, int lanes = 2) : mem_(nbytes) {
    config_.engine_id = id;
    config_.tcp_host = "127.0.0.1";
    config_.tcp_lanes = lanes;
    config_.default_timeout_ms = 5000;
    self_.engine_id = id;
    RegionInfo r;
    r.id = 1;
    r.addr = base();
    r.nbytes = nbytes;
    regions_ = std::make_shared<RegionTable>(std::vector<RegionInfo>{r});
  }
  ~Node() { transport_.stop(); }

  Status start() {
    TransportContext ctx;
    ctx.config = &config_;
    ctx.self = &self_;
    ctx.engine = this;
    ctx.local_regions = [](void* e) { return static_cast<Node*>(e)->regions(); };
    ctx.inbox = &inbox_;
    ctx.counters = &counters_;
    ctx.peer_lost = [](void* e, const std::string& id, const Status& why) {
      auto* n = static_cast<Node*>(e);
      std::lock_guard<std::mutex> lock(n->mu_);
      n->lost_.push_back(id);
    };
    BANASERVE_RETURN_IF_ERROR(transport_.start(ctx));
    transport_.fill_metadata(&self_);
    return Status();
  }

  std::shared_ptr<const RegionTable> regions() {
    std::lock_guard<std::mutex> lock(mu_);
    return regions_;
  }
  std::shared_ptr<PeerRecord> record() {
    auto r = std::make_shared<PeerRecord>();
    r->metadata = self_;
    r->regions = *regions();
    return r;
  }
  size_t lost() {
    std::lock_guard<std::mutex> lock(mu_);
    return lost_.size();
  }

  uint64_t base() const { return reinterpret_cast<uint64_t>(mem_.data()); }
  uint8_t* data() { return mem_.data(); }
  size_t size() const { return mem_.size(); }
  TcpTransport& transport() { return transport_; }
  TransferCounters& counters() { return counters_; }
  Inbox& inbox() { return inbox_; }
  const std::string& id() const { return self_.engine_id; }
  uint16_t port() const { return self_.tcp_port; }

 private:
  std::vector<uint8_t> mem_;
  EngineConfig config_;
  EngineMetadata self_;
  std::mutex mu_;
  std::shared_ptr<const RegionTable> regions_;
  std::vector<std::string> lost_;
  Inbox inbox_;
  TransferCounters counters_;
  TcpTransport transport_;
};

uint64_t next_id() {
  static std::atomic<uint64_t> id{1};
  return id.fetch_add(1);
}

std::shared_ptr<Batch> post(Node& from, Node& to, Op op, std::vector<CopyRun> runs,
                            NotifyTag tag = {}) {
  uint64_t n = total_nbytes(runs.data(), runs.size());
  auto batch = std::make_shared<Batch>(next_id(), op, to.id(), n, 0, tag);
  batch->mark_running();
  from.transport().post(*to.record(), batch, std::move(runs));
  return batch;
}

void fill_pattern(uint8_t* p, size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(rng());
}

template <typename Pred>
bool eventually(Pred pred, int timeout_ms = 5000) {
  auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return pred();
}

/// A raw client socket to a node's listener.
int raw_connect(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

void raw_send(int fd, const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    ssize_t r = ::send(fd, b, n, MSG_NOSIGNAL);
    if (r <= 0) return;
    b += r;
    n -= static_cast<size_t>(r);
  }
}

std::vector<uint8_t> hello_bytes(const std::string& id) {
  std::vector<uint8_t> out(w::kHeaderSize + id.size());
  w::FrameHeader h;
  h.type = w::FrameType::kHello;
  h.payload_nbytes = id.size();
  w::encode_header(h, out.data());
  std::memcpy(out.data() + w::kHeaderSize, id.data(), id.size());
  return out;
}

/// Reads until EOF (the server dropped us) or timeout; true on EOF/reset.
bool raw_sees_close(int fd, int timeout_ms = 5000) {
  timeval tv{timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  uint8_t buf[256];
  for (;;) {
    ssize_t r = ::recv(fd, buf, sizeof(buf), 0);
    if (r == 0) return true;
    if (r < 0) return errno == ECONNRESET;
  }
}

/// A write from a to b and back with verification: proves a connection still serves.
bool round_trip_ok(Node& a, Node& b, uint32_t seed) {
  fill_pattern(a.data(), 4096, seed);
  auto batch = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base() + 8192, 4096}});
  if (!batch->wait(5000).ok()) return false;
  return std::memcmp(a.data(), b.data() + 8192, 4096) == 0;
}

}  // namespace

TEST_CASE(write_and_read_odd_sizes_and_empty_runs) {
  Node a("A", 1 << 20), b("B", 1 << 20);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  CHECK_OK(a.transport().connect(b.record()));
  fill_pattern(a.data(), a.size(), 1);
  std::memset(b.data(), 0xEE, b.size());
  // Odd sizes, a zero-length run, runs out of order on the remote side.
  std::vector<CopyRun> runs{{a.base() + 1, b.base() + 500000, 1},
                            {a.base() + 100, b.base() + 7, 4097},
                            {a.base() + 9000, b.base() + 9000, 0},
                            {a.base() + 20000, b.base() + 300001, 16387},
                            {a.base() + 70000, b.base() + 100000, 65536}};
  auto batch = post(a, b, Op::kWrite, runs);
  CHECK_OK(batch->wait(5000));
  CHECK(batch->state() == TransferState::kDone);
  std::vector<uint8_t> expect(b.size(), 0xEE);
  for (const auto& r : runs) {
    std::memcpy(expect.data() + (r.remote_addr - b.base()),
                reinterpret_cast<const void*>(r.local_addr), r.nbytes);
  }
  CHECK(std::memcmp(expect.data(), b.data(), b.size()) == 0);  // and nothing else touched
  CHECK_EQ(b.counters().bytes_served.load(), uint64_t{1 + 4097 + 16387 + 65536});
  CHECK_EQ(a.counters().bytes_written.load(), uint64_t{1 + 4097 + 16387 + 65536});

  // Read back into another part of a.
  fill_pattern(b.data(), b.size(), 2);
  std::vector<CopyRun> back{{a.base() + 600000, b.base() + 3, 3},
                            {a.base() + 600100, b.base() + 123457, 0},
                            {a.base() + 700000, b.base() + 200001, 40001}};
  std::vector<uint8_t> before(a.data(), a.data() + a.size());
  auto rb = post(a, b, Op::kRead, back);
  CHECK_OK(rb->wait(5000));
  for (const auto& r : back) {
    std::memcpy(before.data() + (r.local_addr - a.base()),
                reinterpret_cast<const void*>(r.remote_addr), r.nbytes);
  }
  CHECK(std::memcmp(before.data(), a.data(), a.size()) == 0);
  CHECK_EQ(a.counters().bytes_read.load(), uint64_t{40004});
  // An empty batch completes too.
  auto empty = post(a, b, Op::kWrite, {});
  CHECK_OK(empty->wait(5000));
}

TEST_CASE(big_scattered_batches_split_across_lanes) {
  const size_t page = 16384, pages = 1000;
  Node a("A", pages * page * 2, 2), b("B", pages * page * 2, 2);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  std::mt19937 rng(7);
  std::vector<size_t> src(pages * 2), dst(pages * 2);
  for (size_t i = 0; i < src.size(); ++i) src[i] = dst[i] = i;
  std::shuffle(src.begin(), src.end(), rng);
  std::shuffle(dst.begin(), dst.end(), rng);
  std::vector<CopyRun> runs;
  for (size_t i = 0; i < pages; ++i) {
    runs.push_back(CopyRun{a.base() + src[i] * page, b.base() + dst[i] * page, page});
  }
  fill_pattern(a.data(), a.size(), 3);
  std::memset(b.data(), 0, b.size());
  auto wb = post(a, b, Op::kWrite, runs);
  CHECK_OK(wb->wait(10000));
  bool same = true;
  for (const auto& r : runs) {
    same &= std::memcmp(reinterpret_cast<void*>(r.local_addr), reinterpret_cast<void*>(r.remote_addr),
                        page) == 0;
  }
  CHECK(same);
  // Read them back into zeroed local pages.
  std::memset(a.data(), 0, a.size());
  auto rb = post(a, b, Op::kRead, runs);
  CHECK_OK(rb->wait(10000));
  same = true;
  for (const auto& r : runs) {
    same &= std::memcmp(reinterpret_cast<void*>(r.local_addr), reinterpret_cast<void*>(r.remote_addr),
                        page) == 0;
  }
  CHECK(same);
  // One contiguous run larger than a frame: several frames, one part per lane.
  fill_pattern(a.data(), 12 << 20, 4);
  auto big = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base() + 1, 12 << 20}});
  CHECK_OK(big->wait(10000));
  CHECK(std::memcmp(a.data(), b.data() + 1, 12 << 20) == 0);
}

TEST_CASE(notification_after_all_bytes) {
  Node a("A", 16 << 20), b("B", 16 << 20);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  auto stream = b.inbox().expect(42, 2, "A", now_ns() + 10000000000ull);
  fill_pattern(a.data(), a.size(), 5);
  // Layer 0: small (one frame). Layer 1: 10 MiB (several frames over two lanes).
  auto l0 = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base(), 4096}}, NotifyTag{42, 0, 2});
  auto l1 = post(a, b, Op::kWrite, {CopyRun{a.base() + 4096, b.base() + 4096, 10 << 20}},
                 NotifyTag{42, 1, 2});
  CHECK_OK(l0->wait(5000));
  CHECK_OK(l1->wait(10000));
  CHECK_OK(stream->wait_layer(0, 5000));
  CHECK_OK(stream->wait_all(5000));
  CHECK(std::memcmp(a.data(), b.data(), (10 << 20) + 4096) == 0);
  // A layer sent into a stream that was cancelled: bytes discarded, sender told.
  auto s2 = b.inbox().expect(43, 1, "A", now_ns() + 10000000000ull);
  s2->cancel();
  std::memset(b.data(), 0, 65536);
  auto l2 = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base(), 65536}}, NotifyTag{43, 0, 1});
  CHECK(!l2->wait(5000).ok());
  CHECK(l2->state() == TransferState::kFailed || l2->state() == TransferState::kCancelled);
  std::vector<uint8_t> zeros(65536, 0);
  CHECK(std::memcmp(zeros.data(), b.data(), zeros.size()) == 0);
}

TEST_CASE(unregistered_remote_range_is_rejected_before_any_byte) {
  Node a("A", 1 << 20), b("B", 1 << 20);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  fill_pattern(a.data(), a.size(), 6);
  std::memset(b.data(), 0, b.size());
  // First run valid, second crosses the end of b's region: nothing of the frame may land.
  auto bad = post(a, b, Op::kWrite,
                  {CopyRun{a.base(), b.base(), 4096}, CopyRun{a.base(), b.base() + b.size() - 100, 4096}});
  CHECK_CODE(bad->wait(5000), StatusCode::kInvalidArgument);
  CHECK(bad->state() == TransferState::kFailed);
  std::vector<uint8_t> zeros(b.size(), 0);
  CHECK(std::memcmp(zeros.data(), b.data(), b.size()) == 0);
  CHECK_EQ(b.counters().frames_rejected.load(), uint64_t{1});
  // A read from memory b never registered.
  static uint8_t unregistered[4096];
  auto bad_read = post(a, b, Op::kRead,
                       {CopyRun{a.base(), reinterpret_cast<uint64_t>(unregistered), 4096}});
  CHECK_CODE(bad_read->wait(5000), StatusCode::kInvalidArgument);
  CHECK_EQ(b.counters().frames_rejected.load(), uint64_t{2});
  CHECK_EQ(b.counters().connections_dropped.load(), uint64_t{0});
  // The same connections keep serving.
  CHECK(round_trip_ok(a, b, 11));
}

TEST_CASE(malformed_frames_drop_only_that_connection) {
  Node a("A", 1 << 20), b("B", 1 << 20);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  CHECK(round_trip_ok(a, b, 12));
  std::memset(b.data(), 0x5A, b.size());
  std::vector<uint8_t> snapshot(b.data(), b.data() + b.size());
  uint64_t dropped = 0;

  auto expect_dropped = [&](const std::vector<uint8_t>& bytes, bool close_after) {
    int fd = raw_connect(b.port());
    CHECK(fd >= 0);
    raw_send(fd, bytes.data(), bytes.size());
    if (close_after) ::shutdown(fd, SHUT_WR);
    CHECK(raw_sees_close(fd));
    ::close(fd);
    ++dropped;
    CHECK(eventually([&] { return b.counters().connections_dropped.load() == dropped; }));
  };
  // 1. Garbage instead of HELLO.
  std::vector<uint8_t> garbage(200);
  fill_pattern(garbage.data(), garbage.size(), 13);
  expect_dropped(garbage, false);
  // 2. Truncated HELLO header, then EOF.
  auto hello = hello_bytes("raw");
  expect_dropped(std::vector<uint8_t>(hello.begin(), hello.begin() + 20), true);
  // 3. Valid HELLO, then a WRITE with a bad magic.
  std::vector<uint8_t> f = hello;
  w::FrameHeader h;
  h.type = w::FrameType::kWrite;
  h.run_count = 1;
  h.payload_nbytes = 16;
  h.batch_nbytes = 16;
  std::vector<uint8_t> frame(w::kHeaderSize + w::kRunEntrySize);
  w::encode_header(h, frame.data());
  w::encode_run(w::WireRun{b.base(), 16}, frame.data() + w::kHeaderSize);
  std::vector<uint8_t> bad_magic = frame;
  bad_magic[0] ^= 0xff;
  f.insert(f.end(), bad_magic.begin(), bad_magic.end());
  expect_dropped(f, false);
  // 4. Valid HELLO, WRITE header claiming too many runs.
  w::FrameHeader huge = h;
  huge.run_count = w::kMaxRunsPerFrame + 1;
  f = hello;
  f.resize(f.size() + w::kHeaderSize);
  w::encode_header(huge, f.data() + hello.size());
  expect_dropped(f, false);
  // 5. Run lengths that do not add up to the payload.
  f = hello;
  std::vector<uint8_t> mismatch = frame;
  w::encode_run(w::WireRun{b.base(), 15}, mismatch.data() + w::kHeaderSize);
  f.insert(f.end(), mismatch.begin(), mismatch.end());
  expect_dropped(f, false);
  // 6. A valid WRITE cut short inside its payload (EOF mid-frame).
  f = hello;
  f.insert(f.end(), frame.begin(), frame.end());
  f.insert(f.end(), 10, 0x11);  // 10 of 16 payload bytes
  expect_dropped(f, true);
  // 7. A valid WRITE whose trailer is garbage.
  f = hello;
  f.insert(f.end(), frame.begin(), frame.end());
  f.insert(f.end(), 16, 0x22);
  f.insert(f.end(), 8, 0x33);
  expect_dropped(f, false);

  CHECK(b.counters().frames_rejected.load() >= 6);
  // Bytes of frames cut short may have landed only where the frame pointed (6, 7): nowhere else.
  CHECK(std::memcmp(snapshot.data() + 16, b.data() + 16, b.size() - 16) == 0);
  // A peer that connects and leaves without a word is not an error.
  int fd = raw_connect(b.port());
  ::close(fd);
  // The listener and the existing connections still serve.
  CHECK(round_trip_ok(a, b, 14));
  Node c("C", 1 << 20);
  CHECK_OK(c.start());
  CHECK(round_trip_ok(c, b, 15));
  CHECK_EQ(b.counters().connections_dropped.load(), dropped);
}

TEST_CASE(dead_peer_fails_batches_and_reports_loss) {
  Node a("A", 32 << 20), b("B", 32 << 20);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  CHECK(round_trip_ok(a, b, 16));
  // Peer dies while a big transfer is in flight.
  std::vector<CopyRun> runs;
  for (int i = 0; i < 8; ++i) {
    runs.push_back(CopyRun{a.base() + (uint64_t{4} << 20) * i, b.base() + (uint64_t{4} << 20) * i, 4 << 20});
  }
  std::vector<std::shared_ptr<Batch>> batches;
  for (int i = 0; i < 8; ++i) batches.push_back(post(a, b, Op::kWrite, runs));
  b.transport().stop();
  for (auto& bt : batches) {
    Status s = bt->wait(5000);
    CHECK(s.code() != StatusCode::kTimeout);
    CHECK(bt->state() == TransferState::kDone || s.code() == StatusCode::kUnavailable);
  }
  CHECK(eventually([&] { return a.lost() >= 1; }));
  // Posting to the dead peer: connection refused → kUnavailable, reported again.
  size_t lost = a.lost();
  auto late = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base(), 4096}});
  CHECK_CODE(late->wait(5000), StatusCode::kUnavailable);
  CHECK(a.lost() > lost);
}

TEST_CASE(connect_never_blocks_and_checks_endpoint) {
  Node a("A", 1 << 20);
  CHECK_OK(a.start());
  auto rec = std::make_shared<PeerRecord>();
  rec->metadata.engine_id = "nowhere";
  CHECK_CODE(a.transport().connect(rec), StatusCode::kUnavailable);  // no tcp endpoint
  // A port nobody listens on: connect() returns at once; the post fails with kUnavailable.
  int probe = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(probe, reinterpret_cast<sockaddr*>(&sa), sizeof(sa));
  socklen_t len = sizeof(sa);
  ::getsockname(probe, reinterpret_cast<sockaddr*>(&sa), &len);
  ::close(probe);
  rec->metadata.tcp_host = "127.0.0.1";
  rec->metadata.tcp_port = ntohs(sa.sin_port);
  auto t0 = std::chrono::steady_clock::now();
  CHECK_OK(a.transport().connect(rec));
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(1));
  auto batch = std::make_shared<Batch>(next_id(), Op::kWrite, "nowhere", 16, 0, NotifyTag{});
  a.transport().post(*rec, batch, {CopyRun{a.base(), 0x1000, 16}});
  CHECK_CODE(batch->wait(5000), StatusCode::kUnavailable);
  CHECK(a.lost() >= 1);
}

TEST_CASE(cancel_and_abort_contract) {
  const size_t n = 48 << 20;
  Node a("A", n), b("B", n);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  CHECK(round_trip_ok(a, b, 17));
  // Cancel right after posting a many-frame write: ends CANCELLED (or DONE if it had finished).
  auto wb = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base(), n}});
  wb->cancel();
  Status s = wb->wait(10000);
  CHECK(s.code() != StatusCode::kTimeout);
  CHECK(wb->state() == TransferState::kCancelled || wb->state() == TransferState::kDone);

  // Abort a big read: after abort() returns, the local memory is never written again.
  std::memset(a.data(), 0, n);
  std::memset(b.data(), 0xAB, n);
  auto rb = post(a, b, Op::kRead, {CopyRun{a.base(), b.base(), n}});
  std::this_thread::sleep_for(std::chrono::milliseconds(2));
  rb->abort(BANASERVE_STATUS(StatusCode::kTimeout, "test deadline"));
  CHECK(is_terminal(rb->state()));
  std::vector<uint8_t> after_abort(a.data(), a.data() + n);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(std::memcmp(after_abort.data(), a.data(), n) == 0);
  // Abort a big write: the lane finishes the frame with zeros + a CANCELLED trailer and keeps
  // serving.
  auto wb2 = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base(), n}});
  rb->abort(BANASERVE_STATUS(StatusCode::kTimeout, "test deadline"));
  wb2->abort(BANASERVE_STATUS(StatusCode::kTimeout, "test deadline"));
  CHECK(is_terminal(wb2->state()));
  CHECK(round_trip_ok(a, b, 18));
}

TEST_CASE(stop_completes_everything_in_flight) {
  Node a("A", 32 << 20), b("B", 32 << 20);
  CHECK_OK(a.start());
  CHECK_OK(b.start());
  std::vector<std::shared_ptr<Batch>> batches;
  for (int i = 0; i < 6; ++i) {
    batches.push_back(post(a, b, i % 2 ? Op::kRead : Op::kWrite, {CopyRun{a.base(), b.base(), 32 << 20}}));
  }
  a.transport().stop();
  for (auto& bt : batches) {
    CHECK(is_terminal(bt->state()));
    CHECK(bt->state() == TransferState::kDone || bt->status().code() == StatusCode::kUnavailable);
  }
  auto after = post(a, b, Op::kWrite, {CopyRun{a.base(), b.base(), 16}});
  CHECK_CODE(after->wait(1000), StatusCode::kUnavailable);
}

int main() { return banaserve::testing::run_all(); }
