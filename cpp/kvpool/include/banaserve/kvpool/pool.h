// SPDX-License-Identifier: Apache-2.0
// banaserve::kvpool::Pool: a page store in POSIX shared memory that every process on the host
// attaches to by name. Values are pages of one fixed size per pool; keys are byte strings.
//
// Data path: one memcpy between the caller's memory and the segment, no server hop. Metadata
// (index, allocator, pins) sits behind one process-shared robust mutex held only for lookups,
// never during copies. Writes are two-phase (reserve -> copy -> commit): a reader never sees a
// reserved page, and of several concurrent writers of one key exactly one reserves it. Readers pin
// the pages they copy, so CLOCK eviction (at the high watermark) never takes a page being read.
// A process killed at any point leaves no partial page and no stuck lock: the mutex is robust and
// the next owner rebuilds the derived structures; reservations and pins of dead processes are
// reclaimed (dead = pid gone, zombie, or reused with another start time).
#pragma once

#include <cstddef>
#include <cstdint>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "banaserve/common/status.h"
#include "banaserve/kvpool/layout.h"

namespace banaserve::kvpool {

struct PoolOptions {
  uint64_t capacity_bytes = 0;  ///< page data bytes; num_pages = capacity_bytes / page_size
  uint32_t page_size = 0;
  uint32_t max_key_len = 128;
  uint32_t max_clients = 64;
  uint32_t ops_per_client = 8;
  double high_watermark = 0.95;  ///< evict when a put would pass this fraction of pages in use
  double low_watermark = 0.90;   ///< ... down to this fraction
  bool populate = true;          ///< pre-fault the segment at creation
};

/// A borrowed list of n keys: key i is data[offsets[i] .. offsets[i+1]).
struct KeyList {
  const char* data = nullptr;
  const uint64_t* offsets = nullptr;  // n + 1 entries
  size_t n = 0;
  const char* key(size_t i) const { return data + offsets[i]; }
  size_t len(size_t i) const { return static_cast<size_t>(offsets[i + 1] - offsets[i]); }
};

/// Caller memory for n pages, each split into `segments` pieces: page i piece j lives at
/// addrs[i * segments + j] and has seg_lens[j] bytes; the pieces of one page sum to page_size.
struct IoList {
  const uint64_t* addrs = nullptr;
  const uint64_t* seg_lens = nullptr;
  size_t segments = 1;
};

/// Outcome of a put, per key.
enum class PutResult : uint8_t {
  kStored = 0,    ///< this call wrote and committed the page
  kExists = 1,    ///< already committed (by anyone); left untouched
  kInFlight = 2,  ///< another live writer holds the reservation; it will commit
  kNoSpace = 3,   ///< no free or evictable page (all in use and pinned or reserved)
};

struct PoolStats {
  uint64_t num_pages = 0;
  uint32_t page_size = 0;
  uint32_t max_key_len = 0;
  uint64_t segment_bytes = 0;
  uint64_t overhead_bytes = 0;
  uint64_t committed_pages = 0;
  uint64_t reserved_pages = 0;
  uint64_t pinned_pages = 0;
  uint64_t free_pages = 0;
  uint64_t clients = 0;
  uint64_t hits = 0;
  uint64_t misses = 0;
  uint64_t exists_hits = 0;
  uint64_t exists_misses = 0;
  uint64_t puts = 0;
  uint64_t put_exists = 0;
  uint64_t put_no_space = 0;
  uint64_t evictions = 0;
  uint64_t removals = 0;
  uint64_t reaped_clients = 0;
  uint64_t lock_recoveries = 0;
  uint64_t created_unix_ns = 0;
  uint64_t segment_id = 0;
  bool closed = false;
};

/// Where the page data lies in this process's mapping: the page of slot s starts at
/// addr + s * stride (see page_of). A pool service registers [addr, addr + nbytes()) with a
/// transfer engine so remote clients' pages move in and out of it without a copy.
struct PageRegion {
  uint64_t addr = 0;
  uint64_t stride = 0;
  uint64_t num_pages = 0;
  uint64_t nbytes() const { return stride * num_pages; }
};

/// Address of slot `slot`'s page in `region` (no range check: callers hold a slot id the pool gave).
inline uint64_t page_of(const PageRegion& region, uint32_t slot) {
  return region.addr + region.stride * static_cast<uint64_t>(slot);
}

struct SegmentView;  // the mapped header and regions (pool.cc)

class Pool {
 public:
  /// Creates the segment `name` ([A-Za-z0-9_.-], 1..64 chars). AlreadyExists if it exists.
  static StatusOr<std::unique_ptr<Pool>> create(const std::string& name, const PoolOptions& opts);
  /// Attaches to an existing segment. NotFound if absent, Unavailable if closed or initialising.
  static StatusOr<std::unique_ptr<Pool>> open(const std::string& name, bool populate = false);
  /// Removes the name (attached processes keep their mapping). NotFound if absent.
  static Status unlink(const std::string& name);
  static Status validate_name(const std::string& name);

  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  const std::string& name() const { return name_; }
  uint32_t page_size() const;
  uint64_t num_pages() const;
  uint32_t max_key_len() const;
  uint64_t segment_id() const;
  PageRegion page_region() const;

  /// found[i] = 1 when key i is committed; *leading = number of leading hits. found may be null.
  Status exists(const KeyList& keys, uint8_t* found, size_t* leading);
  /// Copies every committed key's page into dst; found[i] says which. *hits = count of found.
  Status get(const KeyList& keys, const IoList& dst, uint8_t* found, size_t* hits);
  /// Two-phase put of each key from src; results[i] is a PutResult.
  Status put(const KeyList& keys, const IoList& src, uint8_t* results);
  /// Removes committed, unpinned keys; *removed = how many.
  Status remove(const KeyList& keys, size_t* removed);
  /// Removes every committed unpinned page.
  Status clear(size_t* removed);

  // Two-phase put, step by step (tests and custom writers). reserve() gives slot ids (kNone where
  // results[i] != kStored); write into page_address(slot) only while reserved; then commit/abort.
  Status reserve(const KeyList& keys, uint32_t* slots, uint8_t* results);
  Status commit(const uint32_t* slots, size_t n);
  Status abort(const uint32_t* slots, size_t n);
  StatusOr<uint8_t*> page_address(uint32_t slot);

  /// Zero-copy read: pins up to kOpChunk committed keys and gives their page addresses
  /// (addrs[i] = 0 where key i is missing). The pages stay readable and unevictable until
  /// unpin(handle); pins of a process that dies are reclaimed. ResourceExhausted when this
  /// process already holds ops_per_client pin handles.
  StatusOr<uint32_t> pin(const KeyList& keys, uint64_t* addrs);
  Status unpin(uint32_t handle);

  /// Reclaims pins and reservations of dead processes; *reaped = clients reclaimed.
  Status reap(size_t* reaped);
  StatusOr<PoolStats> stats();
  /// Marks the segment closed: every attached client's next call fails with Unavailable.
  Status close_segment();

 private:
  friend struct PoolTestPeer;  // tests: take the lock and die holding it
  Pool() = default;
  Status ensure_client();
  Status lock();
  void unlock();
  Status check_open() const;
  Status check_keys(const KeyList& keys) const;
  Status check_io(const IoList& io) const;

  std::string name_;
  void* base_ = nullptr;
  uint64_t mapped_bytes_ = 0;
  std::atomic<int> client_{-1};
  std::atomic<int> client_pid_{0};
  std::mutex client_mu_;  // first attach of this process (or of a forked child)
  bool owner_ = false;
  std::unique_ptr<SegmentView> view_;
};

}  // namespace banaserve::kvpool
