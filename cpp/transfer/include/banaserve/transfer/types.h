// SPDX-License-Identifier: Apache-2.0
// Value types shared by the engine, its backends and the bindings.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "banaserve/transfer/backend_names.h"

namespace banaserve::transfer {

enum class MemoryKind : uint8_t { kHost = 0, kCuda = 1 };

struct Device {
  MemoryKind kind = MemoryKind::kHost;
  int32_t id = 0;  // CUDA ordinal; 0 for host
  bool operator==(const Device& o) const { return kind == o.kind && id == o.id; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

/// kWrite moves local → remote, kRead moves remote → local. The initiator is always "local".
enum class Op : uint8_t { kWrite = 0, kRead = 1 };

/// Lifecycle of one submitted batch. kPending → kRunning → one terminal state
/// (kDone, kFailed, kCancelled). A terminal state never changes again, and once a handle is
/// terminal the engine never touches the memory of that batch again (see completion.h).
enum class TransferState : uint8_t { kPending = 0, kRunning = 1, kDone = 2, kFailed = 3, kCancelled = 4 };

inline bool is_terminal(TransferState s) { return s >= TransferState::kDone; }

/// One registered memory region, as the owner publishes it to peers.
struct RegionInfo {
  uint64_t id = 0;     // unique within the owning engine, never reused
  uint64_t addr = 0;   // virtual address in the owner's process
  uint64_t nbytes = 0;
  Device device;
  /// >= 0 when the region lives in a memfd the owner created (Engine::allocate); a same-host peer
  /// may then map it through /proc/<pid>/fd/<shm_fd>. -1 for plain user memory.
  int32_t shm_fd = -1;
  uint64_t shm_offset = 0;  // offset of addr inside that memfd
  /// Opaque per-backend handles a peer needs to reach this region without a round trip:
  /// cudaIpcMemHandle_t of the allocation (cuda backend) and the packed UCX rkey (ucx backend).
  /// Empty when that backend is not compiled in or the region is not eligible.
  std::string ipc_handle;
  uint64_t ipc_offset = 0;  // offset of addr inside the allocation that ipc_handle names
  std::string rkey;
};

/// What an engine publishes about itself for peers (serialised by the Python façade with
/// msgspec; the C++ core never parses bytes from the control plane).
struct EngineMetadata {
  std::string engine_id;  // unique per engine instance
  std::string host_id;    // equal for two engines iff they run on the same host (boot id)
  int32_t pid = 0;
  std::string tcp_host;   // where the tcp backend listens ("" when it does not)
  uint16_t tcp_port = 0;
  int32_t control_fd = -1;  // memfd of the shm backend's notification area (-1: none)
  std::string ucx_address;  // packed UCP worker address of the ucx backend ("": none)
  std::vector<RegionInfo> regions;
};

/// What a backend can do. The engine chooses a backend per peer from these, never by name.
struct Capabilities {
  bool host_memory = true;
  bool device_memory = false;
  bool same_host = false;     // can reach a peer on the same host
  bool cross_host = false;    // can reach a peer on another host
  bool in_process = false;    // can only reach this very engine (the local backend)
  bool notifications = false; // delivers per-batch notifications to the remote engine
  bool cancellation = true;   // cancel() can stop a running batch before it is complete
  int priority = 0;           // higher wins among capable backends
};

/// Notification tag carried by a batch: the remote engine delivers (transfer_id, layer) to the
/// inbox of that transfer once all of the batch's bytes are in its memory.
struct NotifyTag {
  uint64_t transfer_id = 0;  // 0: no notification
  uint32_t layer = 0;
  uint32_t num_layers = 0;  // total layers of the stream (for the receiver's bookkeeping)
};

/// Engine-wide configuration. Constructors only store it; Engine::start() acts on it.
struct EngineConfig {
  std::string engine_id;          // "" → generated
  std::string tcp_host = "127.0.0.1";
  uint16_t tcp_port = 0;          // 0 → ephemeral
  // Backends to start besides local (names of backend_names.h; one not compiled into this build
  // is skipped, an unknown name is refused by start()).
  std::vector<std::string> backends = default_backends();
  int tcp_lanes = 2;              // persistent connections per peer
  int copy_threads = 2;           // shm copy workers
  uint64_t default_timeout_ms = 30000;
  std::string force_backend;      // "" (auto) or one of backend_names.h, started
  uint32_t peer_check_interval_ms = 100;  // liveness check of same-host peers
};

}  // namespace banaserve::transfer
