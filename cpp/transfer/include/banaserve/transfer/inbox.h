// SPDX-License-Identifier: Apache-2.0
// The receiving side of notified transfers (layer-wise streams).
//
// A sender tags each batch with NotifyTag{transfer_id, layer, num_layers}; once every byte of the
// batch is in the receiver's memory the receiver's Inbox gets deliver(). A receiver calls
// Engine::expect(transfer_id, ...) before or after the first layer arrives (early notifications
// are kept until expected or until they expire) and waits per layer or for all.
//
// No write after failure: backends that scatter bytes into the receiver's memory (tcp) do it inside
// Inbox::enter(transfer_id) sections; once a stream failed (deadline, peer death, cancel), its gate
// is closed and the backend discards the bytes instead.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "banaserve/common/status.h"
#include "banaserve/transfer/completion.h"
#include "banaserve/transfer/types.h"

namespace banaserve::transfer {

class RecvStream {
 public:
  RecvStream(uint64_t transfer_id, uint32_t num_layers, std::string from_engine,
             uint64_t deadline_ns);

  uint64_t transfer_id() const { return transfer_id_; }
  uint32_t num_layers() const;
  const std::string& from_engine() const { return from_engine_; }
  TransferState state() const { return state_.load(std::memory_order_acquire); }
  Status status() const;
  uint32_t layers_done() const;
  bool layer_done(uint32_t layer) const;

  /// Waits for one layer (or the failure of the stream). OK, the failure, or kTimeout.
  Status wait_layer(uint32_t layer, int64_t timeout_ms);
  /// Waits for every layer. OK, the failure, or kTimeout.
  Status wait_all(int64_t timeout_ms);
  /// Stops accepting bytes (closes the gate) and ends CANCELLED unless already terminal.
  void cancel();

  // ---- engine / backend side ----
  IoGate& io() { return io_; }
  void on_layer(uint32_t layer, uint32_t num_layers, const Status& status);
  void fail(const Status& status);  // closes the gate, then FAILED (kCancelled → CANCELLED)
  uint64_t deadline_ns() const { return deadline_ns_; }
  void set_expected(uint32_t num_layers, const std::string& from_engine, uint64_t deadline_ns);

 private:
  const uint64_t transfer_id_;
  mutable std::mutex mu_;
  uint32_t num_layers_;       // guarded by mu_ (0 until known)
  std::vector<bool> done_;    // guarded by mu_
  uint32_t layers_done_ = 0;  // guarded by mu_
  std::string from_engine_;
  uint64_t deadline_ns_;
  std::atomic<TransferState> state_{TransferState::kRunning};
  Status status_;  // guarded by mu_
  IoGate io_;
  Waiter waiter_;
};

class Inbox {
 public:
  /// Returns the stream for transfer_id, creating it if no notification arrived yet. An expected
  /// stream stays until release(). from_engine "" accepts any sender (then peer death does not
  /// fail it; its deadline does).
  std::shared_ptr<RecvStream> expect(uint64_t transfer_id, uint32_t num_layers,
                                     const std::string& from_engine, uint64_t deadline_ns);
  void release(uint64_t transfer_id);

  /// Backend side: the stream that bytes of transfer_id belong to (created as "early" if
  /// unknown, expiring at early_deadline_ns unless expected). Never null.
  std::shared_ptr<RecvStream> stream_for(uint64_t transfer_id, const std::string& from_engine,
                                         uint64_t early_deadline_ns);
  /// Backend side: every byte of (tag.transfer_id, tag.layer) is in place (or failed).
  void deliver(const std::string& from_engine, const NotifyTag& tag, const Status& status,
               uint64_t early_deadline_ns);

  /// Engine side: fails every stream expecting from engine_id.
  void fail_peer(const std::string& engine_id, const Status& why);
  /// Engine side: fails streams past their deadline; drops early streams nobody expected.
  void expire(uint64_t now_ns);
  /// Engine side: fails everything (engine stopping).
  void fail_all(const Status& why);
  size_t size() const;

 private:
  struct Entry {
    std::shared_ptr<RecvStream> stream;
    bool expected = false;
  };
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Entry> streams_;
};

}  // namespace banaserve::transfer
