// SPDX-License-Identifier: Apache-2.0
#include "banaserve/transfer/inbox.h"

namespace banaserve::transfer {

RecvStream::RecvStream(uint64_t transfer_id, uint32_t num_layers, std::string from_engine,
                       uint64_t deadline_ns)
    : transfer_id_(transfer_id), num_layers_(num_layers), done_(num_layers, false),
      from_engine_(std::move(from_engine)), deadline_ns_(deadline_ns) {}

uint32_t RecvStream::num_layers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_layers_;
}

Status RecvStream::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return status_;
}

uint32_t RecvStream::layers_done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return layers_done_;
}

bool RecvStream::layer_done(uint32_t layer) const {
  std::lock_guard<std::mutex> lock(mu_);
  return layer < done_.size() && done_[layer];
}

void RecvStream::set_expected(uint32_t num_layers, const std::string& from_engine,
                              uint64_t deadline_ns) {
  std::lock_guard<std::mutex> lock(mu_);
  if (num_layers_ == 0 || num_layers_ < num_layers) {
    num_layers_ = num_layers;
    done_.resize(num_layers, false);
  }
  from_engine_ = from_engine;
  deadline_ns_ = deadline_ns;
}

Status RecvStream::wait_layer(uint32_t layer, int64_t timeout_ms) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (num_layers_ != 0 && layer >= num_layers_) {
      return BANASERVE_STATUS(StatusCode::kOutOfRange,
                              "layer " + std::to_string(layer) + " of a " +
                                  std::to_string(num_layers_) + "-layer stream");
    }
  }
  const uint64_t deadline = timeout_ms < 0 ? 0 : now_ns() + static_cast<uint64_t>(timeout_ms) * 1000000ull;
  auto ready = [&] {
    if (is_terminal(state())) return true;
    std::lock_guard<std::mutex> lock(mu_);
    return layer < done_.size() && done_[layer];
  };
  if (!waiter_.wait_until(ready, deadline)) {
    return BANASERVE_STATUS(StatusCode::kTimeout, "layer " + std::to_string(layer) +
                                                      " of transfer " + std::to_string(transfer_id_) +
                                                      " not received in time");
  }
  if (layer_done(layer)) return Status();
  return status();
}

Status RecvStream::wait_all(int64_t timeout_ms) {
  const uint64_t deadline = timeout_ms < 0 ? 0 : now_ns() + static_cast<uint64_t>(timeout_ms) * 1000000ull;
  auto terminal = [&] { return is_terminal(state()); };
  if (!waiter_.wait_until(terminal, deadline)) {
    std::lock_guard<std::mutex> lock(mu_);
    return BANASERVE_STATUS(StatusCode::kTimeout,
                            "transfer " + std::to_string(transfer_id_) + ": " +
                                std::to_string(layers_done_) + " of " +
                                std::to_string(num_layers_) + " layers received in time");
  }
  return status();
}

void RecvStream::cancel() { fail(BANASERVE_STATUS(StatusCode::kCancelled, "receive cancelled")); }

void RecvStream::on_layer(uint32_t layer, uint32_t num_layers, const Status& status) {
  if (!status.ok()) {
    fail(status.with_context("layer " + std::to_string(layer)));
    return;
  }
  bool complete = false;
  Status err;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (is_terminal(state_.load(std::memory_order_acquire))) return;
    if (num_layers_ == 0) {
      num_layers_ = num_layers;
      done_.assign(num_layers, false);
    }
    if (layer >= done_.size()) {
      err = BANASERVE_STATUS(StatusCode::kProtocolError,
                             "layer " + std::to_string(layer) + " beyond the stream's " +
                                 std::to_string(num_layers_) + " layers");
    } else if (!done_[layer]) {
      done_[layer] = true;
      ++layers_done_;
      complete = layers_done_ == num_layers_;
    }
    if (complete) state_.store(TransferState::kDone, std::memory_order_release);
  }
  if (!err.ok()) {
    fail(err);
    return;
  }
  waiter_.notify_all();
}

void RecvStream::fail(const Status& status) {
  if (is_terminal(state())) return;
  io_.close();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (is_terminal(state_.load(std::memory_order_acquire))) return;
    status_ = status;
    state_.store(status.code() == StatusCode::kCancelled ? TransferState::kCancelled
                                                         : TransferState::kFailed,
                 std::memory_order_release);
  }
  waiter_.notify_all();
}

std::shared_ptr<RecvStream> Inbox::expect(uint64_t transfer_id, uint32_t num_layers,
                                          const std::string& from_engine, uint64_t deadline_ns) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = streams_[transfer_id];
  if (!e.stream) {
    e.stream = std::make_shared<RecvStream>(transfer_id, num_layers, from_engine, deadline_ns);
  } else {
    e.stream->set_expected(num_layers, from_engine, deadline_ns);
  }
  e.expected = true;
  return e.stream;
}

void Inbox::release(uint64_t transfer_id) {
  std::lock_guard<std::mutex> lock(mu_);
  streams_.erase(transfer_id);
}

std::shared_ptr<RecvStream> Inbox::stream_for(uint64_t transfer_id, const std::string& from_engine,
                                              uint64_t early_deadline_ns) {
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = streams_[transfer_id];
  if (!e.stream) {
    e.stream = std::make_shared<RecvStream>(transfer_id, 0, from_engine, early_deadline_ns);
  }
  return e.stream;
}

void Inbox::deliver(const std::string& from_engine, const NotifyTag& tag, const Status& status,
                    uint64_t early_deadline_ns) {
  if (tag.transfer_id == 0) return;
  stream_for(tag.transfer_id, from_engine, early_deadline_ns)->on_layer(tag.layer, tag.num_layers,
                                                                        status);
}

void Inbox::fail_peer(const std::string& engine_id, const Status& why) {
  std::vector<std::shared_ptr<RecvStream>> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, e] : streams_) {
      if (e.stream->from_engine() == engine_id) victims.push_back(e.stream);
    }
  }
  for (auto& s : victims) s->fail(why);
}

void Inbox::expire(uint64_t now) {
  std::vector<std::shared_ptr<RecvStream>> victims;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = streams_.begin(); it != streams_.end();) {
      RecvStream& s = *it->second.stream;
      if (s.deadline_ns() != 0 && now >= s.deadline_ns()) {
        if (!is_terminal(s.state())) victims.push_back(it->second.stream);
        if (!it->second.expected) {
          it = streams_.erase(it);  // nobody asked for it: drop it
          continue;
        }
      }
      ++it;
    }
  }
  for (auto& s : victims) {
    s->fail(BANASERVE_STATUS(StatusCode::kTimeout,
                             "transfer " + std::to_string(s->transfer_id()) + ": deadline passed with " +
                                 std::to_string(s->layers_done()) + " of " +
                                 std::to_string(s->num_layers()) + " layers received"));
  }
}

void Inbox::fail_all(const Status& why) {
  std::vector<std::shared_ptr<RecvStream>> all;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, e] : streams_) all.push_back(e.stream);
  }
  for (auto& s : all) s->fail(why);
}

size_t Inbox::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return streams_.size();
}

}  // namespace banaserve::transfer
