// SPDX-License-Identifier: Apache-2.0
#include "banaserve/kvpool/pool.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

namespace banaserve::kvpool {

namespace {

constexpr uint8_t kFree = 0;
constexpr uint8_t kReserved = 1;
constexpr uint8_t kCommitted = 2;

// Lives at offset 0 of the segment. Fields below `mutex` are guarded by it.
struct alignas(64) Header {
  std::atomic<uint64_t> magic;  // written last at creation (release)
  uint32_t version;
  uint32_t page_size;
  uint64_t num_pages;
  uint32_t max_key_len;
  uint32_t max_clients;
  uint32_t ops_per_client;
  uint32_t owner_pid;
  uint64_t high_mark;  // pages
  uint64_t low_mark;   // pages
  uint64_t total_bytes;
  uint64_t clients_offset;
  uint64_t client_stride;
  uint64_t buckets_offset;
  uint64_t num_buckets;
  uint64_t slots_offset;
  uint64_t slot_stride;
  uint64_t pages_offset;
  uint64_t page_stride;
  uint64_t segment_id;
  uint64_t created_unix_ns;
  std::atomic<uint32_t> closed;
  uint32_t pad0;
  alignas(64) pthread_mutex_t mutex;
  // --- guarded by mutex ---
  uint32_t free_head;
  uint32_t pad1;
  uint64_t clock_hand;
  uint64_t free_count;
  uint64_t committed;
  uint64_t reserved;
  uint64_t hits, misses, exists_hits, exists_misses;
  uint64_t puts, put_exists, put_no_space;
  uint64_t evictions, removals, reaped_clients, lock_recoveries;
  uint64_t generation;
};

struct Slot {
  std::atomic<uint8_t> state;  // kFree / kReserved / kCommitted: the source of truth
  uint8_t ref;                 // CLOCK reference bit
  uint16_t key_len;
  uint32_t owner;  // client index holding the reservation
  uint32_t pins;   // derived from op records; recomputed on lock recovery
  uint32_t next;   // bucket chain (in use) or free list (free); derived
  uint64_t hash;
  uint64_t gen;
  char* key() { return reinterpret_cast<char*>(this) + 32; }
};
static_assert(sizeof(Slot) == 32, "Slot fixed part must match layout.cc");

struct OpRecord {
  uint32_t in_use;
  uint32_t count;
  uint32_t slots[kOpChunk];
};
static_assert(sizeof(OpRecord) == 8 + 4 * kOpChunk, "OpRecord must match layout.cc");

struct ClientRecord {
  std::atomic<uint32_t> active;
  int32_t pid;
  uint64_t start_time;
  uint64_t attach_unix_ns;
  uint8_t pad[40];
  OpRecord* ops() { return reinterpret_cast<OpRecord*>(reinterpret_cast<char*>(this) + 64); }
};
static_assert(sizeof(ClientRecord) == 64, "ClientRecord fixed part must match layout.cc");

std::string shm_path(const std::string& name) { return "/banaserve-kvpool-" + name; }

uint64_t now_unix_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

// Field 3 (state) and field 22 (start time) of /proc/<pid>/stat; false if unreadable.
bool read_proc_stat(int pid, char* state, uint64_t* start_time) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  if (!in) return false;
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t close = text.rfind(')');
  if (close == std::string::npos) return false;
  std::istringstream rest(text.substr(close + 1));
  std::string field;
  for (int i = 3; i <= 22; ++i) {
    if (!(rest >> field)) return false;
    if (i == 3) *state = field.empty() ? '?' : field[0];
    if (i == 22) *start_time = std::strtoull(field.c_str(), nullptr, 10);
  }
  return true;
}

bool process_alive(int pid, uint64_t start_time) {
  if (pid <= 0) return false;
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  char state = '?';
  uint64_t st = 0;
  if (!read_proc_stat(pid, &state, &st)) return false;
  if (state == 'Z' || state == 'X') return false;
  return st == start_time;
}

}  // namespace

// Typed pointers into the mapped segment.
struct SegmentView {
  Header* hdr = nullptr;
  char* base = nullptr;

  Slot& slot(uint32_t i) const {
    return *reinterpret_cast<Slot*>(base + hdr->slots_offset + hdr->slot_stride * i);
  }
  uint32_t* buckets() const { return reinterpret_cast<uint32_t*>(base + hdr->buckets_offset); }
  ClientRecord& client(uint32_t i) const {
    return *reinterpret_cast<ClientRecord*>(base + hdr->clients_offset + hdr->client_stride * i);
  }
  char* page(uint32_t i) const { return base + hdr->pages_offset + hdr->page_stride * i; }
  uint32_t bucket_of(uint64_t hash) const {
    return static_cast<uint32_t>(hash & (hdr->num_buckets - 1));
  }

  uint32_t find(const char* key, size_t len, uint64_t hash) const {
    uint32_t s = buckets()[bucket_of(hash)];
    uint64_t steps = 0;
    while (s != kNone && steps++ <= hdr->num_pages) {
      Slot& sl = slot(s);
      if (sl.hash == hash && sl.key_len == len && std::memcmp(sl.key(), key, len) == 0) return s;
      s = sl.next;
    }
    return kNone;
  }

  void link(uint32_t s) {
    Slot& sl = slot(s);
    uint32_t* head = &buckets()[bucket_of(sl.hash)];
    sl.next = *head;
    *head = s;
  }

  void unlink(uint32_t s) {
    Slot& sl = slot(s);
    uint32_t* cur = &buckets()[bucket_of(sl.hash)];
    uint64_t steps = 0;
    while (*cur != kNone && steps++ <= hdr->num_pages) {
      if (*cur == s) {
        *cur = sl.next;
        return;
      }
      cur = &slot(*cur).next;
    }
  }

  // In-use slot -> free: unlinked first, state last, then onto the free list.
  void release(uint32_t s) {
    Slot& sl = slot(s);
    uint8_t st = sl.state.load(std::memory_order_relaxed);
    unlink(s);
    if (st == kCommitted) hdr->committed--;
    if (st == kReserved) hdr->reserved--;
    sl.state.store(kFree, std::memory_order_release);
    sl.pins = 0;
    sl.ref = 0;
    sl.next = hdr->free_head;
    hdr->free_head = s;
    hdr->free_count++;
  }

  uint32_t allocate() {
    uint32_t s = hdr->free_head;
    if (s == kNone) return kNone;
    hdr->free_head = slot(s).next;
    hdr->free_count--;
    return s;
  }

  // CLOCK sweep: evicts up to `target` committed, unpinned pages; returns how many.
  uint64_t evict(uint64_t target) {
    uint64_t evicted = 0;
    uint64_t n = hdr->num_pages;
    for (uint64_t steps = 0; evicted < target && steps < 2 * n; ++steps) {
      uint32_t s = static_cast<uint32_t>(hdr->clock_hand);
      hdr->clock_hand = (hdr->clock_hand + 1) % n;
      Slot& sl = slot(s);
      if (sl.state.load(std::memory_order_relaxed) != kCommitted || sl.pins != 0) continue;
      if (sl.ref) {
        sl.ref = 0;
        continue;
      }
      release(s);
      hdr->evictions++;
      evicted++;
    }
    return evicted;
  }

  // Drops every dead client (pins and reservations); returns how many were dropped.
  size_t reap(int self_client) {
    std::vector<uint8_t> dead(hdr->max_clients, 0);
    size_t n_dead = 0;
    for (uint32_t c = 0; c < hdr->max_clients; ++c) {
      ClientRecord& rec = client(c);
      if (!rec.active.load(std::memory_order_acquire) || static_cast<int>(c) == self_client) {
        continue;
      }
      if (process_alive(rec.pid, rec.start_time)) continue;
      dead[c] = 1;
      n_dead++;
      for (uint32_t o = 0; o < hdr->ops_per_client; ++o) {
        OpRecord& op = rec.ops()[o];
        if (!op.in_use) continue;
        for (uint32_t k = 0; k < op.count && k < kOpChunk; ++k) {
          if (op.slots[k] < hdr->num_pages && slot(op.slots[k]).pins > 0) slot(op.slots[k]).pins--;
        }
        op.count = 0;
        op.in_use = 0;
      }
    }
    if (n_dead == 0) return 0;
    for (uint32_t s = 0; s < hdr->num_pages; ++s) {
      Slot& sl = slot(s);
      if (sl.state.load(std::memory_order_relaxed) == kReserved && sl.owner < hdr->max_clients &&
          dead[sl.owner]) {
        release(s);
      }
    }
    for (uint32_t c = 0; c < hdr->max_clients; ++c) {
      if (dead[c]) client(c).active.store(0, std::memory_order_release);
    }
    hdr->reaped_clients += n_dead;
    return n_dead;
  }

  // After a process died holding the mutex: everything derived (chains, free list, pins, counts)
  // is rebuilt from slot states and the op records of live clients.
  void rebuild(int self_client) {
    for (uint32_t c = 0; c < hdr->max_clients; ++c) {
      ClientRecord& rec = client(c);
      if (!rec.active.load(std::memory_order_acquire) || static_cast<int>(c) == self_client) {
        continue;
      }
      if (!process_alive(rec.pid, rec.start_time)) {
        for (uint32_t o = 0; o < hdr->ops_per_client; ++o) rec.ops()[o].in_use = 0;
        rec.active.store(0, std::memory_order_release);
        hdr->reaped_clients++;
      }
    }
    uint64_t n = hdr->num_pages;
    for (uint32_t s = 0; s < n; ++s) slot(s).pins = 0;
    for (uint32_t c = 0; c < hdr->max_clients; ++c) {
      ClientRecord& rec = client(c);
      if (!rec.active.load(std::memory_order_acquire)) continue;
      for (uint32_t o = 0; o < hdr->ops_per_client; ++o) {
        OpRecord& op = rec.ops()[o];
        if (!op.in_use) continue;
        for (uint32_t k = 0; k < op.count && k < kOpChunk; ++k) {
          if (op.slots[k] < n) slot(op.slots[k]).pins++;
        }
      }
    }
    std::memset(buckets(), 0xff, 4 * hdr->num_buckets);
    hdr->free_head = kNone;
    hdr->free_count = 0;
    hdr->committed = 0;
    hdr->reserved = 0;
    for (uint64_t i = n; i-- > 0;) {
      uint32_t s = static_cast<uint32_t>(i);
      Slot& sl = slot(s);
      uint8_t st = sl.state.load(std::memory_order_relaxed);
      if (st == kReserved &&
          (sl.owner >= hdr->max_clients || !client(sl.owner).active.load())) {
        st = kFree;
      }
      if (st == kCommitted || st == kReserved) {
        uint32_t other = find(sl.key(), sl.key_len, sl.hash);
        if (other != kNone) {  // never expected; keep one copy, preferring a committed one
          if (slot(other).state.load() == kCommitted || st != kCommitted) {
            st = kFree;
          } else {
            release(other);
          }
        }
      }
      if (st != kCommitted && st != kReserved) {
        sl.state.store(kFree, std::memory_order_release);
        sl.pins = 0;
        sl.ref = 0;
        sl.next = hdr->free_head;
        hdr->free_head = s;
        hdr->free_count++;
        continue;
      }
      link(s);
      if (st == kCommitted) hdr->committed++;
      if (st == kReserved) hdr->reserved++;
    }
    if (hdr->clock_hand >= n) hdr->clock_hand = 0;
  }
};

namespace {

// Copies page `page` to/from the caller's pieces.
void copy_out(const char* page, const IoList& io, size_t i) {
  const uint64_t* addrs = io.addrs + i * io.segments;
  uint64_t off = 0;
  for (size_t j = 0; j < io.segments; ++j) {
    std::memcpy(reinterpret_cast<void*>(addrs[j]), page + off, io.seg_lens[j]);
    off += io.seg_lens[j];
  }
}

void copy_in(char* page, const IoList& io, size_t i) {
  const uint64_t* addrs = io.addrs + i * io.segments;
  uint64_t off = 0;
  for (size_t j = 0; j < io.segments; ++j) {
    std::memcpy(page + off, reinterpret_cast<const void*>(addrs[j]), io.seg_lens[j]);
    off += io.seg_lens[j];
  }
}

}  // namespace

Status Pool::validate_name(const std::string& name) {
  if (name.empty() || name.size() > 64) {
    return BANASERVE_INVALID("pool name must have 1..64 characters, got " +
                             std::to_string(name.size()));
  }
  for (char c : name) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.';
    if (!ok) return BANASERVE_INVALID("pool name '" + name + "' may use only [A-Za-z0-9_.-]");
  }
  return Status();
}

StatusOr<std::unique_ptr<Pool>> Pool::create(const std::string& name, const PoolOptions& opts) {
  BANASERVE_RETURN_IF_ERROR(validate_name(name));
  if (opts.page_size == 0) return BANASERVE_INVALID("page_size must be > 0");
  if (!(opts.high_watermark > 0.0 && opts.high_watermark <= 1.0) ||
      !(opts.low_watermark >= 0.0 && opts.low_watermark <= opts.high_watermark)) {
    return BANASERVE_INVALID("watermarks must satisfy 0 <= low <= high <= 1, high > 0");
  }
  Geometry g;
  g.num_pages = opts.capacity_bytes / opts.page_size;
  g.page_size = opts.page_size;
  g.max_key_len = opts.max_key_len;
  g.max_clients = opts.max_clients;
  g.ops_per_client = opts.ops_per_client;
  if (g.num_pages == 0) {
    return BANASERVE_INVALID("capacity " + std::to_string(opts.capacity_bytes) +
                             " bytes holds no page of " + std::to_string(opts.page_size));
  }
  BANASERVE_ASSIGN_OR_RETURN(Layout l, compute_layout(g, sizeof(Header)));

  std::string path = shm_path(name);
  int fd = shm_open(path.c_str(), O_CREAT | O_EXCL | O_RDWR, 0660);
  if (fd < 0) {
    if (errno == EEXIST) {
      return BANASERVE_STATUS(StatusCode::kAlreadyExists, "pool '" + name + "' already exists");
    }
    return BANASERVE_ERRNO(StatusCode::kInternal, "shm_open(" + path + ")");
  }
  if (ftruncate(fd, static_cast<off_t>(l.total_bytes)) != 0) {
    Status st = BANASERVE_ERRNO(StatusCode::kResourceExhausted,
                                "ftruncate(" + path + ", " + std::to_string(l.total_bytes) + ")");
    close(fd);
    shm_unlink(path.c_str());
    return st;
  }
  int flags = MAP_SHARED | (opts.populate ? MAP_POPULATE : 0);
  void* base = mmap(nullptr, l.total_bytes, PROT_READ | PROT_WRITE, flags, fd, 0);
  close(fd);
  if (base == MAP_FAILED) {
    Status st = BANASERVE_ERRNO(StatusCode::kResourceExhausted, "mmap(" + path + ")");
    shm_unlink(path.c_str());
    return st;
  }
  auto* hdr = new (base) Header();
  hdr->version = kLayoutVersion;
  hdr->page_size = g.page_size;
  hdr->num_pages = g.num_pages;
  hdr->max_key_len = g.max_key_len;
  hdr->max_clients = g.max_clients;
  hdr->ops_per_client = g.ops_per_client;
  hdr->owner_pid = static_cast<uint32_t>(getpid());
  hdr->high_mark = static_cast<uint64_t>(opts.high_watermark * static_cast<double>(g.num_pages));
  hdr->low_mark = static_cast<uint64_t>(opts.low_watermark * static_cast<double>(g.num_pages));
  if (hdr->high_mark == 0) hdr->high_mark = 1;
  hdr->total_bytes = l.total_bytes;
  hdr->clients_offset = l.clients_offset;
  hdr->client_stride = l.client_stride;
  hdr->buckets_offset = l.buckets_offset;
  hdr->num_buckets = l.num_buckets;
  hdr->slots_offset = l.slots_offset;
  hdr->slot_stride = l.slot_stride;
  hdr->pages_offset = l.pages_offset;
  hdr->page_stride = l.page_stride;
  hdr->segment_id = std::random_device{}() ^ (now_unix_ns() << 1);
  hdr->created_unix_ns = now_unix_ns();
  pthread_mutexattr_t attr;
  pthread_mutexattr_init(&attr);
  pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
  pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
  int rc = pthread_mutex_init(&hdr->mutex, &attr);
  pthread_mutexattr_destroy(&attr);
  if (rc != 0) {
    munmap(base, l.total_bytes);
    shm_unlink(path.c_str());
    return BANASERVE_STATUS(StatusCode::kInternal, "pthread_mutex_init failed: " + std::to_string(rc));
  }

  std::unique_ptr<Pool> pool(new Pool());
  pool->name_ = name;
  pool->base_ = base;
  pool->mapped_bytes_ = l.total_bytes;
  pool->owner_ = true;
  pool->view_ = std::make_unique<SegmentView>();
  pool->view_->hdr = hdr;
  pool->view_->base = static_cast<char*>(base);
  SegmentView& v = *pool->view_;
  std::memset(v.buckets(), 0xff, 4 * l.num_buckets);
  hdr->free_head = kNone;
  for (uint64_t i = g.num_pages; i-- > 0;) {  // free list in ascending slot order
    Slot& sl = v.slot(static_cast<uint32_t>(i));
    sl.state.store(kFree, std::memory_order_relaxed);
    sl.next = hdr->free_head;
    hdr->free_head = static_cast<uint32_t>(i);
  }
  hdr->free_count = g.num_pages;
  hdr->magic.store(kMagic, std::memory_order_release);
  return pool;
}

StatusOr<std::unique_ptr<Pool>> Pool::open(const std::string& name, bool populate) {
  BANASERVE_RETURN_IF_ERROR(validate_name(name));
  std::string path = shm_path(name);
  int fd = shm_open(path.c_str(), O_RDWR, 0);
  if (fd < 0) {
    if (errno == ENOENT) {
      return BANASERVE_STATUS(StatusCode::kNotFound,
                              "pool '" + name + "' does not exist (is `banaserve pool serve` up?)");
    }
    return BANASERVE_ERRNO(StatusCode::kInternal, "shm_open(" + path + ")");
  }
  struct stat sb {};
  Header* hdr = nullptr;
  void* base = MAP_FAILED;
  uint64_t size = 0;
  // The creator sizes the segment, then writes the magic last; wait briefly for both.
  for (int attempt = 0; attempt < 2000; ++attempt) {
    if (fstat(fd, &sb) != 0) {
      Status st = BANASERVE_ERRNO(StatusCode::kInternal, "fstat(" + path + ")");
      close(fd);
      return st;
    }
    size = static_cast<uint64_t>(sb.st_size);
    if (size >= sizeof(Header)) {
      base = mmap(nullptr, size, PROT_READ | PROT_WRITE,
                  MAP_SHARED | (populate ? MAP_POPULATE : 0), fd, 0);
      if (base == MAP_FAILED) {
        Status st = BANASERVE_ERRNO(StatusCode::kInternal, "mmap(" + path + ")");
        close(fd);
        return st;
      }
      hdr = static_cast<Header*>(base);
      if (hdr->magic.load(std::memory_order_acquire) == kMagic) break;
      munmap(base, size);
      base = MAP_FAILED;
      hdr = nullptr;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  close(fd);
  if (hdr == nullptr) {
    return BANASERVE_STATUS(StatusCode::kUnavailable,
                            "pool '" + name + "' is not initialised (creator died or is slow)");
  }
  if (hdr->version != kLayoutVersion || hdr->total_bytes != size) {
    munmap(base, size);
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "pool '" + name + "' has an incompatible layout (version " +
                                std::to_string(hdr->version) + ")");
  }
  std::unique_ptr<Pool> pool(new Pool());
  pool->name_ = name;
  pool->base_ = base;
  pool->mapped_bytes_ = size;
  pool->view_ = std::make_unique<SegmentView>();
  pool->view_->hdr = hdr;
  pool->view_->base = static_cast<char*>(base);
  BANASERVE_RETURN_IF_ERROR(pool->check_open());
  return pool;
}

Status Pool::unlink(const std::string& name) {
  BANASERVE_RETURN_IF_ERROR(validate_name(name));
  std::string path = shm_path(name);
  if (shm_unlink(path.c_str()) != 0) {
    if (errno == ENOENT) {
      return BANASERVE_STATUS(StatusCode::kNotFound, "pool '" + name + "' does not exist");
    }
    return BANASERVE_ERRNO(StatusCode::kInternal, "shm_unlink(" + path + ")");
  }
  return Status();
}

Pool::~Pool() {
  if (view_ && client_ >= 0 && client_pid_ == getpid()) {
    if (lock().ok()) {
      SegmentView& v = *view_;
      ClientRecord& rec = v.client(static_cast<uint32_t>(client_));
      for (uint32_t o = 0; o < v.hdr->ops_per_client; ++o) {
        OpRecord& op = rec.ops()[o];
        if (!op.in_use) continue;
        for (uint32_t k = 0; k < op.count; ++k) {
          if (v.slot(op.slots[k]).pins > 0) v.slot(op.slots[k]).pins--;
        }
        op.in_use = 0;
      }
      for (uint32_t s = 0; s < v.hdr->num_pages; ++s) {
        Slot& sl = v.slot(s);
        if (sl.state.load(std::memory_order_relaxed) == kReserved &&
            sl.owner == static_cast<uint32_t>(client_)) {
          v.release(s);
        }
      }
      rec.active.store(0, std::memory_order_release);
      unlock();
    }
  }
  if (base_ != nullptr) munmap(base_, mapped_bytes_);
}

uint32_t Pool::page_size() const { return view_->hdr->page_size; }
uint64_t Pool::num_pages() const { return view_->hdr->num_pages; }
uint32_t Pool::max_key_len() const { return view_->hdr->max_key_len; }
uint64_t Pool::segment_id() const { return view_->hdr->segment_id; }
PageRegion Pool::page_region() const {
  PageRegion r;
  r.addr = reinterpret_cast<uint64_t>(view_->page(0));
  r.stride = view_->hdr->page_stride;
  r.num_pages = view_->hdr->num_pages;
  return r;
}

Status Pool::check_open() const {
  if (view_->hdr->closed.load(std::memory_order_acquire)) {
    return BANASERVE_STATUS(StatusCode::kUnavailable,
                            "pool '" + name_ +
                                "' was closed by its owner (service stopped or restarted); "
                                "attach again");
  }
  return Status();
}

Status Pool::lock() {
  int rc = pthread_mutex_lock(&view_->hdr->mutex);
  if (rc == EOWNERDEAD) {
    // The previous holder died mid-update: rebuild everything derived, then mark consistent.
    view_->rebuild(client_pid_ == getpid() ? client_.load() : -1);
    view_->hdr->lock_recoveries++;
    pthread_mutex_consistent(&view_->hdr->mutex);
    return Status();
  }
  if (rc != 0) {
    return BANASERVE_STATUS(StatusCode::kInternal,
                            "pool lock failed (" + std::string(std::strerror(rc)) + ")");
  }
  return Status();
}

void Pool::unlock() { pthread_mutex_unlock(&view_->hdr->mutex); }

Status Pool::ensure_client() {
  BANASERVE_RETURN_IF_ERROR(check_open());
  int pid = getpid();
  if (client_ >= 0 && client_pid_ == pid) return Status();
  std::lock_guard<std::mutex> guard(client_mu_);
  if (client_ >= 0 && client_pid_ == pid) return Status();
  char state = '?';
  uint64_t start_time = 0;
  if (!read_proc_stat(pid, &state, &start_time)) {
    return BANASERVE_STATUS(StatusCode::kInternal, "cannot read /proc/self/stat");
  }
  BANASERVE_RETURN_IF_ERROR(lock());
  SegmentView& v = *view_;
  v.reap(-1);
  int chosen = -1;
  for (uint32_t c = 0; c < v.hdr->max_clients; ++c) {
    if (!v.client(c).active.load(std::memory_order_acquire)) {
      chosen = static_cast<int>(c);
      break;
    }
  }
  if (chosen < 0) {
    unlock();
    return BANASERVE_STATUS(StatusCode::kResourceExhausted,
                            "pool '" + name_ + "': all " + std::to_string(v.hdr->max_clients) +
                                " client records are attached");
  }
  ClientRecord& rec = v.client(static_cast<uint32_t>(chosen));
  rec.pid = pid;
  rec.start_time = start_time;
  rec.attach_unix_ns = now_unix_ns();
  for (uint32_t o = 0; o < v.hdr->ops_per_client; ++o) {
    rec.ops()[o].in_use = 0;
    rec.ops()[o].count = 0;
  }
  rec.active.store(1, std::memory_order_release);
  unlock();
  client_pid_ = pid;
  client_ = chosen;
  return Status();
}

Status Pool::check_keys(const KeyList& keys) const {
  if (keys.n > 0 && (keys.data == nullptr || keys.offsets == nullptr)) {
    return BANASERVE_INVALID("null key list");
  }
  uint32_t max_len = view_->hdr->max_key_len;
  for (size_t i = 0; i < keys.n; ++i) {
    if (keys.offsets[i + 1] < keys.offsets[i]) return BANASERVE_INVALID("key offsets decrease");
    size_t len = keys.len(i);
    if (len == 0) return BANASERVE_INVALID("key " + std::to_string(i) + " is empty");
    if (len > max_len) {
      return BANASERVE_INVALID("key " + std::to_string(i) + " has " + std::to_string(len) +
                               " bytes; this pool allows at most " + std::to_string(max_len));
    }
  }
  return Status();
}

Status Pool::check_io(const IoList& io) const {
  if (io.segments == 0 || io.seg_lens == nullptr) {
    return BANASERVE_INVALID("an I/O list needs at least one segment per page");
  }
  uint64_t total = 0;
  for (size_t j = 0; j < io.segments; ++j) total += io.seg_lens[j];
  if (total != view_->hdr->page_size) {
    return BANASERVE_INVALID("page pieces sum to " + std::to_string(total) +
                             " bytes but this pool's page size is " +
                             std::to_string(view_->hdr->page_size));
  }
  return Status();
}

Status Pool::exists(const KeyList& keys, uint8_t* found, size_t* leading) {
  BANASERVE_RETURN_IF_ERROR(check_keys(keys));
  BANASERVE_RETURN_IF_ERROR(check_open());
  std::vector<uint64_t> hashes(keys.n);
  for (size_t i = 0; i < keys.n; ++i) hashes[i] = hash_key(keys.key(i), keys.len(i));
  BANASERVE_RETURN_IF_ERROR(lock());
  SegmentView& v = *view_;
  size_t lead = keys.n;
  for (size_t i = 0; i < keys.n; ++i) {
    uint32_t s = v.find(keys.key(i), keys.len(i), hashes[i]);
    bool hit = s != kNone && v.slot(s).state.load(std::memory_order_relaxed) == kCommitted;
    if (hit) {
      v.slot(s).ref = 1;
      v.hdr->exists_hits++;
    } else {
      v.hdr->exists_misses++;
      if (lead == keys.n) lead = i;
    }
    if (found != nullptr) {
      found[i] = hit ? 1 : 0;
    } else if (!hit) {
      break;  // only the leading run was asked for
    }
  }
  unlock();
  if (leading != nullptr) *leading = lead;
  return Status();
}

Status Pool::get(const KeyList& keys, const IoList& dst, uint8_t* found, size_t* hits) {
  BANASERVE_RETURN_IF_ERROR(check_keys(keys));
  BANASERVE_RETURN_IF_ERROR(check_io(dst));
  BANASERVE_RETURN_IF_ERROR(ensure_client());
  SegmentView& v = *view_;
  size_t total_hits = 0;
  std::vector<uint64_t> hashes(keys.n);
  for (size_t i = 0; i < keys.n; ++i) hashes[i] = hash_key(keys.key(i), keys.len(i));
  std::vector<uint32_t> chunk_slots(kOpChunk);
  for (size_t begin = 0; begin < keys.n; begin += kOpChunk) {
    size_t end = std::min(keys.n, begin + kOpChunk);
    OpRecord* op = nullptr;
    // Take an op record (ops_per_client concurrent gets per process); wait if all are busy.
    for (;;) {
      BANASERVE_RETURN_IF_ERROR(lock());
      ClientRecord& rec = v.client(static_cast<uint32_t>(client_));
      for (uint32_t o = 0; o < v.hdr->ops_per_client; ++o) {
        if (!rec.ops()[o].in_use) {
          op = &rec.ops()[o];
          op->count = 0;
          op->in_use = 1;
          break;
        }
      }
      if (op != nullptr) break;
      unlock();
      std::this_thread::yield();
    }
    for (size_t i = begin; i < end; ++i) {
      uint32_t s = v.find(keys.key(i), keys.len(i), hashes[i]);
      bool hit = s != kNone && v.slot(s).state.load(std::memory_order_relaxed) == kCommitted;
      chunk_slots[i - begin] = hit ? s : kNone;
      if (hit) {
        op->slots[op->count] = s;
        std::atomic_signal_fence(std::memory_order_release);
        op->count++;
        v.slot(s).pins++;
        v.slot(s).ref = 1;
        v.hdr->hits++;
      } else {
        v.hdr->misses++;
      }
    }
    unlock();
    for (size_t i = begin; i < end; ++i) {
      uint32_t s = chunk_slots[i - begin];
      if (found != nullptr) found[i] = s != kNone ? 1 : 0;
      if (s == kNone) continue;
      copy_out(v.page(s), dst, i);
      total_hits++;
    }
    BANASERVE_RETURN_IF_ERROR(lock());
    for (uint32_t k = 0; k < op->count; ++k) {
      Slot& sl = v.slot(op->slots[k]);
      if (sl.pins > 0) sl.pins--;
    }
    op->count = 0;
    op->in_use = 0;
    unlock();
  }
  if (hits != nullptr) *hits = total_hits;
  return Status();
}

StatusOr<uint32_t> Pool::pin(const KeyList& keys, uint64_t* addrs) {
  BANASERVE_RETURN_IF_ERROR(check_keys(keys));
  if (keys.n > kOpChunk) {
    return BANASERVE_INVALID("pin takes at most " + std::to_string(kOpChunk) + " keys per call, got " +
                             std::to_string(keys.n));
  }
  BANASERVE_RETURN_IF_ERROR(ensure_client());
  SegmentView& v = *view_;
  std::vector<uint64_t> hashes(keys.n);
  for (size_t i = 0; i < keys.n; ++i) hashes[i] = hash_key(keys.key(i), keys.len(i));
  BANASERVE_RETURN_IF_ERROR(lock());
  ClientRecord& rec = v.client(static_cast<uint32_t>(client_));
  OpRecord* op = nullptr;
  uint32_t handle = 0;
  for (uint32_t o = 0; o < v.hdr->ops_per_client; ++o) {
    if (!rec.ops()[o].in_use) {
      op = &rec.ops()[o];
      handle = o;
      break;
    }
  }
  if (op == nullptr) {
    unlock();
    return BANASERVE_STATUS(StatusCode::kResourceExhausted,
                            "this process holds all " + std::to_string(v.hdr->ops_per_client) +
                                " pin handles; unpin some first");
  }
  op->count = 0;
  op->in_use = 1;
  for (size_t i = 0; i < keys.n; ++i) {
    uint32_t s = v.find(keys.key(i), keys.len(i), hashes[i]);
    bool hit = s != kNone && v.slot(s).state.load(std::memory_order_relaxed) == kCommitted;
    addrs[i] = 0;
    if (!hit) {
      v.hdr->misses++;
      continue;
    }
    op->slots[op->count] = s;
    std::atomic_signal_fence(std::memory_order_release);
    op->count++;
    v.slot(s).pins++;
    v.slot(s).ref = 1;
    v.hdr->hits++;
    addrs[i] = reinterpret_cast<uint64_t>(v.page(s));
  }
  unlock();
  return handle;
}

Status Pool::unpin(uint32_t handle) {
  BANASERVE_RETURN_IF_ERROR(ensure_client());
  SegmentView& v = *view_;
  if (handle >= v.hdr->ops_per_client) return BANASERVE_INVALID("bad pin handle");
  BANASERVE_RETURN_IF_ERROR(lock());
  OpRecord& op = v.client(static_cast<uint32_t>(client_)).ops()[handle];
  if (!op.in_use) {
    unlock();
    return BANASERVE_STATUS(StatusCode::kNotFound, "pin handle is not held");
  }
  for (uint32_t k = 0; k < op.count; ++k) {
    Slot& sl = v.slot(op.slots[k]);
    if (sl.pins > 0) sl.pins--;
  }
  op.count = 0;
  op.in_use = 0;
  unlock();
  return Status();
}

Status Pool::reserve(const KeyList& keys, uint32_t* slots, uint8_t* results) {
  BANASERVE_RETURN_IF_ERROR(check_keys(keys));
  BANASERVE_RETURN_IF_ERROR(ensure_client());
  SegmentView& v = *view_;
  std::vector<uint64_t> hashes(keys.n);
  for (size_t i = 0; i < keys.n; ++i) hashes[i] = hash_key(keys.key(i), keys.len(i));
  BANASERVE_RETURN_IF_ERROR(lock());
  bool reaped = false;
  for (int pass = 0; pass < 2; ++pass) {
    // Classify: committed -> kExists; reserved -> kInFlight (unless its owner died); else new.
    uint64_t need = 0;
    bool dead_owner = false;
    for (size_t i = 0; i < keys.n; ++i) {
      slots[i] = kNone;
      uint32_t s = v.find(keys.key(i), keys.len(i), hashes[i]);
      if (s == kNone) {
        results[i] = static_cast<uint8_t>(PutResult::kStored);
        need++;
        continue;
      }
      Slot& sl = v.slot(s);
      if (sl.state.load(std::memory_order_relaxed) == kCommitted) {
        results[i] = static_cast<uint8_t>(PutResult::kExists);
        sl.ref = 1;
      } else {
        results[i] = static_cast<uint8_t>(PutResult::kInFlight);
        if (sl.owner != static_cast<uint32_t>(client_)) {
          ClientRecord& rec = v.client(sl.owner);
          if (!process_alive(rec.pid, rec.start_time)) dead_owner = true;
        }
      }
    }
    if (dead_owner && !reaped) {
      v.reap(client_);
      reaped = true;
      continue;
    }
    uint64_t used = v.hdr->num_pages - v.hdr->free_count;
    uint64_t target = eviction_target(used, need, v.hdr->high_mark, v.hdr->low_mark,
                                      v.hdr->num_pages);
    if (need > v.hdr->free_count && need - v.hdr->free_count > target) {
      target = need - v.hdr->free_count;
    }
    if (target > 0) v.evict(target);
    if (need > v.hdr->free_count && !reaped) {
      if (v.reap(client_) > 0 && v.hdr->free_count < need) v.evict(need - v.hdr->free_count);
      reaped = true;
    }
    v.hdr->generation++;
    for (size_t i = 0; i < keys.n; ++i) {
      if (results[i] != static_cast<uint8_t>(PutResult::kStored)) {
        if (results[i] == static_cast<uint8_t>(PutResult::kExists)) v.hdr->put_exists++;
        continue;
      }
      if (v.find(keys.key(i), keys.len(i), hashes[i]) != kNone) {  // duplicate within the batch
        results[i] = static_cast<uint8_t>(PutResult::kInFlight);
        continue;
      }
      uint32_t s = v.allocate();
      if (s == kNone) {
        results[i] = static_cast<uint8_t>(PutResult::kNoSpace);
        v.hdr->put_no_space++;
        continue;
      }
      Slot& sl = v.slot(s);
      std::memcpy(sl.key(), keys.key(i), keys.len(i));
      sl.key_len = static_cast<uint16_t>(keys.len(i));
      sl.hash = hashes[i];
      sl.owner = static_cast<uint32_t>(client_);
      sl.pins = 0;
      sl.ref = 1;
      sl.gen = v.hdr->generation;
      sl.state.store(kReserved, std::memory_order_release);
      v.link(s);
      v.hdr->reserved++;
      slots[i] = s;
    }
    break;
  }
  unlock();
  return Status();
}

Status Pool::commit(const uint32_t* slots, size_t n) {
  BANASERVE_RETURN_IF_ERROR(lock());
  SegmentView& v = *view_;
  size_t lost = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t s = slots[i];
    if (s == kNone) continue;
    if (s >= v.hdr->num_pages) {
      lost++;
      continue;
    }
    Slot& sl = v.slot(s);
    if (sl.state.load(std::memory_order_relaxed) != kReserved ||
        sl.owner != static_cast<uint32_t>(client_)) {
      lost++;
      continue;
    }
    sl.state.store(kCommitted, std::memory_order_release);
    v.hdr->reserved--;
    v.hdr->committed++;
    v.hdr->puts++;
  }
  unlock();
  if (lost > 0) {
    return BANASERVE_STATUS(StatusCode::kNotFound,
                            std::to_string(lost) + " reservation(s) were not held by this client");
  }
  return Status();
}

Status Pool::abort(const uint32_t* slots, size_t n) {
  BANASERVE_RETURN_IF_ERROR(lock());
  SegmentView& v = *view_;
  for (size_t i = 0; i < n; ++i) {
    uint32_t s = slots[i];
    if (s == kNone || s >= v.hdr->num_pages) continue;
    Slot& sl = v.slot(s);
    if (sl.state.load(std::memory_order_relaxed) == kReserved &&
        sl.owner == static_cast<uint32_t>(client_)) {
      v.release(s);
    }
  }
  unlock();
  return Status();
}

StatusOr<uint8_t*> Pool::page_address(uint32_t slot) {
  BANASERVE_RETURN_IF_ERROR(ensure_client());
  if (slot >= view_->hdr->num_pages) return BANASERVE_INVALID("slot out of range");
  BANASERVE_RETURN_IF_ERROR(lock());
  Slot& sl = view_->slot(slot);
  bool mine = sl.state.load(std::memory_order_relaxed) == kReserved &&
              sl.owner == static_cast<uint32_t>(client_);
  unlock();
  if (!mine) {
    return BANASERVE_STATUS(StatusCode::kNotFound, "slot is not reserved by this client");
  }
  return reinterpret_cast<uint8_t*>(view_->page(slot));
}

Status Pool::put(const KeyList& keys, const IoList& src, uint8_t* results) {
  BANASERVE_RETURN_IF_ERROR(check_keys(keys));
  BANASERVE_RETURN_IF_ERROR(check_io(src));
  BANASERVE_RETURN_IF_ERROR(ensure_client());
  std::vector<uint32_t> slots(kOpChunk);
  for (size_t begin = 0; begin < keys.n; begin += kOpChunk) {
    size_t end = std::min(keys.n, begin + kOpChunk);
    KeyList chunk{keys.data, keys.offsets + begin, end - begin};
    BANASERVE_RETURN_IF_ERROR(reserve(chunk, slots.data(), results + begin));
    for (size_t i = begin; i < end; ++i) {
      uint32_t s = slots[i - begin];
      if (s != kNone) copy_in(view_->page(s), src, i);
    }
    BANASERVE_RETURN_IF_ERROR(commit(slots.data(), end - begin));
  }
  return Status();
}

Status Pool::remove(const KeyList& keys, size_t* removed) {
  BANASERVE_RETURN_IF_ERROR(check_keys(keys));
  BANASERVE_RETURN_IF_ERROR(check_open());
  BANASERVE_RETURN_IF_ERROR(lock());
  SegmentView& v = *view_;
  size_t count = 0;
  for (size_t i = 0; i < keys.n; ++i) {
    uint32_t s = v.find(keys.key(i), keys.len(i), hash_key(keys.key(i), keys.len(i)));
    if (s == kNone) continue;
    Slot& sl = v.slot(s);
    if (sl.state.load(std::memory_order_relaxed) != kCommitted || sl.pins != 0) continue;
    v.release(s);
    v.hdr->removals++;
    count++;
  }
  unlock();
  if (removed != nullptr) *removed = count;
  return Status();
}

Status Pool::clear(size_t* removed) {
  BANASERVE_RETURN_IF_ERROR(check_open());
  BANASERVE_RETURN_IF_ERROR(lock());
  SegmentView& v = *view_;
  size_t count = 0;
  for (uint32_t s = 0; s < v.hdr->num_pages; ++s) {
    Slot& sl = v.slot(s);
    if (sl.state.load(std::memory_order_relaxed) != kCommitted || sl.pins != 0) continue;
    v.release(s);
    v.hdr->removals++;
    count++;
  }
  unlock();
  if (removed != nullptr) *removed = count;
  return Status();
}

Status Pool::reap(size_t* reaped) {
  BANASERVE_RETURN_IF_ERROR(lock());
  size_t n = view_->reap(client_pid_ == getpid() ? client_.load() : -1);
  unlock();
  if (reaped != nullptr) *reaped = n;
  return Status();
}

StatusOr<PoolStats> Pool::stats() {
  BANASERVE_RETURN_IF_ERROR(lock());
  SegmentView& v = *view_;
  Header* h = v.hdr;
  PoolStats s;
  s.num_pages = h->num_pages;
  s.page_size = h->page_size;
  s.max_key_len = h->max_key_len;
  s.segment_bytes = h->total_bytes;
  s.overhead_bytes = h->total_bytes - h->num_pages * h->page_size;
  s.committed_pages = h->committed;
  s.reserved_pages = h->reserved;
  s.free_pages = h->free_count;
  for (uint32_t c = 0; c < h->max_clients; ++c) {
    ClientRecord& rec = v.client(c);
    if (!rec.active.load(std::memory_order_acquire)) continue;
    s.clients++;
    for (uint32_t o = 0; o < h->ops_per_client; ++o) {
      if (rec.ops()[o].in_use) s.pinned_pages += rec.ops()[o].count;
    }
  }
  s.hits = h->hits;
  s.misses = h->misses;
  s.exists_hits = h->exists_hits;
  s.exists_misses = h->exists_misses;
  s.puts = h->puts;
  s.put_exists = h->put_exists;
  s.put_no_space = h->put_no_space;
  s.evictions = h->evictions;
  s.removals = h->removals;
  s.reaped_clients = h->reaped_clients;
  s.lock_recoveries = h->lock_recoveries;
  s.created_unix_ns = h->created_unix_ns;
  s.segment_id = h->segment_id;
  s.closed = h->closed.load() != 0;
  unlock();
  return s;
}

Status Pool::close_segment() {
  view_->hdr->closed.store(1, std::memory_order_release);
  return Status();
}

}  // namespace banaserve::kvpool
