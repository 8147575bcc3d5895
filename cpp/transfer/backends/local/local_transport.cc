// SPDX-License-Identifier: Apache-2.0
#include "local_transport.h"

#include <cstring>

namespace banaserve::transfer {
namespace {

// Bytes copied between two checks of the cancel flag.
constexpr uint64_t kChunkNbytes = 1 << 20;

class LocalTransport final : public Transport {
 public:
  const char* name() const override { return backend::kLocal; }

  Capabilities capabilities() const override {
    Capabilities caps;
    caps.in_process = true;
    caps.notifications = true;
    caps.priority = 100;
    return caps;
  }

  Status start(const TransportContext& ctx) override {
    ctx_ = ctx;
    return Status();
  }
  void stop() override {}
  void fill_metadata(EngineMetadata*) const override {}
  Status connect(std::shared_ptr<const PeerRecord>) override { return Status(); }
  void disconnect(const std::string&) override {}

  void post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
            std::vector<CopyRun> runs) override {
    Status status;
    uint64_t since_check = kChunkNbytes;  // check the cancel flag before the first byte too
    {
      IoSection io(batch->io());
      if (!io.open()) return;  // aborted before we started: the engine already finished it
      for (const CopyRun& r : runs) {
        if (since_check >= kChunkNbytes) {
          since_check = 0;
          if (batch->cancel_requested()) {
            status = BANASERVE_STATUS(StatusCode::kCancelled, "cancelled by the caller");
            break;
          }
        }
        void* dst = reinterpret_cast<void*>(batch->op() == Op::kWrite ? r.remote_addr : r.local_addr);
        const void* src =
            reinterpret_cast<const void*>(batch->op() == Op::kWrite ? r.local_addr : r.remote_addr);
        std::memmove(dst, src, r.nbytes);
        since_check += r.nbytes;
      }
    }
    if (status.ok()) {
      auto& counter = batch->op() == Op::kWrite ? ctx_.counters->bytes_written : ctx_.counters->bytes_read;
      counter.fetch_add(batch->nbytes(), std::memory_order_relaxed);
      if (batch->op() == Op::kWrite && batch->tag().transfer_id != 0) {
        ctx_.inbox->deliver(ctx_.self->engine_id, batch->tag(), Status(),
                            batch->deadline_ns());
      }
    }
    batch->complete_part(status);
  }

 private:
  TransportContext ctx_;
};

}  // namespace

std::unique_ptr<Transport> make_local_transport() { return std::make_unique<LocalTransport>(); }

}  // namespace banaserve::transfer
