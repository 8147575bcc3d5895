// SPDX-License-Identifier: Apache-2.0
// The backend interface. Each backend lives in its own directory under cpp/transfer/backends/
// and is created by the backend registry (src/backend_registry.cc); the engine picks one per peer
// from the declared Capabilities, never by name. A new backend (CUDA, RDMA) is a new directory
// plus one line in the registry.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "banaserve/common/status.h"
#include "banaserve/transfer/completion.h"
#include "banaserve/transfer/inbox.h"
#include "banaserve/transfer/plan.h"
#include "banaserve/transfer/types.h"

namespace banaserve::transfer {

/// Counters every backend may bump; read by Engine::stats(). All relaxed atomics.
struct TransferCounters {
  std::atomic<uint64_t> bytes_written{0};      // initiator side, kWrite payload sent
  std::atomic<uint64_t> bytes_read{0};         // initiator side, kRead payload received
  std::atomic<uint64_t> bytes_served{0};       // passive side, payload applied or served for peers
  std::atomic<uint64_t> frames_rejected{0};    // passive side: invalid ranges, bad frames
  std::atomic<uint64_t> connections_dropped{0};
  std::atomic<uint64_t> peers_lost{0};
};

/// What a backend gets from the engine at start(). Pointers stay valid until stop() returns.
struct TransportContext {
  const EngineConfig* config = nullptr;
  /// This engine's identity (engine_id, host_id, pid). Backends fill their own fields through
  /// fill_metadata(); the regions of this struct are not kept current: use local_regions().
  const EngineMetadata* self = nullptr;
  /// Snapshot of this engine's registrations (for validating ranges a peer asks us to touch).
  /// Thread-safe; cheap (copy-on-write shared pointer).
  std::shared_ptr<const RegionTable> (*local_regions)(void* engine) = nullptr;
  void* engine = nullptr;
  Inbox* inbox = nullptr;
  TransferCounters* counters = nullptr;
  /// Called by a backend when it finds that a peer is gone (connection refused/reset, process
  /// dead). The engine then fails that peer's batches and streams. Thread-safe.
  void (*peer_lost)(void* engine, const std::string& engine_id, const Status& why) = nullptr;

  std::shared_ptr<const RegionTable> regions() const { return local_regions(engine); }
};

/// A peer as the engine knows it. Immutable once built; a metadata update replaces the record.
struct PeerRecord {
  EngineMetadata metadata;
  RegionTable regions;  // the peer's published registrations
  bool same_host = false;
};

class Transport {
 public:
  virtual ~Transport() = default;

  virtual const char* name() const = 0;
  virtual Capabilities capabilities() const = 0;

  /// Binds listeners, maps control areas, starts threads. Called once.
  virtual Status start(const TransportContext& ctx) = 0;
  /// Stops threads and closes connections. Every batch still in flight in this backend completes
  /// (complete_part) with kUnavailable before stop() returns. Idempotent.
  virtual void stop() = 0;
  /// Publishes this backend's endpoint (tcp port, control fd) into *md.
  virtual void fill_metadata(EngineMetadata* md) const = 0;

  /// Whether this peer published what this backend needs (e.g. a UCX worker address). The engine
  /// skips a backend for a peer that it cannot serve; the default serves every peer.
  virtual bool can_serve(const PeerRecord& /*peer*/) const { return true; }
  /// Called for every region this engine registers, before it is published: a backend may fill
  /// its handle fields (RegionInfo::rkey, ::ipc_handle). region->id is not assigned yet; key by
  /// addr. on_unregister undoes it (also when the engine then rejects the region).
  virtual Status on_register(RegionInfo* /*region*/) { return Status(); }
  virtual void on_unregister(const RegionInfo& /*region*/) {}
  /// Human-readable route this backend uses for a connected peer (e.g. the UCX transports);
  /// "" when there is nothing to add to the backend name.
  virtual std::string describe_peer(const std::string& /*engine_id*/) const { return ""; }

  /// Makes the peer reachable. Must not block on the network: connect lazily or in a background
  /// thread. May fail fast (e.g. kUnavailable when a same-host peer's memory cannot be mapped).
  virtual Status connect(std::shared_ptr<const PeerRecord> peer) = 0;
  /// Forgets a peer; batches in flight to it complete with kUnavailable.
  virtual void disconnect(const std::string& engine_id) = 0;

  /// Posts one batch. runs are validated: local ranges against this engine's registrations and
  /// remote ranges against the peer's published registrations. The backend calls
  /// batch->set_parts(k) (if k != 1) before returning, then complete_part() once per part, from
  /// any thread, possibly before post() returns. All memory access goes through batch->io()
  /// sections (see completion.h). When tag.transfer_id != 0 the peer's Inbox must get
  /// deliver(tag) once every byte of the batch is in the peer's memory (kWrite only).
  virtual void post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
                    std::vector<CopyRun> runs) = 0;
};

/// Creates a backend by name (backend_names.h). kNotFound for an unknown name, kNotImplemented
/// for a backend not compiled in.
StatusOr<std::unique_ptr<Transport>> create_transport(const std::string& name);
/// Names of the compiled-in backends, in the order the engine considers them.
std::vector<std::string> available_transports();

}  // namespace banaserve::transfer
