// SPDX-License-Identifier: Apache-2.0
#include "control_ring.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>

namespace banaserve::transfer::shm {
namespace {

size_t slots_offset() { return (sizeof(ControlHeader) + 63) & ~size_t{63}; }

long futex(std::atomic<uint32_t>* word, int op, uint32_t val, const struct timespec* timeout) {
  // Not FUTEX_PRIVATE_FLAG: the word lives in memory shared between processes.
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, timeout, nullptr, 0);
}

}  // namespace

size_t control_area_nbytes(uint32_t capacity) {
  return slots_offset() + static_cast<size_t>(capacity) * sizeof(Slot);
}

bool copy_engine_id(char (&dst)[kEngineIdCapacity], const std::string& id) {
  if (id.size() >= kEngineIdCapacity) return false;
  std::memset(dst, 0, kEngineIdCapacity);
  std::memcpy(dst, id.data(), id.size());
  return true;
}

StatusOr<ControlRing> ControlRing::init(void* mem, size_t nbytes, uint32_t capacity,
                                        int32_t owner_pid, const std::string& owner_id) {
  if (capacity < 2 || (capacity & (capacity - 1)) != 0) {
    return BANASERVE_INVALID("control ring capacity must be a power of two >= 2, got " +
                             std::to_string(capacity));
  }
  if (mem == nullptr || nbytes < control_area_nbytes(capacity)) {
    return BANASERVE_INVALID("control area too small for " + std::to_string(capacity) + " slots");
  }
  auto* hdr = new (mem) ControlHeader();
  hdr->magic = 0;  // published last
  hdr->version = kControlVersion;
  hdr->capacity = capacity;
  hdr->owner_pid = owner_pid;
  hdr->reserved = 0;
  if (!copy_engine_id(hdr->owner_id, owner_id)) {
    return BANASERVE_INVALID("engine id longer than " + std::to_string(kEngineIdCapacity - 1) +
                             " bytes: '" + owner_id + "'");
  }
  hdr->enqueue_pos.store(0, std::memory_order_relaxed);
  hdr->dequeue_pos.store(0, std::memory_order_relaxed);
  hdr->futex_word.store(0, std::memory_order_relaxed);
  hdr->sleeping.store(0, std::memory_order_relaxed);
  auto* slots = reinterpret_cast<Slot*>(static_cast<char*>(mem) + slots_offset());
  for (uint32_t i = 0; i < capacity; ++i) {
    auto* s = new (&slots[i]) Slot();
    s->seq.store(i, std::memory_order_relaxed);
  }
  std::atomic_thread_fence(std::memory_order_release);
  hdr->magic = kControlMagic;
  ControlRing ring;
  ring.hdr_ = hdr;
  ring.slots_ = slots;
  ring.mask_ = capacity - 1;
  return ring;
}

StatusOr<ControlRing> ControlRing::attach(void* mem, size_t nbytes) {
  if (mem == nullptr || nbytes < sizeof(ControlHeader)) {
    return BANASERVE_STATUS(StatusCode::kProtocolError, "control area too small to hold a header");
  }
  auto* hdr = static_cast<ControlHeader*>(mem);
  if (hdr->magic != kControlMagic) {
    return BANASERVE_STATUS(StatusCode::kProtocolError, "control area has a bad magic number");
  }
  if (hdr->version != kControlVersion) {
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "control area version " + std::to_string(hdr->version) +
                                ", expected " + std::to_string(kControlVersion));
  }
  uint32_t cap = hdr->capacity;
  if (cap < 2 || (cap & (cap - 1)) != 0 || nbytes < control_area_nbytes(cap)) {
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "control area capacity " + std::to_string(cap) + " does not fit " +
                                std::to_string(nbytes) + " bytes");
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  ControlRing ring;
  ring.hdr_ = hdr;
  ring.slots_ = reinterpret_cast<Slot*>(static_cast<char*>(mem) + slots_offset());
  ring.mask_ = cap - 1;
  return ring;
}

bool ControlRing::try_push(const Notice& notice) {
  uint64_t pos = hdr_->enqueue_pos.load(std::memory_order_relaxed);
  for (;;) {
    Slot& slot = slots_[pos & mask_];
    uint64_t seq = slot.seq.load(std::memory_order_acquire);
    auto dif = static_cast<int64_t>(seq - pos);
    if (dif == 0) {
      if (hdr_->enqueue_pos.compare_exchange_weak(pos, pos + 1, std::memory_order_relaxed)) {
        slot.notice = notice;
        slot.seq.store(pos + 1, std::memory_order_release);
        return true;
      }
    } else if (dif < 0) {
      return false;  // the slot still holds an entry from one lap ago: full
    } else {
      pos = hdr_->enqueue_pos.load(std::memory_order_relaxed);
    }
  }
}

void ControlRing::wake_if_sleeping() {
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (hdr_->sleeping.load(std::memory_order_relaxed) != 0) wake();
}

void ControlRing::wake() {
  hdr_->futex_word.fetch_add(1, std::memory_order_seq_cst);
  futex(&hdr_->futex_word, FUTEX_WAKE, 1, nullptr);
}

bool ControlRing::try_pop(Notice* out) {
  uint64_t pos = hdr_->dequeue_pos.load(std::memory_order_relaxed);
  Slot& slot = slots_[pos & mask_];
  uint64_t seq = slot.seq.load(std::memory_order_acquire);
  if (static_cast<int64_t>(seq - (pos + 1)) < 0) return false;  // not yet published
  *out = slot.notice;
  out->source[kEngineIdCapacity - 1] = '\0';  // never trust a peer's string
  hdr_->dequeue_pos.store(pos + 1, std::memory_order_relaxed);
  slot.seq.store(pos + mask_ + 1, std::memory_order_release);
  return true;
}

bool ControlRing::empty() const {
  uint64_t pos = hdr_->dequeue_pos.load(std::memory_order_relaxed);
  const Slot& slot = slots_[pos & mask_];
  return static_cast<int64_t>(slot.seq.load(std::memory_order_acquire) - (pos + 1)) < 0;
}

uint32_t ControlRing::prepare_sleep() {
  uint32_t seen = hdr_->futex_word.load(std::memory_order_acquire);
  hdr_->sleeping.store(1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return seen;
}

void ControlRing::finish_sleep() { hdr_->sleeping.store(0, std::memory_order_relaxed); }

void ControlRing::wait(uint32_t seen, int timeout_ms) {
  struct timespec ts;
  ts.tv_sec = timeout_ms / 1000;
  ts.tv_nsec = static_cast<long>(timeout_ms % 1000) * 1000000L;
  futex(&hdr_->futex_word, FUTEX_WAIT, seen, &ts);  // EAGAIN/ETIMEDOUT/EINTR: caller re-checks
}

}  // namespace banaserve::transfer::shm
