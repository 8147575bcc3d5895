// SPDX-License-Identifier: Apache-2.0
#include "banaserve/transfer/completion.h"

#include <sched.h>
#include <time.h>

namespace banaserve::transfer {

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

void IoGate::close() {
  count_.fetch_or(kClosed, std::memory_order_acq_rel);
  // Sections are short by contract (completion.h): yield until the ones in progress leave.
  while ((count_.load(std::memory_order_acquire) & ~kClosed) != 0) sched_yield();
}

void Waiter::notify_all() {
  // Pairs with the increment of sleepers_ in wait_until: either the waiter sees the new state in
  // its predicate check under mu_, or we see it sleeping and wake it.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (sleepers_.load(std::memory_order_seq_cst) > 0) {
    { std::lock_guard<std::mutex> lock(mu_); }
    cv_.notify_all();
  }
}

Batch::Batch(uint64_t id, Op op, std::string peer_id, uint64_t nbytes, uint64_t deadline_ns,
             NotifyTag tag)
    : id_(id), op_(op), peer_id_(std::move(peer_id)), nbytes_(nbytes), deadline_ns_(deadline_ns),
      tag_(tag) {}

Status Batch::status() const {
  std::lock_guard<std::mutex> lock(status_mu_);
  return final_status_;
}

Status Batch::wait(int64_t timeout_ms) {
  const uint64_t deadline = timeout_ms < 0 ? 0 : now_ns() + static_cast<uint64_t>(timeout_ms) * 1000000ull;
  auto terminal = [this] { return is_terminal(state_.load(std::memory_order_acquire)); };
  if (!waiter_.wait_until(terminal, deadline)) {
    return BANASERVE_STATUS(StatusCode::kTimeout,
                            "batch " + std::to_string(id_) + " still running after " +
                                std::to_string(timeout_ms) + " ms");
  }
  return status();
}

void Batch::cancel() { cancel_requested_.store(true, std::memory_order_release); }

void Batch::mark_running() {
  TransferState expected = TransferState::kPending;
  state_.compare_exchange_strong(expected, TransferState::kRunning, std::memory_order_acq_rel);
}

void Batch::complete_part(const Status& status) {
  if (!status.ok()) {
    std::lock_guard<std::mutex> lock(status_mu_);
    if (first_error_.ok()) first_error_ = status;
  }
  if (parts_left_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  Status err;
  {
    std::lock_guard<std::mutex> lock(status_mu_);
    err = first_error_;
  }
  if (err.ok()) {
    finish(TransferState::kDone, Status());
  } else if (err.code() == StatusCode::kCancelled) {
    finish(TransferState::kCancelled, err);
  } else {
    finish(TransferState::kFailed, err);
  }
}

void Batch::abort(const Status& status) {
  if (is_terminal(state())) return;
  io_.close();
  finish(status.code() == StatusCode::kCancelled ? TransferState::kCancelled
                                                 : TransferState::kFailed,
         status);
}

void Batch::finish(TransferState state, const Status& status) {
  {
    std::lock_guard<std::mutex> lock(status_mu_);
    TransferState cur = state_.load(std::memory_order_acquire);
    if (is_terminal(cur)) return;  // the first terminal state wins
    final_status_ = status;
    state_.store(state, std::memory_order_release);
  }
  waiter_.notify_all();
}

}  // namespace banaserve::transfer
