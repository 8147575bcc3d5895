// SPDX-License-Identifier: Apache-2.0
#include "fault_transport.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

namespace banaserve::transfer {
namespace {

class FaultTransport final : public Transport {
 public:
  FaultTransport(Transport* inner, const FaultSpec& spec) : inner_(inner), spec_(spec) {}
  ~FaultTransport() override { stop_delay_thread(); }

  const char* name() const override { return inner_->name(); }
  Capabilities capabilities() const override { return inner_->capabilities(); }
  // The inner backend is started and stopped by the engine; the decorator only owns its thread.
  Status start(const TransportContext&) override {
    if (spec_.delay_ms > 0) delay_thread_ = std::thread([this] { delay_loop(); });
    return Status();
  }
  void stop() override {
    stop_delay_thread();
    std::deque<Pending> left;
    {
      std::lock_guard<std::mutex> lock(mu_);
      left.swap(queue_);
    }
    for (auto& p : left) {
      p.batch->complete_part(BANASERVE_STATUS(StatusCode::kUnavailable, "engine stopped"));
    }
    std::lock_guard<std::mutex> lock(mu_);
    dropped_.clear();
  }
  void fill_metadata(EngineMetadata* md) const override { inner_->fill_metadata(md); }
  Status connect(std::shared_ptr<const PeerRecord> peer) override { return inner_->connect(peer); }
  void disconnect(const std::string& id) override { inner_->disconnect(id); }

  void post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
            std::vector<CopyRun> runs) override {
    const uint64_t n = ++posts_;
    if (spec_.fail_after_posts > 0 && n > spec_.fail_after_posts) {
      batch->complete_part(BANASERVE_STATUS(
          StatusCode::kUnavailable,
          "injected failure: post " + std::to_string(n) + " after fail_after_posts=" +
              std::to_string(spec_.fail_after_posts)));
      return;
    }
    if (spec_.drop) {
      std::lock_guard<std::mutex> lock(mu_);
      dropped_.push_back(std::move(batch));  // kept alive, never completed
      return;
    }
    if (spec_.delay_ms > 0) {
      auto due = std::chrono::steady_clock::now() + std::chrono::milliseconds(spec_.delay_ms);
      {
        std::lock_guard<std::mutex> lock(mu_);
        queue_.push_back(Pending{due, std::make_shared<const PeerRecord>(peer), std::move(batch),
                                 std::move(runs)});
      }
      cv_.notify_one();
      return;
    }
    inner_->post(peer, std::move(batch), std::move(runs));
  }

 private:
  struct Pending {
    std::chrono::steady_clock::time_point due;
    std::shared_ptr<const PeerRecord> peer;
    std::shared_ptr<Batch> batch;
    std::vector<CopyRun> runs;
  };

  void delay_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      if (queue_.empty()) {
        cv_.wait(lock);
        continue;
      }
      auto due = queue_.front().due;
      if (std::chrono::steady_clock::now() < due) {
        cv_.wait_until(lock, due);
        continue;
      }
      Pending p = std::move(queue_.front());
      queue_.pop_front();
      lock.unlock();
      inner_->post(*p.peer, std::move(p.batch), std::move(p.runs));
      lock.lock();
    }
  }

  void stop_delay_thread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (delay_thread_.joinable()) delay_thread_.join();
  }

  Transport* inner_;
  const FaultSpec spec_;
  std::atomic<uint64_t> posts_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::deque<Pending> queue_;
  std::vector<std::shared_ptr<Batch>> dropped_;
  std::thread delay_thread_;
};

}  // namespace

std::unique_ptr<Transport> make_fault_transport(Transport* inner, const FaultSpec& spec) {
  return std::make_unique<FaultTransport>(inner, spec);
}

}  // namespace banaserve::transfer
