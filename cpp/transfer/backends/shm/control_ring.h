// SPDX-License-Identifier: Apache-2.0
// The shm backend's control area: a bounded multi-producer / single-consumer ring of notifications
// living in a MAP_SHARED memfd, plus a futex word the consumer sleeps on. Producers are other
// processes (peers that wrote into our memory); the consumer is this engine's delivery thread.
//
// The ring is a Vyukov bounded queue: every slot carries a sequence number, producers claim a
// position with a CAS on enqueue_pos and publish the slot with a release store of seq = pos + 1;
// the consumer reads slots in order and frees them with seq = pos + capacity. Everything is
// lock-free and address-free (std::atomic on 4/8-byte words), so it works across processes that
// map the same memory at different addresses.
//
// Sleep protocol (no lost wake-ups): the consumer reads futex_word, sets sleeping = 1, re-checks
// the ring and only then FUTEX_WAITs on the value it read. A producer publishes its slot, issues
// a seq_cst fence and, only if sleeping != 0, bumps futex_word and FUTEX_WAKEs.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

#include "banaserve/common/status.h"

namespace banaserve::transfer::shm {

inline constexpr uint64_t kControlMagic = 0x316d687361616e62ULL;  // "bnaashm1"
inline constexpr uint32_t kControlVersion = 1;
inline constexpr size_t kEngineIdCapacity = 128;  // bytes, NUL included

/// One notification: "every byte of (transfer_id, layer) from `source` is in your memory".
struct Notice {
  char source[kEngineIdCapacity];  // NUL-terminated engine id of the sender
  uint64_t transfer_id;
  uint32_t layer;
  uint32_t num_layers;
  uint32_t status_code;  // banaserve::StatusCode of the batch (kOk normally)
  uint32_t reserved;
};

struct alignas(64) Slot {
  std::atomic<uint64_t> seq;
  Notice notice;
};

struct ControlHeader {
  uint64_t magic;
  uint32_t version;
  uint32_t capacity;  // power of two
  int32_t owner_pid;
  uint32_t reserved;
  char owner_id[kEngineIdCapacity];
  alignas(64) std::atomic<uint64_t> enqueue_pos;
  alignas(64) std::atomic<uint64_t> dequeue_pos;
  alignas(64) std::atomic<uint32_t> futex_word;
  std::atomic<uint32_t> sleeping;
};

static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory ring needs lock-free u64");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared-memory ring needs lock-free u32");
static_assert(sizeof(std::atomic<uint32_t>) == 4, "futex word must be 32 bits");

/// Bytes a control area of `capacity` slots occupies.
size_t control_area_nbytes(uint32_t capacity);

/// Copies an engine id into a fixed field; false if it does not fit (NUL included).
bool copy_engine_id(char (&dst)[kEngineIdCapacity], const std::string& id);

/// A view of a control area. Does not own the memory.
class ControlRing {
 public:
  ControlRing() = default;

  /// Formats mem (zeroed or not) as an empty ring. capacity must be a power of two >= 2 and
  /// nbytes >= control_area_nbytes(capacity); owner_id must fit kEngineIdCapacity.
  static StatusOr<ControlRing> init(void* mem, size_t nbytes, uint32_t capacity, int32_t owner_pid,
                                    const std::string& owner_id);
  /// Validates an area formatted by init() (magic, version, capacity against nbytes).
  static StatusOr<ControlRing> attach(void* mem, size_t nbytes);

  bool valid() const { return hdr_ != nullptr; }
  const ControlHeader* header() const { return hdr_; }
  uint32_t capacity() const { return static_cast<uint32_t>(mask_ + 1); }

  /// Producer side (any process): false when the ring is full.
  bool try_push(const Notice& notice);
  /// Producer side: wakes the consumer if it announced that it sleeps.
  void wake_if_sleeping();
  /// Unconditional wake (used by the owner to stop its own consumer).
  void wake();

  /// Consumer side (exactly one thread in the owner process).
  bool try_pop(Notice* out);
  bool empty() const;
  /// Announces sleep; returns the futex value to pass to wait(). Call finish_sleep() afterwards.
  uint32_t prepare_sleep();
  void finish_sleep();
  /// FUTEX_WAIT on futex_word while it equals `seen`, at most timeout_ms.
  void wait(uint32_t seen, int timeout_ms);

 private:
  ControlHeader* hdr_ = nullptr;
  Slot* slots_ = nullptr;
  uint64_t mask_ = 0;
};

}  // namespace banaserve::transfer::shm
