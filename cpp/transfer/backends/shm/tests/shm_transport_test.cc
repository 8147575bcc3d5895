// SPDX-License-Identifier: Apache-2.0
// ShmTransport between real processes: the parent is the initiator, forked children are peers
// that own a memfd region (the mapped path) and a plain aligned_alloc region (the CMA path), run
// their own ShmTransport (delivery thread, inbox) and answer commands over pipes. Every byte the
// parent writes is checked by the child (hash of its whole region against the parent's mirror)
// and read back by the parent.
#include "backends/shm/shm_transport.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "backends/shm/control_ring.h"
#include "test_util.h"

namespace banaserve::transfer {
namespace {

constexpr uint64_t kRegionBytes = 8 << 20;  // each of the child's two regions (default)

uint64_t addr_of(const void* p) { return reinterpret_cast<uint64_t>(p); }

unsigned char pattern_byte(uint64_t seed, uint64_t i) {
  uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ULL ^ (seed * 0xBF58476D1CE4E5B9ULL);
  return static_cast<unsigned char>(x >> 56);
}

void fill_pattern(unsigned char* p, uint64_t n, uint64_t seed) {
  for (uint64_t i = 0; i < n; ++i) p[i] = pattern_byte(seed, i);
}

uint64_t fnv(const unsigned char* p, uint64_t n) {
  uint64_t h = 1469598103934665603ULL;
  for (uint64_t i = 0; i < n; ++i) h = (h ^ p[i]) * 1099511628211ULL;
  return h;
}

unsigned char* alloc_plain(uint64_t n, uint64_t seed) {
  auto* p = static_cast<unsigned char*>(std::aligned_alloc(4096, n));
  CHECK(p != nullptr);
  fill_pattern(p, n, seed);  // also pre-faults
  return p;
}

// ---- one side of a test: a transport with the context an engine would give it ---------------

struct Node {
  EngineConfig config;
  EngineMetadata self;
  Inbox inbox;
  TransferCounters counters;
  std::shared_ptr<const RegionTable> table = std::make_shared<RegionTable>();
  std::mutex mu;
  std::vector<std::string> lost;  // guarded by mu
  ShmTransport transport;

  Node() {
    config.copy_threads = 2;
    config.peer_check_interval_ms = 20;
  }

  Status start(const std::string& id) {
    self.engine_id = id;
    self.pid = static_cast<int32_t>(getpid());
    TransportContext ctx;
    ctx.config = &config;
    ctx.self = &self;
    ctx.local_regions = [](void* e) { return static_cast<Node*>(e)->table; };
    ctx.engine = this;
    ctx.inbox = &inbox;
    ctx.counters = &counters;
    ctx.peer_lost = [](void* e, const std::string& peer, const Status&) {
      auto* n = static_cast<Node*>(e);
      std::lock_guard<std::mutex> lock(n->mu);
      n->lost.push_back(peer);
    };
    BANASERVE_RETURN_IF_ERROR(transport.start(ctx));
    transport.fill_metadata(&self);
    return Status();
  }
  size_t lost_count(const std::string& peer) {
    std::lock_guard<std::mutex> lock(mu);
    return static_cast<size_t>(std::count(lost.begin(), lost.end(), peer));
  }
};

// ---- the peer process -------------------------------------------------------------------------

struct WireRegion {
  uint64_t id, addr, nbytes;
  int32_t shm_fd;
};
struct WireMeta {
  int32_t pid;
  int32_t control_fd;
  char engine_id[64];
  WireRegion regions[2];  // [0] memfd (mapped path), [1] plain memory (CMA path)
};
enum Cmd : uint32_t { kHash = 1, kExpect = 2, kNoticesSeen = 3, kQuit = 4 };
struct Msg {
  uint32_t cmd;
  uint64_t a, b, c;
};
struct Reply {
  int64_t code;
  uint64_t value;
};

void write_all(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    ssize_t w = write(fd, c, n);
    CHECK(w > 0);
    c += w;
    n -= static_cast<size_t>(w);
  }
}
bool read_all(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    ssize_t r = read(fd, c, n);
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

/// How a child publishes itself.
enum class ChildMode { kServe, kNoConsumer };

[[noreturn]] void child_main(int in_fd, int out_fd, const std::string& id, const std::string& parent,
                             ChildMode mode, uint64_t region_bytes) {
  const uint64_t kMappedBytes = region_bytes, kPlainBytes = region_bytes;
  // memfd region, like Engine::allocate.
  int mfd = static_cast<int>(syscall(SYS_memfd_create, "test-region", 0));
  CHECK(mfd >= 0);
  CHECK(ftruncate(mfd, static_cast<off_t>(kMappedBytes)) == 0);
  auto* mapped = static_cast<unsigned char*>(mmap(nullptr, kMappedBytes, PROT_READ | PROT_WRITE,
                                                  MAP_SHARED | MAP_POPULATE, mfd, 0));
  CHECK(mapped != MAP_FAILED);
  fill_pattern(mapped, kMappedBytes, 1);
  unsigned char* plain = alloc_plain(kPlainBytes, 2);

  Node node;
  WireMeta meta{};
  meta.pid = static_cast<int32_t>(getpid());
  std::snprintf(meta.engine_id, sizeof(meta.engine_id), "%s", id.c_str());
  meta.regions[0] = {1, addr_of(mapped), kMappedBytes, mfd};
  meta.regions[1] = {2, addr_of(plain), kPlainBytes, -1};
  int control_fd = -1;
  void* control_mem = nullptr;
  size_t control_nbytes = shm::control_area_nbytes(8);
  if (mode == ChildMode::kServe) {
    CHECK_OK(node.start(id));
    control_fd = node.self.control_fd;
  } else {
    // A control area nobody drains: the ring fills up.
    control_fd = static_cast<int>(syscall(SYS_memfd_create, "test-control", 0));
    CHECK(ftruncate(control_fd, static_cast<off_t>(control_nbytes)) == 0);
    control_mem = mmap(nullptr, control_nbytes, PROT_READ | PROT_WRITE, MAP_SHARED, control_fd, 0);
    CHECK(control_mem != MAP_FAILED);
    CHECK_OK(shm::ControlRing::init(control_mem, control_nbytes, 8, meta.pid, id).status());
  }
  meta.control_fd = control_fd;
  write_all(out_fd, &meta, sizeof(meta));

  Msg msg;
  while (read_all(in_fd, &msg, sizeof(msg))) {
    Reply rep{0, 0};
    if (msg.cmd == kHash) {
      rep.value = msg.a == 0 ? fnv(mapped, kMappedBytes) : fnv(plain, kPlainBytes);
    } else if (msg.cmd == kExpect) {
      auto stream = node.inbox.expect(msg.a, static_cast<uint32_t>(msg.b), parent, 0);
      Status st = stream->wait_all(static_cast<int64_t>(msg.c));
      rep.code = static_cast<int64_t>(st.code());
      rep.value = stream->layers_done();
    } else if (msg.cmd == kNoticesSeen) {
      // Read our own control ring's consumer position: exactly one notice per tagged batch.
      std::string path = "/proc/self/fd/" + std::to_string(control_fd);
      int f = open(path.c_str(), O_RDONLY);
      CHECK(f >= 0);
      void* m = mmap(nullptr, sizeof(shm::ControlHeader), PROT_READ, MAP_SHARED, f, 0);
      CHECK(m != MAP_FAILED);
      auto* hdr = static_cast<shm::ControlHeader*>(m);
      rep.value = hdr->dequeue_pos.load();
      rep.code = static_cast<int64_t>(hdr->enqueue_pos.load());
      munmap(m, sizeof(shm::ControlHeader));
      close(f);
    } else if (msg.cmd == kQuit) {
      write_all(out_fd, &rep, sizeof(rep));
      break;
    }
    write_all(out_fd, &rep, sizeof(rep));
  }
  node.transport.stop();
  _exit(0);
}

struct Child {
  pid_t pid = -1;
  int to = -1, from = -1;
  std::shared_ptr<PeerRecord> record;
  WireMeta meta{};
  std::vector<unsigned char> mirror[2];  // expected content of the child's two regions

  Reply call(Cmd cmd, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0) {
    Msg m{cmd, a, b, c};
    write_all(to, &m, sizeof(m));
    Reply r{};
    CHECK(read_all(from, &r, sizeof(r)));
    return r;
  }
  uint64_t region_addr(int r) const { return meta.regions[r].addr; }
  void check_region(int r) {
    CHECK_EQ(call(kHash, static_cast<uint64_t>(r)).value, fnv(mirror[r].data(), mirror[r].size()));
  }
  void quit() {
    if (pid <= 0) return;
    call(kQuit);
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    close(to);
    close(from);
    pid = -1;
  }
  void kill_now() {
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    close(to);
    close(from);
    pid = -1;
  }
};

/// Forks a peer. Call before the parent's transport starts threads.
Child spawn(const std::string& id, const std::string& parent, ChildMode mode = ChildMode::kServe,
            uint64_t region_bytes = kRegionBytes) {
  const uint64_t kMappedBytes = region_bytes, kPlainBytes = region_bytes;
  int down[2], up[2];
  CHECK(pipe(down) == 0 && pipe(up) == 0);
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    close(down[1]);
    close(up[0]);
    child_main(down[0], up[1], id, parent, mode, region_bytes);
  }
  close(down[0]);
  close(up[1]);
  Child c;
  c.pid = pid;
  c.to = down[1];
  c.from = up[0];
  CHECK(read_all(c.from, &c.meta, sizeof(c.meta)));
  c.record = std::make_shared<PeerRecord>();
  c.record->metadata.engine_id = c.meta.engine_id;
  c.record->metadata.pid = c.meta.pid;
  c.record->metadata.control_fd = c.meta.control_fd;
  c.record->same_host = true;
  for (const WireRegion& w : c.meta.regions) {
    RegionInfo r;
    r.id = w.id;
    r.addr = w.addr;
    r.nbytes = w.nbytes;
    r.shm_fd = w.shm_fd;
    c.record->metadata.regions.push_back(r);
    CHECK_OK(c.record->regions.insert(r));
  }
  c.mirror[0].resize(kMappedBytes);
  fill_pattern(c.mirror[0].data(), kMappedBytes, 1);
  c.mirror[1].resize(kPlainBytes);
  fill_pattern(c.mirror[1].data(), kPlainBytes, 2);
  return c;
}

std::atomic<uint64_t> g_batch_id{1};

std::shared_ptr<Batch> post(Node& n, const Child& c, Op op, std::vector<CopyRun> runs,
                            NotifyTag tag = {}, bool cancel_first = false) {
  uint64_t total = total_nbytes(runs.data(), runs.size());
  auto b = std::make_shared<Batch>(g_batch_id++, op, c.record->metadata.engine_id, total, 0, tag);
  if (cancel_first) b->cancel();
  n.transport.post(*c.record, b, std::move(runs));
  return b;
}

/// Local buffer of the parent with its registration.
struct Local {
  unsigned char* p;
  uint64_t n;
  explicit Local(Node& node, uint64_t nbytes, uint64_t seed) : p(alloc_plain(nbytes, seed)), n(nbytes) {
    RegionInfo r;
    r.id = 100 + seed;
    r.addr = addr_of(p);
    r.nbytes = nbytes;
    auto t = std::make_shared<RegionTable>(*node.table);
    CHECK_OK(t->insert(r));
    node.table = t;
  }
  ~Local() { std::free(p); }
};

/// Writes runs (local → child region r), checks the child's bytes, reads them back and compares.
void write_verify_read(Node& node, Child& c, int r, Local& src, Local& dst,
                       const std::vector<CopyRun>& runs) {
  CHECK_OK(post(node, c, Op::kWrite, runs)->wait(20000));
  for (const CopyRun& run : runs) {
    std::memcpy(c.mirror[r].data() + (run.remote_addr - c.region_addr(r)),
                reinterpret_cast<void*>(run.local_addr), run.nbytes);
  }
  c.check_region(r);
  std::vector<CopyRun> back;
  for (const CopyRun& run : runs) {
    back.push_back({run.local_addr - addr_of(src.p) + addr_of(dst.p), run.remote_addr, run.nbytes});
  }
  std::memset(dst.p, 0, dst.n);
  CHECK_OK(post(node, c, Op::kRead, back)->wait(20000));
  for (const CopyRun& run : back) {
    const unsigned char* want = c.mirror[r].data() + (run.remote_addr - c.region_addr(r));
    CHECK(std::memcmp(reinterpret_cast<void*>(run.local_addr), want, run.nbytes) == 0);
  }
}

std::vector<CopyRun> random_pages(uint64_t local_base, uint64_t remote_base, uint64_t slots,
                                  uint64_t page, size_t count, uint64_t seed) {
  std::vector<uint64_t> l(slots), r(slots);
  for (uint64_t i = 0; i < slots; ++i) l[i] = r[i] = i;
  std::mt19937_64 gen(seed);
  std::shuffle(l.begin(), l.end(), gen);
  std::shuffle(r.begin(), r.end(), gen);
  std::vector<CopyRun> runs;
  for (size_t i = 0; i < count; ++i) {
    runs.push_back({local_base + l[i] * page, remote_base + r[i] * page, page});
  }
  return runs;
}

void round_trips_on_region(int r) {
  Child c = spawn("peer-rt", "parent");
  Node node;
  CHECK_OK(node.start("parent"));
  Local src(node, 8 << 20, 7), dst(node, 8 << 20, 8);
  CHECK_OK(node.transport.connect(c.record));
  const uint64_t L = addr_of(src.p), R = c.region_addr(r);
  // Odd sizes, zero length, page crossing, a lone byte at the very end of the region.
  write_verify_read(node, c, r, src, dst, {{L + 1, R + 4090, 20}});
  write_verify_read(node, c, r, src, dst, {{L, R, 1}, {L + 9, R + 4095, 4097}, {L + 5000, R + 20000, 0}});
  write_verify_read(node, c, r, src, dst, {{L + 3, R + kRegionBytes - 1, 1}});
  write_verify_read(node, c, r, src, dst, {{L + 77, R + 12345, 16384 + 3}});
  CHECK_OK(post(node, c, Op::kWrite, {})->wait(20000));  // an empty batch completes DONE
  // 500 random 16 KiB pages (8 MB > threshold: split over the workers, many chunks).
  write_verify_read(node, c, r, src, dst, random_pages(L, R, 512, 16384, 500, 11 + r));
  // One big contiguous run, cut by split_runs and chunked.
  write_verify_read(node, c, r, src, dst, {{L + 4096, R + 8192, 5 << 20}});
  CHECK(node.counters.bytes_written.load() > 0);
  CHECK(node.counters.bytes_read.load() > 0);
  node.transport.stop();
  c.quit();
}

SHM_TEST(round_trips_mapped_memfd) { round_trips_on_region(0); }

SHM_TEST(round_trips_cma_plain_memory) { round_trips_on_region(1); }

SHM_TEST(mixed_batch_touches_both_paths) {
  Child c = spawn("peer-mix", "parent");
  Node node;
  CHECK_OK(node.start("parent"));
  Local src(node, 8 << 20, 3);
  CHECK_OK(node.transport.connect(c.record));
  const uint64_t L = addr_of(src.p);
  std::vector<CopyRun> runs;
  for (uint64_t i = 0; i < 64; ++i) {
    int r = static_cast<int>(i % 2);
    runs.push_back({L + i * 9000, c.region_addr(r) + (63 - i) * 9001, 9000});
  }
  CHECK_OK(post(node, c, Op::kWrite, runs)->wait(20000));
  for (const CopyRun& run : runs) {
    int r = run.remote_addr >= c.region_addr(0) && run.remote_addr < c.region_addr(0) + kRegionBytes
                ? 0
                : 1;
    std::memcpy(c.mirror[r].data() + (run.remote_addr - c.region_addr(r)),
                reinterpret_cast<void*>(run.local_addr), run.nbytes);
  }
  c.check_region(0);
  c.check_region(1);
  node.transport.stop();
  c.quit();
}

SHM_TEST(notifications_once_per_batch) {
  Child c = spawn("peer-notify", "parent");
  Node node;
  CHECK_OK(node.start("parent"));
  Local src(node, 8 << 20, 4);
  CHECK_OK(node.transport.connect(c.record));
  const uint64_t L = addr_of(src.p);
  // Three layers: a small inline batch, a multi-part mapped batch, a multi-part CMA batch.
  std::vector<std::vector<CopyRun>> layers = {
      {{L, c.region_addr(0), 4096}},
      random_pages(L, c.region_addr(0), 256, 16384, 200, 5),
      random_pages(L, c.region_addr(1), 256, 16384, 200, 6)};
  std::vector<std::shared_ptr<Batch>> batches;
  for (uint32_t i = 0; i < layers.size(); ++i) {
    batches.push_back(post(node, c, Op::kWrite, layers[i], NotifyTag{42, i, 3}));
  }
  CHECK_OK(post(node, c, Op::kWrite, {{L, c.region_addr(1), 100}})->wait(20000));  // untagged
  CHECK_OK(post(node, c, Op::kRead, {{L, c.region_addr(1), 100}}, NotifyTag{43, 0, 1})->wait(20000));
  for (auto& b : batches) CHECK_OK(b->wait(20000));
  Reply r = c.call(kExpect, 42, 3, 20000);
  CHECK_EQ(r.code, 0);
  CHECK_EQ(r.value, 3u);
  Reply seen = c.call(kNoticesSeen);
  CHECK_EQ(seen.code, 3);   // pushed: one per tagged write batch (none for untagged or reads)
  CHECK_EQ(seen.value, 3u);  // consumed
  node.transport.stop();
  c.quit();
}

SHM_TEST(full_ring_fails_batch_with_resource_exhausted) {
  Child c = spawn("peer-full", "parent", ChildMode::kNoConsumer);
  Node node;
  CHECK_OK(node.start("parent"));
  Local src(node, 1 << 20, 5);
  CHECK_OK(node.transport.connect(c.record));
  for (uint32_t i = 0; i < 8; ++i) {  // the ring has 8 slots and no consumer
    CHECK_OK(post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(0), 64}}, NotifyTag{9, i, 9})
                 ->wait(20000));
  }
  auto b = post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(0), 64}}, NotifyTag{9, 8, 9});
  Status st = b->wait(20000);
  CHECK_EQ(static_cast<int>(st.code()), static_cast<int>(StatusCode::kResourceExhausted));
  CHECK(b->state() == TransferState::kFailed);
  node.transport.stop();
  c.quit();
}

SHM_TEST(cancellation_contract) {
  Child c = spawn("peer-cancel", "parent");
  Node node;
  CHECK_OK(node.start("parent"));
  Local src(node, 8 << 20, 6);
  CHECK_OK(node.transport.connect(c.record));
  const uint64_t L = addr_of(src.p);
  // Cancelled before it starts: nothing moves, CANCELLED.
  auto b = post(node, c, Op::kWrite, {{L, c.region_addr(0), 6 << 20}}, {}, true);
  CHECK_EQ(static_cast<int>(b->wait(20000).code()), static_cast<int>(StatusCode::kCancelled));
  CHECK(b->state() == TransferState::kCancelled);
  auto small = post(node, c, Op::kWrite, {{L, c.region_addr(1), 100}}, {}, true);
  CHECK(small->state() == TransferState::kCancelled);
  c.check_region(0);
  c.check_region(1);
  // Cancelled while running: ends CANCELLED or DONE (if every byte had moved), never hangs.
  // Tagged batches are fully asynchronous (post() returns before the copy), untagged ones are
  // partly copied by the posting thread itself.
  int cancelled = 0;
  for (int i = 0; i < 20; ++i) {
    NotifyTag tag = i < 10 ? NotifyTag{500 + static_cast<uint64_t>(i), 0, 1} : NotifyTag{};
    auto big = post(node, c, Op::kWrite, {{L, c.region_addr(i % 2), 6 << 20}}, tag);
    big->cancel();
    Status st = big->wait(20000);
    CHECK(st.ok() || st.code() == StatusCode::kCancelled);
    CHECK(big->state() == (st.ok() ? TransferState::kDone : TransferState::kCancelled));
    cancelled += st.ok() ? 0 : 1;
  }
  std::printf("%d of 20 running batches ended CANCELLED, the rest DONE\n", cancelled);
  node.transport.stop();
  c.quit();
}

SHM_TEST(peer_killed_mid_transfer_fails_batches_and_reports) {
  Child c = spawn("peer-dies", "parent");
  Node node;
  CHECK_OK(node.start("parent"));
  Local src(node, 8 << 20, 9);
  CHECK_OK(node.transport.connect(c.record));
  const uint64_t L = addr_of(src.p);
  std::vector<std::shared_ptr<Batch>> batches;
  for (int i = 0; i < 40; ++i) {
    batches.push_back(post(node, c, Op::kWrite, {{L, c.region_addr(i % 2), 6 << 20}}));
  }
  c.kill_now();
  for (auto& b : batches) {
    Status st = b->wait(10000);
    CHECK(st.code() != StatusCode::kTimeout);  // every batch ends
    CHECK(st.ok() || st.code() == StatusCode::kUnavailable);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (node.lost_count("peer-dies") == 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  CHECK_EQ(node.lost_count("peer-dies"), 1u);
  // Once lost, posts fail at once with kUnavailable, on both paths.
  for (int r = 0; r < 2; ++r) {
    Status st = post(node, c, Op::kWrite, {{L, c.region_addr(r), 4096}})->wait(1000);
    CHECK_EQ(static_cast<int>(st.code()), static_cast<int>(StatusCode::kUnavailable));
  }
  node.transport.stop();
}

SHM_TEST(stop_completes_in_flight_batches) {
  Child c = spawn("peer-stop", "parent");
  Node node;
  CHECK_OK(node.start("parent"));
  Local src(node, 8 << 20, 10);
  CHECK_OK(node.transport.connect(c.record));
  std::vector<std::shared_ptr<Batch>> batches;
  for (int i = 0; i < 20; ++i) {
    batches.push_back(post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(i % 2), 6 << 20}}));
  }
  node.transport.stop();
  for (auto& b : batches) {
    CHECK(is_terminal(b->state()));  // before stop() returned
    Status st = b->status();
    CHECK(st.ok() || st.code() == StatusCode::kUnavailable);
  }
  auto late = post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(0), 10}});
  CHECK_EQ(static_cast<int>(late->status().code()), static_cast<int>(StatusCode::kUnavailable));
  c.quit();
}

SHM_TEST(connect_rejects_unusable_peers) {
  Child c = spawn("peer-conn", "parent");
  Node node;
  CHECK_OK(node.start("parent"));
  auto rec = std::make_shared<PeerRecord>(*c.record);
  rec->metadata.control_fd = -1;  // shm disabled on the peer
  CHECK_EQ(static_cast<int>(node.transport.connect(rec).code()),
           static_cast<int>(StatusCode::kUnavailable));
  rec = std::make_shared<PeerRecord>(*c.record);
  rec->metadata.engine_id = "someone-else";  // the control area names another engine
  CHECK_EQ(static_cast<int>(node.transport.connect(rec).code()),
           static_cast<int>(StatusCode::kUnavailable));
  rec = std::make_shared<PeerRecord>(*c.record);
  rec->metadata.control_fd = 999;  // no such fd in the peer
  CHECK_EQ(static_cast<int>(node.transport.connect(rec).code()),
           static_cast<int>(StatusCode::kUnavailable));
  // Not connected: posts fail with kUnavailable instead of touching anything.
  Local src(node, 1 << 20, 11);
  Status st = post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(0), 10}})->wait(1000);
  CHECK_EQ(static_cast<int>(st.code()), static_cast<int>(StatusCode::kUnavailable));
  CHECK_OK(node.transport.connect(c.record));
  CHECK_OK(node.transport.connect(c.record));  // re-connect (metadata update) keeps working
  CHECK_OK(post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(0), 10}})->wait(1000));
  node.transport.disconnect(c.record->metadata.engine_id);
  st = post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(0), 10}})->wait(1000);
  CHECK_EQ(static_cast<int>(st.code()), static_cast<int>(StatusCode::kUnavailable));
  node.transport.stop();
  c.quit();
}

SHM_TEST(cma_denied_is_reported_not_hidden) {
  if (geteuid() != 0) {
    std::printf("not root: cannot drop privileges to provoke EPERM; nothing to check\n");
    return;
  }
  Child c = spawn("peer-eperm", "initiator");  // a root-owned target
  // The initiator runs in a process of its own: it connects as root, then drops to nobody.
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    Node node;
    if (!node.start("initiator").ok()) _exit(10);
    Local src(node, 1 << 20, 12);
    if (!node.transport.connect(c.record).ok()) _exit(11);
    if (setresgid(65534, 65534, 65534) != 0 || setresuid(65534, 65534, 65534) != 0) _exit(12);
    // The memfd mapping made at connect() keeps working ...
    if (!post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(0), 4096}})->wait(10000).ok()) {
      _exit(13);
    }
    // ... while cross-memory attach is now denied, and says so.
    Status st = post(node, c, Op::kWrite, {{addr_of(src.p), c.region_addr(1), 4096}})->wait(10000);
    if (st.code() != StatusCode::kUnavailable) _exit(14);
    if (st.message().find("denied") == std::string::npos ||
        st.message().find("ptrace") == std::string::npos) {
      _exit(15);
    }
    node.transport.stop();
    _exit(0);
  }
  int status = 0;
  CHECK_EQ(waitpid(pid, &status, 0), pid);
  CHECK(WIFEXITED(status));
  CHECK_EQ(WEXITSTATUS(status), 0);
  c.check_region(1);
  c.quit();
}

// ---- benchmark (not a ctest entry): shm_transport_test --bench [pages] [page_kib] ------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double seconds_of(const std::function<void()>& fn) {
  auto t0 = std::chrono::steady_clock::now();
  fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int run_bench(size_t pages, uint64_t page, int threads) {
  // The box is noisy, so every transfer repetition is paired with a same-moment repetition of
  // the peer (one thread gathering the same number of random pages with memcpy, in-process) and
  // the reported ratio is the median of the per-pair ratios.
  const uint64_t region = std::max<uint64_t>(pages * page * 2, 8 << 20);
  Child c = spawn("bench-peer", "bench", ChildMode::kServe, region);
  Node node;
  node.config.copy_threads = threads;
  CHECK_OK(node.start("bench"));
  Local src(node, region, 21), scratch(node, region, 22);
  CHECK_OK(node.transport.connect(c.record));
  const uint64_t slots = region / page;
  const double nbytes = static_cast<double>(pages * page);
  constexpr int kReps = 21;
  auto local_runs = random_pages(addr_of(src.p), addr_of(scratch.p), slots, page, pages, 3);
  auto memcpy_gather = [&] {
    for (const CopyRun& r : local_runs) {
      std::memcpy(reinterpret_cast<void*>(r.remote_addr), reinterpret_cast<void*>(r.local_addr),
                  r.nbytes);
    }
  };
  std::printf("{\"pages\": %zu, \"page_kib\": %llu, \"copy_threads\": %d, \"reps\": %d", pages,
              static_cast<unsigned long long>(page >> 10), threads, kReps);
  std::vector<double> all_memcpy;
  const char* names[2] = {"mapped", "cma"};
  for (int r = 0; r < 2; ++r) {
    auto runs = random_pages(addr_of(src.p), c.region_addr(r), slots, page, pages, 4 + r);
    for (Op op : {Op::kWrite, Op::kRead}) {
      std::vector<double> ours, ratio;
      for (int i = 0; i < kReps + 2; ++i) {
        double tm = seconds_of(memcpy_gather);
        double t = seconds_of([&] { CHECK_OK(post(node, c, op, runs)->wait(20000)); });
        if (i < 2) continue;  // warm-ups
        all_memcpy.push_back(nbytes / tm / 1e9);
        ours.push_back(nbytes / t / 1e9);
        ratio.push_back(tm / t);
      }
      const char* o = op == Op::kWrite ? "write" : "read";
      std::printf(", \"%s_%s_gbps\": %.2f, \"%s_%s_ratio_vs_memcpy\": %.2f", names[r], o,
                  median(ours), names[r], o, median(ratio));
    }
    std::vector<double> us;
    std::vector<CopyRun> one = {{addr_of(src.p), c.region_addr(r), page}};
    for (int i = 0; i < 400; ++i) {
      double t = seconds_of([&] { CHECK_OK(post(node, c, Op::kWrite, one)->wait(20000)); });
      if (i >= 20) us.push_back(t * 1e6);
    }
    std::printf(", \"%s_single_op_us\": %.2f", names[r], median(us));
  }
  std::printf(", \"memcpy_gather_1thread_gbps\": %.2f}\n", median(all_memcpy));
  node.transport.stop();
  c.quit();
  return 0;
}

}  // namespace
}  // namespace banaserve::transfer

int main(int argc, char** argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) {
    size_t pages = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1000;
    uint64_t kib = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 16;
    int threads = argc > 4 ? std::atoi(argv[4]) : 2;
    return banaserve::transfer::run_bench(pages, kib << 10, threads);
  }
  return banaserve::transfer::shm::testing::run_tests(argc, argv);
}
