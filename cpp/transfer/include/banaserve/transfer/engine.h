// SPDX-License-Identifier: Apache-2.0
// Engine: registrations, peers, backend choice, prepared lists, submission, deadlines.
//
// Thread safety: every method may be called from any thread once start() returned.
// Memory ownership: register_memory() never extends the lifetime of the caller's memory; the
// caller keeps it alive until unregister_memory() (the Python façade's Registration object holds
// a reference to the exporting object for exactly that purpose). Memory from allocate() is owned
// by the engine and unmapped by unregister_memory() or stop().
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "banaserve/common/status.h"
#include "banaserve/transfer/completion.h"
#include "banaserve/transfer/fence.h"
#include "banaserve/transfer/inbox.h"
#include "banaserve/transfer/plan.h"
#include "banaserve/transfer/transport.h"
#include "banaserve/transfer/types.h"

namespace banaserve::transfer {

struct EngineStats {
  uint64_t batches_submitted = 0;
  uint64_t batches_done = 0;
  uint64_t batches_failed = 0;
  uint64_t batches_cancelled = 0;
  uint64_t bytes_written = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_served = 0;
  uint64_t frames_rejected = 0;
  uint64_t connections_dropped = 0;
  uint64_t peers_lost = 0;
  uint64_t registered_nbytes = 0;
  uint64_t regions = 0;
  uint64_t peers = 0;
  uint64_t inbox_streams = 0;
};

/// Fault injection for tests: wraps the chosen backend of every peer in a FaultTransport.
struct FaultSpec {
  uint32_t fail_after_posts = 0;  // >0: posts after the first N fail with kUnavailable
  uint32_t delay_ms = 0;          // delay every post by this long before handing it on
  bool drop = false;              // swallow posts: batches never complete (deadline test)
};

class SendStream;

class Engine {
 public:
  explicit Engine(EngineConfig config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  Status start();
  /// Fails every batch and stream in flight (kUnavailable), stops backends and the watchdog,
  /// unmaps allocate()d memory. Idempotent.
  void stop();
  bool started() const { return started_; }

  /// Current metadata (identity, backend endpoints, registrations).
  EngineMetadata metadata() const;
  const std::string& engine_id() const { return self_.engine_id; }
  void set_fault(const FaultSpec& spec);

  // ---- memory --------------------------------------------------------------------------------
  /// Registers [addr, addr + nbytes). kInvalidArgument for null/zero/overlapping ranges.
  StatusOr<RegionInfo> register_memory(uint64_t addr, uint64_t nbytes, Device device);
  /// Allocates nbytes of pre-faulted host memory in a memfd that same-host peers map directly
  /// (the fastest shm path) and registers it.
  StatusOr<RegionInfo> allocate(uint64_t nbytes);
  Status unregister_memory(uint64_t region_id);
  std::shared_ptr<const RegionTable> local_regions() const;

  // ---- peers ---------------------------------------------------------------------------------
  /// Adds or updates a peer. Never blocks on the network. Returns the backend chosen for it.
  StatusOr<std::string> add_peer(const EngineMetadata& metadata);
  Status remove_peer(const std::string& engine_id);
  /// The backend serving a peer ("local" for this engine itself); kNotFound if unknown.
  StatusOr<std::string> peer_backend(const std::string& engine_id) const;
  /// What the backend of that peer reports about its route (e.g. the transports UCX chose);
  /// "" when it has nothing to add. kNotFound if unknown.
  StatusOr<std::string> peer_route(const std::string& engine_id) const;
  std::vector<std::string> peers() const;

  // ---- prepare once ---------------------------------------------------------------------------
  /// peer_id "" → validate against this engine's registrations; else against the peer's.
  StatusOr<std::shared_ptr<const PreparedList>> prepare_descs(const std::string& peer_id,
                                                              const uint64_t* addrs,
                                                              const uint64_t* nbytes, size_t n,
                                                              Device device);
  StatusOr<std::shared_ptr<const PreparedList>> prepare_layout(const std::string& peer_id,
                                                               const uint64_t* bases,
                                                               size_t num_buffers,
                                                               uint64_t item_nbytes,
                                                               uint64_t num_items, Device device);

  // ---- post many -----------------------------------------------------------------------------
  struct SubmitArgs {
    Op op = Op::kWrite;
    std::string peer_id;
    const PreparedList* local = nullptr;
    const int64_t* local_idx = nullptr;
    const PreparedList* remote = nullptr;
    const int64_t* remote_idx = nullptr;
    size_t n = 0;
    uint32_t buf_begin = 0;
    uint32_t buf_end = UINT32_MAX;  // clamped to the layouts' buffer count
    NotifyTag tag;
    int64_t timeout_ms = -1;  // <0 → config default
  };
  /// Validates indices, builds runs and posts them. Any error is returned before a byte moves.
  StatusOr<std::shared_ptr<Batch>> submit(const SubmitArgs& args);

  /// Layer-wise sending: layer i covers buffers [i * buffers_per_layer, (i+1) * buffers_per_layer)
  /// of the two layouts; see SendStream.
  StatusOr<std::shared_ptr<SendStream>> open_stream(const std::string& peer_id,
                                                    uint64_t transfer_id, uint32_t num_layers,
                                                    std::shared_ptr<const PreparedList> local,
                                                    std::vector<int64_t> local_idx,
                                                    std::shared_ptr<const PreparedList> remote,
                                                    std::vector<int64_t> remote_idx,
                                                    uint32_t buffers_per_layer,
                                                    int64_t timeout_ms);

  /// Receiving side of a notified transfer. from_engine "" accepts any sender.
  std::shared_ptr<RecvStream> expect(uint64_t transfer_id, uint32_t num_layers,
                                     const std::string& from_engine, int64_t timeout_ms);
  void release_stream(uint64_t transfer_id) { inbox_.release(transfer_id); }

  EngineStats stats() const;

 private:
  friend class SendStream;  // deadline_from
  struct Peer {
    std::shared_ptr<const PeerRecord> record;
    Transport* transport = nullptr;
  };
  struct Allocation {
    int fd;
    void* addr;
    uint64_t nbytes;
  };

  // The registrations that validate a list prepared for peer_id ("" or self: this engine's),
  // kept alive by the shared pointers, with the owner and generation recorded in the list.
  struct ValidationTable {
    std::shared_ptr<const RegionTable> local;
    std::shared_ptr<const PeerRecord> peer;
    const RegionTable* table = nullptr;
    std::string owner;
    uint64_t generation = 0;
  };
  StatusOr<ValidationTable> validation_table(const std::string& peer_id) const;
  StatusOr<Transport*> choose_transport(const PeerRecord& peer);
  bool needs_device_memory(const PeerRecord& peer) const;
  StatusOr<RegionInfo> insert_region(RegionInfo info, const Allocation* allocation);
  void on_peer_lost(const std::string& engine_id, const Status& why);
  void track(const std::shared_ptr<Batch>& batch);
  void watchdog_loop();
  uint64_t deadline_from(int64_t timeout_ms) const;
  void refresh_metadata_locked();

  EngineConfig config_;
  EngineMetadata self_;
  bool started_ = false;
  FaultSpec fault_;

  mutable std::mutex mu_;  // guards regions_, peers_, allocations_, self_.regions
  std::shared_ptr<const RegionTable> regions_;
  uint64_t next_region_id_ = 1;
  std::unordered_map<std::string, Peer> peers_;
  std::map<uint64_t, Allocation> allocations_;  // by region id

  std::vector<std::unique_ptr<Transport>> transports_;
  Inbox inbox_;
  TransferCounters counters_;
  std::atomic<uint64_t> next_batch_id_{1};
  std::atomic<uint64_t> submitted_{0}, done_{0}, failed_{0}, cancelled_{0};

  std::mutex live_mu_;
  std::vector<std::weak_ptr<Batch>> live_;  // batches with deadlines, scanned by the watchdog
  std::condition_variable watchdog_cv_;
  bool stopping_ = false;
  std::thread watchdog_;
};

/// Sender side of a layer-wise stream. mark_layer_ready(i) posts layer i at once (one batch,
/// tagged (transfer_id, i, num_layers)), so layer i moves while later layers still compute.
class SendStream {
 public:
  SendStream(Engine* engine, std::string peer_id, uint64_t transfer_id, uint32_t num_layers,
             std::shared_ptr<const PreparedList> local, std::vector<int64_t> local_idx,
             std::shared_ptr<const PreparedList> remote, std::vector<int64_t> remote_idx,
             uint32_t buffers_per_layer, int64_t timeout_ms);

  uint64_t transfer_id() const { return transfer_id_; }
  uint32_t num_layers() const { return num_layers_; }
  /// kOutOfRange for a bad layer, kAlreadyExists if marked before.
  Status mark_layer_ready(uint32_t layer);
  /// Posts layer `layer` once `fence` is ready (e.g. a CUDA event recorded on the producing
  /// stream after that layer), from a helper thread of this stream, in the order called; returns
  /// at once. Bad layer / double mark fail here; a fence error, or a fence still not ready at the
  /// stream's deadline, fails the stream (wait() returns it).
  Status mark_layer_ready_after(uint32_t layer, std::shared_ptr<ReadyFence> fence);
  ~SendStream();
  /// Waits for every layer's batch; OK, the first failure, or kTimeout. Layers never marked
  /// count as not done.
  Status wait(int64_t timeout_ms);
  void cancel();
  TransferState state() const;
  uint32_t layers_posted() const;

 private:
  Engine* engine_;
  const std::string peer_id_;
  const uint64_t transfer_id_;
  const uint32_t num_layers_;
  std::shared_ptr<const PreparedList> local_, remote_;
  const std::vector<int64_t> local_idx_, remote_idx_;
  const uint32_t buffers_per_layer_;
  const int64_t timeout_ms_;
  mutable std::mutex mu_;
  std::vector<std::shared_ptr<Batch>> batches_;  // by layer; null until marked
  std::vector<bool> claimed_;                     // by layer: marked, possibly behind a fence
  Status post_error_;
  // Fenced layers, posted in order by fence_thread_ (started on first use).
  void fence_loop();
  Status post_layer(uint32_t layer);
  std::deque<std::pair<uint32_t, std::shared_ptr<ReadyFence>>> fenced_;  // guarded by mu_
  std::condition_variable fence_cv_;
  bool fence_stop_ = false;
  std::thread fence_thread_;
};

}  // namespace banaserve::transfer
