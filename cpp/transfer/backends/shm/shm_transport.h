// SPDX-License-Identifier: Apache-2.0
// The shm backend: same host, cross process, one copy, no socket on the data path.
//
// Data path (the initiator performs the single copy, chosen per remote region):
//  * the peer's region lives in a memfd (RegionInfo.shm_fd >= 0, from Engine::allocate): it is
//    mapped once at connect() through /proc/<pid>/fd/<fd> (MAP_SHARED | MAP_POPULATE) and copied
//    with memcpy;
//  * plain user memory (shm_fd == -1): process_vm_writev / process_vm_readv (cross-memory attach)
//    with up to IOV_MAX iovecs per call. If the kernel denies it (EPERM: other uid, Yama
//    ptrace_scope) the batch fails with kUnavailable and says so; there is no silent fallback.
// Small batches (< kParallelThreshold bytes) are copied inline on the caller's thread; larger ones
// are split with split_runs() over `copy_threads` persistent workers. Every copy happens inside
// batch->io() sections of at most kChunkNbytes, with cancellation checked between chunks.
//
// Notifications: each engine owns a control memfd (EngineMetadata.control_fd) holding a
// cross-process MPSC ring (control_ring.h). After the last part of a tagged kWrite batch, the
// initiator pushes one notice into the receiver's ring and wakes its delivery thread, which hands
// it to Inbox::deliver(). A ring that stays full fails the batch with kResourceExhausted.
//
// Liveness: every peer_check_interval_ms the backend polls a pidfd per connected peer; when a
// peer exits, batches in flight to it complete kUnavailable and the engine is told (peer_lost).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "banaserve/transfer/transport.h"

namespace banaserve::transfer {

class ShmTransport final : public Transport {
 public:
  /// Batches of at least this many bytes are split over the copy workers.
  static constexpr uint64_t kParallelThreshold = uint64_t{256} << 10;
  /// Longest single I/O section (and the cancellation granularity).
  static constexpr uint64_t kChunkNbytes = uint64_t{1} << 20;
  /// Notification slots in each engine's control ring.
  static constexpr uint32_t kRingCapacity = 1024;
  /// How long a producer retries a full ring before failing the batch.
  static constexpr uint32_t kRingFullTimeoutMs = 200;

  ShmTransport();
  ~ShmTransport() override;
  ShmTransport(const ShmTransport&) = delete;
  ShmTransport& operator=(const ShmTransport&) = delete;

  const char* name() const override { return backend::kShm; }
  Capabilities capabilities() const override;
  Status start(const TransportContext& ctx) override;
  void stop() override;
  void fill_metadata(EngineMetadata* md) const override;
  Status connect(std::shared_ptr<const PeerRecord> peer) override;
  void disconnect(const std::string& engine_id) override;
  void post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
            std::vector<CopyRun> runs) override;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

/// Factory used by the backend registry.
std::unique_ptr<Transport> make_shm_transport();

}  // namespace banaserve::transfer
