// SPDX-License-Identifier: Apache-2.0
#include <atomic>
#include <thread>

#include "banaserve/transfer/completion.h"
#include "banaserve/transfer/inbox.h"
#include "check.h"

using namespace banaserve;
using namespace banaserve::transfer;

namespace {
std::shared_ptr<Batch> make_batch() {
  return std::make_shared<Batch>(1, Op::kWrite, "peer", 100, now_ns() + 1000000000ull, NotifyTag{});
}
}  // namespace

TEST_CASE(batch_completes_when_all_parts_do) {
  auto b = make_batch();
  b->set_parts(3);
  b->mark_running();
  CHECK(b->state() == TransferState::kRunning);
  b->complete_part(Status());
  b->complete_part(Status());
  CHECK(b->state() == TransferState::kRunning);
  CHECK_CODE(b->wait(1), StatusCode::kTimeout);
  b->complete_part(Status());
  CHECK(b->state() == TransferState::kDone);
  CHECK_OK(b->wait(0));
}

TEST_CASE(batch_first_error_wins_and_cancel_maps_to_cancelled) {
  auto b = make_batch();
  b->set_parts(2);
  b->complete_part(BANASERVE_STATUS(StatusCode::kUnavailable, "first"));
  b->complete_part(BANASERVE_STATUS(StatusCode::kInternal, "second"));
  CHECK(b->state() == TransferState::kFailed);
  CHECK_CODE(b->wait(0), StatusCode::kUnavailable);
  auto c = make_batch();
  c->cancel();
  c->complete_part(BANASERVE_STATUS(StatusCode::kCancelled, "stopped"));
  CHECK(c->state() == TransferState::kCancelled);
}

TEST_CASE(abort_waits_for_io_sections_and_blocks_later_ones) {
  auto b = make_batch();
  std::atomic<bool> inside{false}, release{false};
  std::thread writer([&] {
    IoSection io(b->io());
    CHECK(io.open());
    inside = true;
    while (!release) std::this_thread::yield();
  });
  while (!inside) std::this_thread::yield();
  std::thread aborter([&] { b->abort(BANASERVE_STATUS(StatusCode::kTimeout, "deadline")); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(!is_terminal(b->state()));  // still inside the writer's section
  release = true;
  writer.join();
  aborter.join();
  CHECK(b->state() == TransferState::kFailed);
  IoSection late(b->io());
  CHECK(!late.open());
  b->complete_part(Status());  // a late part changes nothing
  CHECK(b->state() == TransferState::kFailed);
}

TEST_CASE(wait_wakes_a_blocked_waiter) {
  auto b = make_batch();
  std::thread t([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    b->complete_part(Status());
  });
  CHECK_OK(b->wait(5000));
  t.join();
}

TEST_CASE(recv_stream_tracks_layers_and_early_notifications) {
  Inbox inbox;
  const uint64_t far = now_ns() + 10000000000ull;
  inbox.deliver("a", NotifyTag{7, 1, 3}, Status(), far);  // before expect
  auto s = inbox.expect(7, 3, "a", far);
  CHECK(s->layer_done(1));
  CHECK_CODE(s->wait_layer(0, 1), StatusCode::kTimeout);
  inbox.deliver("a", NotifyTag{7, 0, 3}, Status(), far);
  CHECK_OK(s->wait_layer(0, 0));
  inbox.deliver("a", NotifyTag{7, 2, 3}, Status(), far);
  CHECK_OK(s->wait_all(0));
  CHECK(s->state() == TransferState::kDone);
  CHECK_CODE(s->wait_layer(5, 0), StatusCode::kOutOfRange);
}

TEST_CASE(recv_stream_fails_on_peer_loss_and_deadline) {
  Inbox inbox;
  auto s = inbox.expect(9, 2, "dead", now_ns() + 10000000000ull);
  inbox.fail_peer("dead", BANASERVE_STATUS(StatusCode::kUnavailable, "gone"));
  CHECK(s->state() == TransferState::kFailed);
  CHECK_CODE(s->wait_all(0), StatusCode::kUnavailable);
  CHECK(!IoSection(s->io()).open());
  auto t = inbox.expect(10, 2, "", now_ns());
  inbox.expire(now_ns() + 1);
  CHECK(t->state() == TransferState::kFailed);
  CHECK_CODE(t->wait_all(0), StatusCode::kTimeout);
  // An early stream nobody expected disappears at its deadline.
  inbox.deliver("x", NotifyTag{11, 0, 2}, Status(), now_ns());
  const size_t before = inbox.size();
  inbox.expire(now_ns() + 1);
  CHECK_EQ(inbox.size(), before - 1);
}

int main() { return banaserve::testing::run_all(); }
