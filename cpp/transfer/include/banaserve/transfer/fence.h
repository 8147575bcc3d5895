// SPDX-License-Identifier: Apache-2.0
// Ready fences: "this layer's bytes are final once the fence is ready". A producer that computes
// on a GPU stream records a CUDA event after layer i and hands it to
// SendStream::mark_layer_ready_after(i, fence); the stream posts layer i as soon as the event
// completed, without the producer's thread blocking on the GPU. No CUDA header here: the cuda
// backend implements the device fence behind make_device_event_fence().
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>

#include "banaserve/common/status.h"

namespace banaserve::transfer {

class ReadyFence {
 public:
  virtual ~ReadyFence() = default;
  /// Non-blocking. true: ready; false: not yet; an error: it will never be ready (the producer
  /// failed), and the layer's transfer fails with it.
  virtual StatusOr<bool> query() = 0;
};

/// A fence signalled from the host (tests, CPU producers).
class HostFence final : public ReadyFence {
 public:
  void signal(Status status = Status()) {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = std::move(status);
    ready_.store(true, std::memory_order_release);
  }
  StatusOr<bool> query() override {
    if (!ready_.load(std::memory_order_acquire)) return false;
    std::lock_guard<std::mutex> lock(mu_);
    if (!status_.ok()) return status_;
    return true;
  }

 private:
  std::atomic<bool> ready_{false};
  std::mutex mu_;
  Status status_;
};

/// A fence on a CUDA event (the raw cudaEvent_t as an integer, e.g. torch.cuda.Event().cuda_event).
/// The event must have been recorded, and must outlive the fence. kNotImplemented when the
/// cuda backend is not compiled in.
StatusOr<std::shared_ptr<ReadyFence>> make_device_event_fence(uint64_t event_handle);

}  // namespace banaserve::transfer
