// SPDX-License-Identifier: Apache-2.0
// Completion objects: Batch (one submitted transfer) and the IoGate that enforces
// "no memory access after a terminal state".
//
// CANCELLATION AND TERMINATION CONTRACT
//  * Batch::cancel() only requests cancellation and returns at once. Backends observe the request
//    between chunks; the batch then ends CANCELLED, or DONE if every byte had already moved.
//    Callers keep waiting (wait()) until the state is terminal.
//  * The engine may abort a batch (deadline passed, peer died, engine stopped): it closes the
//    batch's IoGate, waits for the I/O sections in progress to leave, and only then publishes
//    FAILED. From that moment no backend thread reads or writes that batch's memory again; parts
//    that finish later are ignored. (This is the guarantee Mooncake's sync API lacks: a timed-out
//    transfer there may still write into the destination later.)
//  * Backends therefore wrap every access to batch memory in IoGate::enter()/leave() and keep
//    each such section short (no unbounded blocking inside: use poll with a timeout).
//  * A terminal state never changes. wait() returning DONE means every byte is in place.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>

#include "banaserve/common/status.h"
#include "banaserve/transfer/types.h"

namespace banaserve::transfer {

uint64_t now_ns();  // CLOCK_MONOTONIC

/// Counts I/O sections in progress; once closed, enter() fails and close() waits for the
/// sections in progress to leave.
class IoGate {
 public:
  /// True if the caller may touch the memory; it must then call leave() exactly once.
  bool enter() {
    uint64_t v = count_.fetch_add(1, std::memory_order_acq_rel);
    if (v & kClosed) {
      count_.fetch_sub(1, std::memory_order_acq_rel);
      return false;
    }
    return true;
  }
  void leave() { count_.fetch_sub(1, std::memory_order_acq_rel); }
  /// Closes the gate and waits until no section is in progress. Idempotent.
  void close();
  bool closed() const { return count_.load(std::memory_order_acquire) & kClosed; }

 private:
  static constexpr uint64_t kClosed = uint64_t{1} << 62;
  std::atomic<uint64_t> count_{0};
};

/// RAII section of an IoGate.
class IoSection {
 public:
  explicit IoSection(IoGate& gate) : gate_(gate), open_(gate.enter()) {}
  ~IoSection() {
    if (open_) gate_.leave();
  }
  IoSection(const IoSection&) = delete;
  IoSection& operator=(const IoSection&) = delete;
  bool open() const { return open_; }

 private:
  IoGate& gate_;
  bool open_;
};

/// Waits with spin-then-block on a condition published through notify_all().
class Waiter {
 public:
  static constexpr uint64_t kSpinNs = 100000;  // 100 us
  /// Spins briefly, then blocks until pred() or the deadline (0 = no deadline).
  /// Returns pred() at exit.
  template <typename Pred>
  bool wait_until(Pred pred, uint64_t deadline_ns);
  void notify_all();

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> sleepers_{0};
};

/// One submitted batch. Shared between the caller's handle, the engine and the backend.
class Batch {
 public:
  Batch(uint64_t id, Op op, std::string peer_id, uint64_t nbytes, uint64_t deadline_ns,
        NotifyTag tag);

  uint64_t id() const { return id_; }
  Op op() const { return op_; }
  const std::string& peer_id() const { return peer_id_; }
  uint64_t nbytes() const { return nbytes_; }
  uint64_t deadline_ns() const { return deadline_ns_; }
  const NotifyTag& tag() const { return tag_; }

  TransferState state() const { return state_.load(std::memory_order_acquire); }
  /// OK while not terminal or DONE; the reason when FAILED or CANCELLED.
  Status status() const;

  /// Waits until terminal or timeout. Returns the terminal state's Status: OK (DONE), the failure,
  /// kCancelled; kTimeout when still not terminal at the deadline (the batch keeps running).
  /// timeout_ms < 0 waits forever.
  Status wait(int64_t timeout_ms);

  /// Requests cancellation (see the contract above). Returns at once.
  void cancel();
  bool cancel_requested() const { return cancel_requested_.load(std::memory_order_acquire); }

  // ---- backend side ------------------------------------------------------------------------
  /// Declares how many parts will complete; call once from inside Transport::post, before any
  /// part completes. Default is 1.
  void set_parts(uint32_t parts) { parts_left_.store(parts, std::memory_order_release); }
  void mark_running();
  /// One part finished. When the last one does, the batch becomes DONE (all OK and not
  /// cancelled), CANCELLED (cancel requested and some part stopped early) or FAILED (first error).
  void complete_part(const Status& status);
  IoGate& io() { return io_; }

  // ---- engine side -------------------------------------------------------------------------
  /// Closes the IoGate, waits for sections in progress, then becomes FAILED (or CANCELLED when
  /// status is kCancelled). No-op if already terminal.
  void abort(const Status& status);

 private:
  void finish(TransferState state, const Status& status);

  const uint64_t id_;
  const Op op_;
  const std::string peer_id_;
  const uint64_t nbytes_;
  const uint64_t deadline_ns_;
  const NotifyTag tag_;

  std::atomic<TransferState> state_{TransferState::kPending};
  std::atomic<uint32_t> parts_left_{1};
  std::atomic<bool> cancel_requested_{false};
  IoGate io_;
  mutable std::mutex status_mu_;
  Status first_error_;   // guarded by status_mu_
  Status final_status_;  // guarded by status_mu_, set once at finish
  Waiter waiter_;
};

// ---- template implementation -----------------------------------------------------------------
template <typename Pred>
bool Waiter::wait_until(Pred pred, uint64_t deadline_ns) {
  // Cross-core wake-ups cost ~25-30 us on the target VMs (and a blocked waiter pays a second one
  // to get back on a CPU), so spin for a bounded time first: an acknowledged remote op completes
  // within ~20-60 us, well inside the spin. The bound is time, not iterations, since PAUSE
  // latency differs by an order of magnitude between CPU generations.
  const uint64_t spin_until = now_ns() + kSpinNs;
  for (uint32_t i = 0;; ++i) {
    if (pred()) return true;
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
    if ((i & 63) == 63) {
      const uint64_t now = now_ns();
      if (now >= spin_until || (deadline_ns != 0 && now >= deadline_ns)) break;
    }
  }
  std::unique_lock<std::mutex> lock(mu_);
  sleepers_.fetch_add(1, std::memory_order_acq_rel);
  bool result;
  if (deadline_ns == 0) {
    cv_.wait(lock, pred);
    result = true;
  } else {
    while (!(result = pred())) {
      uint64_t now = now_ns();
      if (now >= deadline_ns) break;
      cv_.wait_for(lock, std::chrono::nanoseconds(deadline_ns - now));
    }
  }
  sleepers_.fetch_sub(1, std::memory_order_acq_rel);
  return result;
}

}  // namespace banaserve::transfer
