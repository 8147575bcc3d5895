// SPDX-License-Identifier: Apache-2.0
// The cuda backend: GPU memory within one process (D2D, H2D, D2H) and between processes of one
// host through CUDA IPC handles published in the region metadata. Copies of one batch go onto one
// stream per device as a single cudaMemcpyBatchAsync (CUDA >= 12.8) or a run of coalesced
// cudaMemcpyAsync, followed by an event; a completion thread polls the events.
//
// Termination contract (completion.h): a batch's copies run inside one IoSection that is left
// only once the batch's event completed. GPU copies cannot be recalled, so an abort waits for the
// copies already queued (bounded: they are plain copies) and nothing is queued after it.
//
// Notifications: CUDA IPC has no message channel, so a tagged batch to another process is
// refused with kNotImplemented (the layer-wise path across processes rides on shm/tcp/ucx for
// now); in-process tagged batches are delivered to this engine's inbox.
//
// NOT RUN: no GPU was available when this was written. It compiles with nvcc/g++ (.ci/cuda-build).
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "banaserve/transfer/fence.h"
#include "banaserve/transfer/transport.h"
#include "copy_translate.h"

namespace banaserve::transfer {
namespace {

Status cuda_error(cudaError_t err, const std::string& what);

// cuMemGetAddressRange through the runtime's driver entry point: no link against libcuda.
Status address_range(uint64_t addr, CUdeviceptr* base, size_t* size) {
  using Fn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
  static Fn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &p, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess) {
      p = nullptr;
    }
#else
    if (cudaGetDriverEntryPoint("cuMemGetAddressRange", &p, cudaEnableDefault, &found) != cudaSuccess) {
      p = nullptr;
    }
#endif
    return found == cudaDriverEntryPointSuccess ? reinterpret_cast<Fn>(p) : nullptr;
  }();
  if (fn == nullptr) return BANASERVE_STATUS(StatusCode::kInternal, "cuMemGetAddressRange not found");
  if (fn(base, size, static_cast<CUdeviceptr>(addr)) != CUDA_SUCCESS) {
    return BANASERVE_INVALID("cuMemGetAddressRange failed: not a CUDA allocation");
  }
  return Status();
}

Status cuda_error(cudaError_t err, const std::string& what) {
  return BANASERVE_STATUS(StatusCode::kInternal, what + ": " + cudaGetErrorName(err) + " (" +
                                                     cudaGetErrorString(err) + ")");
}

#define BANASERVE_CUDA_RETURN(expr, what)          \
  do {                                             \
    const cudaError_t err_ = (expr);               \
    if (err_ != cudaSuccess) return cuda_error(err_, what); \
  } while (0)

struct InFlight {
  std::shared_ptr<Batch> batch;
  cudaEvent_t event = nullptr;
  bool notify_local = false;
};

struct PeerMappings {
  std::shared_ptr<const PeerRecord> record;
  std::map<uint64_t, uint64_t> bases;  // region id -> mapped base in this process (+ ipc_offset)
  std::vector<void*> opened;           // cudaIpcOpenMemHandle results, closed on disconnect
};

class CudaTransport final : public Transport {
 public:
  ~CudaTransport() override { stop(); }

  const char* name() const override { return backend::kCuda; }

  Capabilities capabilities() const override {
    Capabilities caps;
    if (!usable_) {  // no GPU here: the backend stays out of every choice
      caps.host_memory = false;
      caps.cancellation = false;
      return caps;
    }
    caps.host_memory = true;    // H2D / D2H within this process
    caps.device_memory = true;
    caps.same_host = true;      // CUDA IPC
    caps.cross_host = false;
    caps.in_process = false;
    caps.notifications = false;  // see the header comment
    caps.cancellation = false;   // queued GPU copies run to the end
    caps.priority = 150;         // above shm: the only backend that reaches GPU memory
    return caps;
  }

  Status start(const TransportContext& ctx) override {
    ctx_ = ctx;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      // A CUDA build on a machine without a GPU: start, but declare no capability, so that
      // device memory is refused with a clear error and host peers use the other backends.
      (void)cudaGetLastError();
      usable_ = false;
      return Status();
    }
    usable_ = true;
    streams_.assign(static_cast<size_t>(count), nullptr);
    for (int d = 0; d < count; ++d) {
      BANASERVE_CUDA_RETURN(cudaSetDevice(d), "cudaSetDevice");
      BANASERVE_CUDA_RETURN(cudaStreamCreateWithFlags(&streams_[d], cudaStreamNonBlocking),
                            "cudaStreamCreate");
      // Peer access where the topology allows it (NVLink/PCIe P2P); copies work without it too.
      for (int p = 0; p < count; ++p) {
        int can = 0;
        if (p != d && cudaDeviceCanAccessPeer(&can, d, p) == cudaSuccess && can) {
          const cudaError_t e = cudaDeviceEnablePeerAccess(p, 0);
          if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled) {
            return cuda_error(e, "cudaDeviceEnablePeerAccess");
          }
          (void)cudaGetLastError();  // clear "already enabled"
        }
      }
    }
    stopping_ = false;
    thread_ = std::thread([this] { completion_loop(); });
    return Status();
  }

  void stop() override {
    if (!thread_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, m] : peers_) close_mappings(&m);
    peers_.clear();
    for (cudaStream_t s : streams_) {
      if (s != nullptr) cudaStreamDestroy(s);
    }
    streams_.clear();
  }

  void fill_metadata(EngineMetadata*) const override {}

  Status on_register(RegionInfo* region) override {
    if (region->device.kind != MemoryKind::kCuda) return Status();
    cudaPointerAttributes attrs;
    BANASERVE_CUDA_RETURN(cudaPointerGetAttributes(&attrs, reinterpret_cast<void*>(region->addr)),
                          "cudaPointerGetAttributes");
    if (attrs.type != cudaMemoryTypeDevice || attrs.device != region->device.id) {
      return BANASERVE_INVALID("address is not device memory of cuda:" +
                               std::to_string(region->device.id));
    }
    // The IPC handle names the whole allocation; remember where the region starts in it.
    CUdeviceptr base = 0;
    size_t size = 0;
    BANASERVE_RETURN_IF_ERROR(address_range(region->addr, &base, &size));
    if (region->addr + region->nbytes > base + size) {
      return BANASERVE_INVALID("the range spans more than one CUDA allocation");
    }
    cudaIpcMemHandle_t handle;
    const cudaError_t err = cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(base));
    if (err == cudaSuccess) {
      region->ipc_handle.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
      region->ipc_offset = region->addr - base;
    } else {
      // e.g. cudaMallocAsync pools or VMM allocations: usable in process, not through IPC.
      (void)cudaGetLastError();
    }
    return Status();
  }

  Status connect(std::shared_ptr<const PeerRecord> peer) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto& m = peers_[peer->metadata.engine_id];
    close_mappings(&m);  // a metadata update may change the regions: reopen lazily
    m.record = std::move(peer);
    return Status();
  }

  void disconnect(const std::string& engine_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = peers_.find(engine_id);
    if (it == peers_.end()) return;
    close_mappings(&it->second);
    peers_.erase(it);
  }

  void post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
            std::vector<CopyRun> runs) override {
    Status st = enqueue(peer, batch, runs);
    if (!st.ok()) batch->complete_part(st);
  }

 private:
  void close_mappings(PeerMappings* m) {
    for (void* p : m->opened) (void)cudaIpcCloseMemHandle(p);
    m->opened.clear();
    m->bases.clear();
  }

  // Opens (once per peer and region) the IPC mapping of a peer's GPU region. Caller holds mu_.
  StatusOr<uint64_t> map_region(PeerMappings* m, const RegionInfo& r) {
    auto it = m->bases.find(r.id);
    if (it != m->bases.end()) return it->second;
    if (r.device.kind != MemoryKind::kCuda) {
      return BANASERVE_STATUS(StatusCode::kNotImplemented,
                              "the cuda backend reaches only GPU memory of another process; "
                              "host region " + std::to_string(r.id) + " needs shm/tcp/ucx");
    }
    if (r.ipc_handle.size() != sizeof(cudaIpcMemHandle_t)) {
      return BANASERVE_STATUS(StatusCode::kUnavailable,
                              "GPU region " + std::to_string(r.id) + " of the peer has no CUDA IPC handle");
    }
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, r.ipc_handle.data(), sizeof(handle));
    BANASERVE_CUDA_RETURN(cudaSetDevice(r.device.id), "cudaSetDevice");
    void* base = nullptr;
    BANASERVE_CUDA_RETURN(cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess),
                          "cudaIpcOpenMemHandle");
    m->opened.push_back(base);
    const uint64_t mapped = reinterpret_cast<uint64_t>(base) + r.ipc_offset;
    m->bases[r.id] = mapped;
    return mapped;
  }

  Status enqueue(const PeerRecord& peer, const std::shared_ptr<Batch>& batch,
                 const std::vector<CopyRun>& runs) {
    const bool self = peer.metadata.engine_id == ctx_.self->engine_id;
    if (!self && batch->tag().transfer_id != 0) {
      return BANASERVE_STATUS(StatusCode::kNotImplemented,
                              "notified (layer-wise) batches to another process are not carried by "
                              "CUDA IPC yet; use shm/tcp/ucx for that peer or poll the data");
    }
    StatusOr<std::vector<cuda::DeviceCopy>> copies =
        BANASERVE_STATUS(StatusCode::kInternal, "not translated");
    {
      std::lock_guard<std::mutex> lock(mu_);
      PeerMappings* m = nullptr;
      if (!self) {
        auto it = peers_.find(peer.metadata.engine_id);
        if (it == peers_.end()) {
          return BANASERVE_STATUS(StatusCode::kUnavailable, "peer not connected to the cuda backend");
        }
        m = &it->second;
      }
      copies = cuda::translate_runs(runs, batch->op(), peer.regions, self,
                                    [&](const RegionInfo& r) { return map_region(m, r); });
    }
    if (!copies.ok()) return copies.status();
    // The I/O section opens here and closes in the completion thread once the batch's event
    // completed: an abort() therefore waits for the queued copies and no byte moves after it.
    if (!batch->io().enter()) return Status();  // aborted before it started: already terminal
    Status st = launch_batch(copies.value(), batch, self);
    if (!st.ok()) batch->io().leave();
    return st;
  }

  Status launch_batch(const std::vector<cuda::DeviceCopy>& copies,
                      const std::shared_ptr<Batch>& batch, bool self) {
    if (batch->cancel_requested()) return BANASERVE_STATUS(StatusCode::kCancelled, "cancelled by the caller");
    const int device = device_of(copies);
    BANASERVE_CUDA_RETURN(cudaSetDevice(device), "cudaSetDevice");
    cudaStream_t stream = streams_.at(static_cast<size_t>(device));
    BANASERVE_RETURN_IF_ERROR(launch(copies, stream));
    cudaEvent_t event = nullptr;
    BANASERVE_CUDA_RETURN(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    const cudaError_t rec = cudaEventRecord(event, stream);
    if (rec != cudaSuccess) {
      cudaStreamSynchronize(stream);  // the copies were queued: let them finish before leaving
      cudaEventDestroy(event);
      return cuda_error(rec, "cudaEventRecord");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_flight_.push_back(InFlight{batch, event, self && batch->tag().transfer_id != 0});
    }
    cv_.notify_all();
    return Status();
  }

  static int device_of(const std::vector<cuda::DeviceCopy>& copies) {
    int current = 0;
    (void)cudaGetDevice(&current);
    for (const auto& c : copies) {
      cudaPointerAttributes a;
      if (cudaPointerGetAttributes(&a, reinterpret_cast<void*>(c.dst)) == cudaSuccess &&
          a.type == cudaMemoryTypeDevice) {
        return a.device;
      }
      (void)cudaGetLastError();
    }
    return current;
  }

  static Status launch(const std::vector<cuda::DeviceCopy>& copies, cudaStream_t stream) {
    if (copies.empty()) return Status();
#if CUDART_VERSION >= 12080
    // One call for the whole batch: the driver schedules the copies itself.
    std::vector<void*> dsts(copies.size());
    std::vector<const void*> srcs(copies.size());
    std::vector<size_t> sizes(copies.size());
    for (size_t i = 0; i < copies.size(); ++i) {
      dsts[i] = reinterpret_cast<void*>(copies[i].dst);
      srcs[i] = reinterpret_cast<const void*>(copies[i].src);
      sizes[i] = copies[i].nbytes;
    }
    cudaMemcpyAttributes attr;
    std::memset(&attr, 0, sizeof(attr));
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t attr_idx = 0;
#if CUDART_VERSION >= 13000
    const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), copies.size(),
                                                 &attr, &attr_idx, 1, stream);
#else
    size_t fail_idx = 0;
    const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), const_cast<void**>(srcs.data()), sizes.data(),
                                                 copies.size(), &attr, &attr_idx, 1, &fail_idx, stream);
#endif
    if (err == cudaSuccess) return Status();
    (void)cudaGetLastError();  // e.g. unsupported on this driver: fall through to single copies
#endif
    for (const auto& c : copies) {
      BANASERVE_CUDA_RETURN(cudaMemcpyAsync(reinterpret_cast<void*>(c.dst),
                                            reinterpret_cast<const void*>(c.src), c.nbytes,
                                            cudaMemcpyDefault, stream),
                            "cudaMemcpyAsync");
    }
    return Status();
  }

  void completion_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait_for(lock, std::chrono::microseconds(200),
                   [&] { return stopping_ || !in_flight_.empty(); });
      if (stopping_ && in_flight_.empty()) return;
      std::deque<InFlight> pending;
      pending.swap(in_flight_);
      lock.unlock();
      std::deque<InFlight> keep;
      for (auto& f : pending) {
        const cudaError_t q = cudaEventQuery(f.event);
        if (q == cudaErrorNotReady && !stopping_) {
          keep.push_back(std::move(f));
          continue;
        }
        if (q == cudaErrorNotReady) (void)cudaEventSynchronize(f.event);  // stopping: drain
        Status st = q == cudaSuccess || q == cudaErrorNotReady ? Status() : cuda_error(q, "GPU copy");
        cudaEventDestroy(f.event);
        f.batch->io().leave();  // opened in enqueue()
        if (st.ok()) {
          auto& c = f.batch->op() == Op::kWrite ? ctx_.counters->bytes_written : ctx_.counters->bytes_read;
          c.fetch_add(f.batch->nbytes(), std::memory_order_relaxed);
          if (f.notify_local) {
            ctx_.inbox->deliver(ctx_.self->engine_id, f.batch->tag(), Status(), f.batch->deadline_ns());
          }
        }
        f.batch->complete_part(st);
      }
      lock.lock();
      for (auto& f : keep) in_flight_.push_back(std::move(f));
      if (!keep.empty()) {
        lock.unlock();
        std::this_thread::sleep_for(std::chrono::microseconds(20));
        lock.lock();
      }
    }
  }

  TransportContext ctx_;
  bool usable_ = false;
  std::vector<cudaStream_t> streams_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::deque<InFlight> in_flight_;
  std::unordered_map<std::string, PeerMappings> peers_;
};

// A fence on a recorded CUDA event: ready once cudaEventQuery says so.
class CudaEventFence final : public ReadyFence {
 public:
  explicit CudaEventFence(cudaEvent_t event) : event_(event) {}
  StatusOr<bool> query() override {
    const cudaError_t err = cudaEventQuery(event_);
    if (err == cudaSuccess) return true;
    if (err == cudaErrorNotReady) return false;
    return cuda_error(err, "cudaEventQuery");
  }

 private:
  cudaEvent_t event_;
};

}  // namespace

std::unique_ptr<Transport> make_cuda_transport() { return std::make_unique<CudaTransport>(); }

StatusOr<std::shared_ptr<ReadyFence>> make_cuda_event_fence(uint64_t event_handle) {
  if (event_handle == 0) return BANASERVE_INVALID("null CUDA event handle");
  return std::shared_ptr<ReadyFence>(
      std::make_shared<CudaEventFence>(reinterpret_cast<cudaEvent_t>(event_handle)));
}

}  // namespace banaserve::transfer
