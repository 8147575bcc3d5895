// SPDX-License-Identifier: Apache-2.0
// Wire format of the tcp backend. Pure: no I/O, no state; every integer is little-endian.
//
// A connection starts with one HELLO frame from the initiator (payload: its engine_id). Then the
// initiator sends WRITE and READ_REQ frames and the passive side answers each, in order, with one
// ACK (to WRITE) or READ_RESP (to READ_REQ) carrying the same frame_id.
//
//   frame  = header (kHeaderSize bytes) + run table (run_count x kRunEntrySize) + body
//   header = u32 magic | u16 version | u8 type | u8 flags | u64 frame_id | u64 batch_id
//            | u64 transfer_id | u32 layer | u32 num_layers | u32 run_count | u32 status
//            | u64 payload_nbytes | u64 batch_nbytes
//   run    = u64 remote_addr | u64 nbytes           (addresses in the PASSIVE side's memory)
//
//   HELLO      body = engine_id (payload_nbytes bytes)
//   WRITE      body = payload (sum of run lengths = payload_nbytes) + trailer
//   READ_REQ   no body; payload_nbytes = sum of run lengths requested
//   ACK        body = error message (payload_nbytes bytes, 0 when status == OK)
//   READ_RESP  status OK: body = payload (payload_nbytes bytes, the runs of the request in order)
//              otherwise: body = error message
//   trailer    = u32 kTrailerMagic | u32 status (OK, or kCancelled when the sender stopped reading
//                its memory mid-frame and padded the rest with zeros)
//
// batch_nbytes is the byte count of the whole batch (all parts, all frames): the receiver
// delivers a notification once that many bytes of the batch have landed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "banaserve/common/status.h"

namespace banaserve::transfer::tcp_wire {

constexpr uint32_t kMagic = 0x46545342;         // "BSTF"
constexpr uint32_t kTrailerMagic = 0x444E4542;  // "BEND"
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderSize = 64;
constexpr size_t kRunEntrySize = 16;
constexpr size_t kTrailerSize = 8;

// Limits the receiver enforces (a frame beyond them is malformed and drops the connection).
constexpr uint32_t kMaxRunsPerFrame = 1u << 16;
constexpr uint64_t kMaxFramePayload = uint64_t{64} << 20;
constexpr uint64_t kMaxEngineIdBytes = 256;
constexpr uint64_t kMaxMessageBytes = 4096;

enum class FrameType : uint8_t {
  kHello = 1,
  kWrite = 2,
  kReadReq = 3,
  kAck = 4,
  kReadResp = 5,
};

struct FrameHeader {
  FrameType type = FrameType::kHello;
  uint8_t flags = 0;
  uint64_t frame_id = 0;
  uint64_t batch_id = 0;
  uint64_t transfer_id = 0;
  uint32_t layer = 0;
  uint32_t num_layers = 0;
  uint32_t run_count = 0;
  uint32_t status = 0;  // a banaserve::StatusCode value (replies and trailers)
  uint64_t payload_nbytes = 0;
  uint64_t batch_nbytes = 0;
};

struct WireRun {
  uint64_t addr = 0;
  uint64_t nbytes = 0;
};

// ---- little-endian primitives --------------------------------------------------------------
inline void put_u16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
}
inline void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline void put_u64(uint8_t* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint16_t get_u16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));
}
inline uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
inline uint64_t get_u64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

inline bool valid_frame_type(uint8_t t) {
  return t >= static_cast<uint8_t>(FrameType::kHello) &&
         t <= static_cast<uint8_t>(FrameType::kReadResp);
}

/// Writes exactly kHeaderSize bytes.
inline void encode_header(const FrameHeader& h, uint8_t* out) {
  put_u32(out + 0, kMagic);
  put_u16(out + 4, kVersion);
  out[6] = static_cast<uint8_t>(h.type);
  out[7] = h.flags;
  put_u64(out + 8, h.frame_id);
  put_u64(out + 16, h.batch_id);
  put_u64(out + 24, h.transfer_id);
  put_u32(out + 32, h.layer);
  put_u32(out + 36, h.num_layers);
  put_u32(out + 40, h.run_count);
  put_u32(out + 44, h.status);
  put_u64(out + 48, h.payload_nbytes);
  put_u64(out + 56, h.batch_nbytes);
}

/// Parses and checks a header: magic, version, type and the per-type limits. Any violation is
/// kProtocolError (the caller drops the connection). n < kHeaderSize is a truncated header.
inline Status decode_header(const uint8_t* in, size_t n, FrameHeader* h) {
  if (n < kHeaderSize) {
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "truncated frame header (" + std::to_string(n) + " bytes)");
  }
  if (get_u32(in) != kMagic) return BANASERVE_STATUS(StatusCode::kProtocolError, "bad frame magic");
  uint16_t version = get_u16(in + 4);
  if (version != kVersion) {
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "unsupported frame version " + std::to_string(version));
  }
  if (!valid_frame_type(in[6])) {
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "unknown frame type " + std::to_string(in[6]));
  }
  FrameHeader r;
  r.type = static_cast<FrameType>(in[6]);
  r.flags = in[7];
  r.frame_id = get_u64(in + 8);
  r.batch_id = get_u64(in + 16);
  r.transfer_id = get_u64(in + 24);
  r.layer = get_u32(in + 32);
  r.num_layers = get_u32(in + 36);
  r.run_count = get_u32(in + 40);
  r.status = get_u32(in + 44);
  r.payload_nbytes = get_u64(in + 48);
  r.batch_nbytes = get_u64(in + 56);
  if (r.status > static_cast<uint32_t>(StatusCode::kCudaError)) {
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "unknown status code " + std::to_string(r.status));
  }
  switch (r.type) {
    case FrameType::kHello:
      if (r.run_count != 0 || r.payload_nbytes == 0 || r.payload_nbytes > kMaxEngineIdBytes) {
        return BANASERVE_STATUS(StatusCode::kProtocolError, "malformed HELLO frame");
      }
      break;
    case FrameType::kWrite:
    case FrameType::kReadReq:
      if (r.run_count > kMaxRunsPerFrame) {
        return BANASERVE_STATUS(StatusCode::kProtocolError,
                                "too many runs in one frame: " + std::to_string(r.run_count));
      }
      if (r.payload_nbytes > kMaxFramePayload) {
        return BANASERVE_STATUS(StatusCode::kProtocolError,
                                "frame payload too large: " + std::to_string(r.payload_nbytes));
      }
      if (r.status != 0) {
        return BANASERVE_STATUS(StatusCode::kProtocolError, "request frame with a status");
      }
      if (r.type == FrameType::kWrite && r.payload_nbytes > r.batch_nbytes) {
        return BANASERVE_STATUS(StatusCode::kProtocolError, "frame payload exceeds its batch");
      }
      break;
    case FrameType::kAck:
      if (r.run_count != 0 || r.payload_nbytes > kMaxMessageBytes ||
          (r.status == 0 && r.payload_nbytes != 0)) {
        return BANASERVE_STATUS(StatusCode::kProtocolError, "malformed ACK frame");
      }
      break;
    case FrameType::kReadResp:
      if (r.run_count != 0 || (r.status == 0 && r.payload_nbytes > kMaxFramePayload) ||
          (r.status != 0 && r.payload_nbytes > kMaxMessageBytes)) {
        return BANASERVE_STATUS(StatusCode::kProtocolError, "malformed READ_RESP frame");
      }
      break;
  }
  *h = r;
  return Status();
}

inline void encode_run(const WireRun& run, uint8_t* out) {
  put_u64(out, run.addr);
  put_u64(out + 8, run.nbytes);
}

/// Parses count run entries from n bytes. Checks that the table is complete, that no run wraps
/// around the address space, and that the run lengths add up to payload_nbytes.
inline Status decode_runs(const uint8_t* in, size_t n, uint32_t count, uint64_t payload_nbytes,
                          std::vector<WireRun>* out) {
  if (count > kMaxRunsPerFrame) {
    return BANASERVE_STATUS(StatusCode::kProtocolError, "too many runs in one frame");
  }
  if (n < static_cast<size_t>(count) * kRunEntrySize) {
    return BANASERVE_STATUS(StatusCode::kProtocolError, "truncated run table");
  }
  out->resize(count);
  uint64_t sum = 0;
  for (uint32_t i = 0; i < count; ++i) {
    WireRun r{get_u64(in + i * kRunEntrySize), get_u64(in + i * kRunEntrySize + 8)};
    if (r.addr + r.nbytes < r.addr) {
      return BANASERVE_STATUS(StatusCode::kProtocolError, "run wraps the address space");
    }
    if (r.nbytes > payload_nbytes - sum) {
      return BANASERVE_STATUS(StatusCode::kProtocolError, "run lengths exceed the frame payload");
    }
    sum += r.nbytes;
    (*out)[i] = r;
  }
  if (sum != payload_nbytes) {
    return BANASERVE_STATUS(StatusCode::kProtocolError,
                            "run lengths do not add up to the frame payload");
  }
  return Status();
}

inline void encode_trailer(uint32_t status, uint8_t* out) {
  put_u32(out, kTrailerMagic);
  put_u32(out + 4, status);
}

/// The trailer's status; kProtocolError when the magic or the status is wrong.
inline Status decode_trailer(const uint8_t* in, uint32_t* status) {
  if (get_u32(in) != kTrailerMagic) {
    return BANASERVE_STATUS(StatusCode::kProtocolError, "bad frame trailer");
  }
  uint32_t s = get_u32(in + 4);
  if (s != 0 && s != static_cast<uint32_t>(StatusCode::kCancelled)) {
    return BANASERVE_STATUS(StatusCode::kProtocolError, "bad trailer status");
  }
  *status = s;
  return Status();
}

}  // namespace banaserve::transfer::tcp_wire
