// SPDX-License-Identifier: Apache-2.0
// Unit tests of the tcp wire format (pure encode/decode, no sockets).
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "wire.h"

using namespace banaserve;
using namespace banaserve::transfer::tcp_wire;

namespace {

FrameHeader sample_write() {
  FrameHeader h;
  h.type = FrameType::kWrite;
  h.frame_id = 0x0102030405060708ull;
  h.batch_id = 77;
  h.transfer_id = 0xfeedfacecafebeefull;
  h.layer = 3;
  h.num_layers = 61;
  h.run_count = 2;
  h.payload_nbytes = 16384 + 5;
  h.batch_nbytes = 1 << 20;
  return h;
}

}  // namespace

TEST_CASE(header_round_trip) {
  FrameHeader h = sample_write();
  uint8_t buf[kHeaderSize];
  encode_header(h, buf);
  // Little-endian on the wire, whatever the host.
  CHECK_EQ(buf[0], 0x42);
  CHECK_EQ(buf[8], 0x08);
  CHECK_EQ(buf[15], 0x01);
  FrameHeader d;
  CHECK_OK(decode_header(buf, sizeof(buf), &d));
  CHECK(d.type == FrameType::kWrite);
  CHECK_EQ(d.frame_id, h.frame_id);
  CHECK_EQ(d.batch_id, h.batch_id);
  CHECK_EQ(d.transfer_id, h.transfer_id);
  CHECK_EQ(d.layer, h.layer);
  CHECK_EQ(d.num_layers, h.num_layers);
  CHECK_EQ(d.run_count, h.run_count);
  CHECK_EQ(d.payload_nbytes, h.payload_nbytes);
  CHECK_EQ(d.batch_nbytes, h.batch_nbytes);
}

TEST_CASE(header_rejects_bad_magic_version_type) {
  uint8_t buf[kHeaderSize];
  FrameHeader d;
  encode_header(sample_write(), buf);
  buf[0] ^= 1;
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  encode_header(sample_write(), buf);
  buf[4] = 9;
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  encode_header(sample_write(), buf);
  buf[6] = 0;
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  buf[6] = 6;
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  encode_header(sample_write(), buf);
  CHECK_CODE(decode_header(buf, kHeaderSize - 1, &d), StatusCode::kProtocolError);
  CHECK_CODE(decode_header(buf, 0, &d), StatusCode::kProtocolError);
}

TEST_CASE(header_enforces_limits) {
  uint8_t buf[kHeaderSize];
  FrameHeader d;
  FrameHeader h = sample_write();
  h.run_count = kMaxRunsPerFrame + 1;
  encode_header(h, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  h = sample_write();
  h.payload_nbytes = kMaxFramePayload + 1;
  h.batch_nbytes = ~uint64_t{0};
  encode_header(h, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  h = sample_write();
  h.batch_nbytes = h.payload_nbytes - 1;  // a frame bigger than its batch
  encode_header(h, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  h = sample_write();
  h.status = 3;  // requests carry no status
  encode_header(h, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);

  FrameHeader hello;
  hello.type = FrameType::kHello;
  hello.payload_nbytes = 0;
  encode_header(hello, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  hello.payload_nbytes = kMaxEngineIdBytes + 1;
  encode_header(hello, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  hello.payload_nbytes = 12;
  encode_header(hello, buf);
  CHECK_OK(decode_header(buf, sizeof(buf), &d));

  FrameHeader ack;
  ack.type = FrameType::kAck;
  ack.payload_nbytes = 5;  // an OK ack has no message
  encode_header(ack, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  ack.status = static_cast<uint32_t>(StatusCode::kInvalidArgument);
  encode_header(ack, buf);
  CHECK_OK(decode_header(buf, sizeof(buf), &d));
  CHECK_EQ(d.status, static_cast<uint32_t>(StatusCode::kInvalidArgument));
  ack.status = 200;  // not a StatusCode
  encode_header(ack, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
  ack.status = static_cast<uint32_t>(StatusCode::kInvalidArgument);
  ack.payload_nbytes = kMaxMessageBytes + 1;
  encode_header(ack, buf);
  CHECK_CODE(decode_header(buf, sizeof(buf), &d), StatusCode::kProtocolError);
}

TEST_CASE(runs_round_trip_and_checks) {
  std::vector<WireRun> in{{0x1000, 7}, {0x7fff0000, 0}, {0x2000, 16384}};
  std::vector<uint8_t> buf(in.size() * kRunEntrySize);
  for (size_t i = 0; i < in.size(); ++i) encode_run(in[i], buf.data() + i * kRunEntrySize);
  std::vector<WireRun> out;
  CHECK_OK(decode_runs(buf.data(), buf.size(), 3, 16391, &out));
  CHECK_EQ(out.size(), size_t{3});
  CHECK_EQ(out[1].addr, uint64_t{0x7fff0000});
  CHECK_EQ(out[2].nbytes, uint64_t{16384});
  // Sum must match the header's payload exactly.
  CHECK_CODE(decode_runs(buf.data(), buf.size(), 3, 16390, &out), StatusCode::kProtocolError);
  CHECK_CODE(decode_runs(buf.data(), buf.size(), 3, 16392, &out), StatusCode::kProtocolError);
  // Truncated table.
  CHECK_CODE(decode_runs(buf.data(), buf.size() - 1, 3, 16391, &out), StatusCode::kProtocolError);
  // A run wrapping the address space.
  encode_run(WireRun{~uint64_t{0} - 3, 7}, buf.data());
  CHECK_CODE(decode_runs(buf.data(), buf.size(), 3, 16391, &out), StatusCode::kProtocolError);
  // Lengths that overflow when summed.
  encode_run(WireRun{0, ~uint64_t{0} - 10}, buf.data());
  encode_run(WireRun{0, 100}, buf.data() + 2 * kRunEntrySize);
  CHECK_CODE(decode_runs(buf.data(), buf.size(), 3, 89, &out), StatusCode::kProtocolError);
}

TEST_CASE(trailer_round_trip) {
  uint8_t t[kTrailerSize];
  uint32_t s = 99;
  encode_trailer(0, t);
  CHECK_OK(decode_trailer(t, &s));
  CHECK_EQ(s, 0u);
  encode_trailer(static_cast<uint32_t>(StatusCode::kCancelled), t);
  CHECK_OK(decode_trailer(t, &s));
  CHECK_EQ(s, static_cast<uint32_t>(StatusCode::kCancelled));
  encode_trailer(static_cast<uint32_t>(StatusCode::kInternal), t);
  CHECK_CODE(decode_trailer(t, &s), StatusCode::kProtocolError);
  encode_trailer(0, t);
  t[1] ^= 0x40;
  CHECK_CODE(decode_trailer(t, &s), StatusCode::kProtocolError);
}

TEST_CASE(fuzz_random_and_mutated_headers) {
  std::mt19937_64 rng(1234);
  uint8_t buf[kHeaderSize];
  FrameHeader d;
  // Pure noise: essentially never a valid header (the magic alone is 1 in 2^32).
  int accepted = 0;
  for (int i = 0; i < 20000; ++i) {
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    if (decode_header(buf, static_cast<size_t>(rng() % (kHeaderSize + 1)), &d).ok()) ++accepted;
  }
  CHECK_EQ(accepted, 0);
  // Single-byte mutations of valid headers: whatever decodes must still respect every limit.
  const FrameType types[] = {FrameType::kHello, FrameType::kWrite, FrameType::kReadReq,
                             FrameType::kAck, FrameType::kReadResp};
  for (int i = 0; i < 50000; ++i) {
    FrameHeader h;
    h.type = types[rng() % 5];
    h.payload_nbytes = h.type == FrameType::kHello ? 8 : 0;
    h.batch_nbytes = rng() % (uint64_t{1} << 30);
    encode_header(h, buf);
    buf[rng() % kHeaderSize] = static_cast<uint8_t>(rng());
    if (!decode_header(buf, sizeof(buf), &d).ok()) continue;
    CHECK(d.run_count <= kMaxRunsPerFrame);
    CHECK(d.payload_nbytes <= kMaxFramePayload);
    if (d.type == FrameType::kHello) CHECK(d.payload_nbytes <= kMaxEngineIdBytes);
    if (d.type == FrameType::kAck) CHECK(d.run_count == 0 && d.payload_nbytes <= kMaxMessageBytes);
    if (d.type == FrameType::kWrite) CHECK(d.payload_nbytes <= d.batch_nbytes);
  }
  // Random run tables: decode either fails or yields runs that add up and never wrap.
  std::vector<uint8_t> table(64 * kRunEntrySize);
  std::vector<WireRun> runs;
  for (int i = 0; i < 5000; ++i) {
    for (auto& b : table) b = static_cast<uint8_t>(rng() & (i % 2 ? 0x0f : 0xff));
    uint32_t count = static_cast<uint32_t>(rng() % 65);
    uint64_t payload = rng() % 4096;
    if (!decode_runs(table.data(), table.size(), count, payload, &runs).ok()) continue;
    uint64_t sum = 0;
    for (const auto& r : runs) {
      CHECK(r.addr + r.nbytes >= r.addr);
      sum += r.nbytes;
    }
    CHECK_EQ(sum, payload);
  }
}

int main() { return banaserve::testing::run_all(); }
