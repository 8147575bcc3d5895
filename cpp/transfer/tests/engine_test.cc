// SPDX-License-Identifier: Apache-2.0
// Engine tests over the local backend and the fault-injecting decorator.
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "banaserve/transfer/engine.h"
#include "check.h"

using namespace banaserve;
using namespace banaserve::transfer;

namespace {
constexpr uint64_t kPage = 4096;

struct Pair {
  std::vector<uint8_t> src, dst;
  std::shared_ptr<const PreparedList> l, r;
};

Pair make_pair(Engine& e, size_t pages) {
  Pair p;
  p.src.resize(pages * kPage);
  p.dst.assign(pages * kPage, 0);
  std::iota(p.src.begin(), p.src.end(), 1);
  auto ra = e.register_memory(reinterpret_cast<uint64_t>(p.src.data()), p.src.size(), Device{});
  auto rb = e.register_memory(reinterpret_cast<uint64_t>(p.dst.data()), p.dst.size(), Device{});
  CHECK(ra.ok() && rb.ok());
  std::vector<uint64_t> la, ra_, len(pages, kPage);
  for (size_t i = 0; i < pages; ++i) {
    la.push_back(reinterpret_cast<uint64_t>(p.src.data()) + i * kPage);
    ra_.push_back(reinterpret_cast<uint64_t>(p.dst.data()) + i * kPage);
  }
  p.l = e.prepare_descs("", la.data(), len.data(), pages, Device{}).value();
  p.r = e.prepare_descs("", ra_.data(), len.data(), pages, Device{}).value();
  return p;
}

Engine::SubmitArgs args_for(const Pair& p, const std::vector<int64_t>& idx) {
  Engine::SubmitArgs a;
  a.local = p.l.get();
  a.remote = p.r.get();
  a.local_idx = idx.data();
  a.remote_idx = idx.data();
  a.n = idx.size();
  return a;
}
}  // namespace

TEST_CASE(local_write_moves_exactly_the_indexed_pages) {
  Engine e(EngineConfig{});
  CHECK_OK(e.start());
  Pair p = make_pair(e, 16);
  std::vector<int64_t> idx{3, 1, 2, 9};
  auto b = e.submit(args_for(p, idx));
  CHECK(b.ok());
  CHECK_OK(b.value()->wait(1000));
  for (size_t i = 0; i < 16; ++i) {
    const bool moved = i == 1 || i == 2 || i == 3 || i == 9;
    const bool equal = std::memcmp(p.src.data() + i * kPage, p.dst.data() + i * kPage, kPage) == 0;
    CHECK_EQ(equal, moved);
  }
  e.stop();
}

TEST_CASE(submit_errors_move_no_byte) {
  Engine e(EngineConfig{});
  CHECK_OK(e.start());
  Pair p = make_pair(e, 4);
  std::vector<int64_t> bad{0, 4};
  CHECK_CODE(e.submit(args_for(p, bad)).status(), StatusCode::kOutOfRange);
  CHECK(std::all_of(p.dst.begin(), p.dst.end(), [](uint8_t v) { return v == 0; }));
  Engine::SubmitArgs a = args_for(p, bad);
  a.peer_id = "nobody";
  CHECK_CODE(e.submit(a).status(), StatusCode::kNotFound);
  e.stop();
}

TEST_CASE(dropped_batch_fails_at_its_deadline) {
  Engine e(EngineConfig{});
  e.set_fault(FaultSpec{0, 0, true});
  CHECK_OK(e.start());
  Pair p = make_pair(e, 2);
  std::vector<int64_t> idx{0, 1};
  Engine::SubmitArgs a = args_for(p, idx);
  a.timeout_ms = 30;
  auto b = e.submit(a);
  CHECK(b.ok());
  CHECK_CODE(b.value()->wait(5000), StatusCode::kTimeout);
  CHECK(b.value()->state() == TransferState::kFailed);
  e.stop();
}

TEST_CASE(fail_after_n_posts_and_stop_fails_in_flight) {
  Engine e(EngineConfig{});
  e.set_fault(FaultSpec{1, 0, false});
  CHECK_OK(e.start());
  Pair p = make_pair(e, 2);
  std::vector<int64_t> idx{0};
  CHECK_OK(e.submit(args_for(p, idx)).value()->wait(1000));
  CHECK_CODE(e.submit(args_for(p, idx)).value()->wait(1000), StatusCode::kUnavailable);
  e.stop();

  Engine d(EngineConfig{});
  d.set_fault(FaultSpec{0, 10000, false});  // delayed far beyond the test
  CHECK_OK(d.start());
  Pair q = make_pair(d, 2);
  auto b = d.submit(args_for(q, idx)).value();
  d.stop();
  CHECK(b->state() == TransferState::kFailed);
  CHECK_CODE(b->wait(0), StatusCode::kUnavailable);
}

TEST_CASE(layerwise_stream_delivers_each_layer_to_the_inbox) {
  Engine e(EngineConfig{});
  CHECK_OK(e.start());
  const uint32_t layers = 3, items = 8, item = 256;
  std::vector<uint8_t> src(layers * 2 * items * item), dst(src.size(), 0);
  std::iota(src.begin(), src.end(), 7);
  CHECK(e.register_memory(reinterpret_cast<uint64_t>(src.data()), src.size(), Device{}).ok());
  CHECK(e.register_memory(reinterpret_cast<uint64_t>(dst.data()), dst.size(), Device{}).ok());
  std::vector<uint64_t> lb, rb;
  for (uint32_t b = 0; b < layers * 2; ++b) {
    lb.push_back(reinterpret_cast<uint64_t>(src.data()) + b * items * item);
    rb.push_back(reinterpret_cast<uint64_t>(dst.data()) + b * items * item);
  }
  auto l = e.prepare_layout("", lb.data(), lb.size(), item, items, Device{}).value();
  auto r = e.prepare_layout("", rb.data(), rb.size(), item, items, Device{}).value();
  auto recv = e.expect(42, layers, "", 5000);
  auto s = e.open_stream("", 42, layers, l, {0, 1, 5}, r, {0, 1, 5}, 2, 5000);
  CHECK(s.ok());
  CHECK_OK(s.value()->mark_layer_ready(1));
  CHECK_OK(recv->wait_layer(1, 1000));
  CHECK(!recv->layer_done(0));
  CHECK_CODE(s.value()->mark_layer_ready(1), StatusCode::kAlreadyExists);
  CHECK_CODE(s.value()->mark_layer_ready(3), StatusCode::kOutOfRange);
  CHECK_OK(s.value()->mark_layer_ready(0));
  CHECK_OK(s.value()->mark_layer_ready(2));
  CHECK_OK(s.value()->wait(1000));
  CHECK_OK(recv->wait_all(1000));
  for (uint32_t b = 0; b < layers * 2; ++b) {
    for (uint32_t i : {0u, 1u, 5u}) {
      const size_t off = (b * items + i) * item;
      CHECK(std::memcmp(src.data() + off, dst.data() + off, item) == 0);
    }
    const size_t off2 = (b * items + 2) * item;
    CHECK(dst[off2] == 0);
  }
  e.stop();
}

int main() { return banaserve::testing::run_all(); }
