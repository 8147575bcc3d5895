// SPDX-License-Identifier: Apache-2.0
// The tcp backend: cross-host transfers over persistent TCP connections.
//
// Each peer gets config->tcp_lanes connections ("lanes"), opened lazily by the lane's own sender
// thread on the first post. A batch is split across lanes (split_runs) when it is big; each part
// travels as one framed message (or a few, at most 4 MiB of payload each, so cancellation is
// observed between them): header + run table + payload gathered with sendmsg straight from the
// registered pages. The passive side validates every run against its registrations before it
// writes a byte, scatters with readv straight into its memory and answers with one small ACK per
// frame; a lane keeps many frames in flight. Reads send the run table and get the payload back.
// Wire format: wire.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "banaserve/transfer/transport.h"

namespace banaserve::transfer {

class TcpTransport final : public Transport {
 public:
  TcpTransport();
  ~TcpTransport() override;
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  const char* name() const override { return backend::kTcp; }
  Capabilities capabilities() const override;
  Status start(const TransportContext& ctx) override;
  void stop() override;
  void fill_metadata(EngineMetadata* md) const override;
  Status connect(std::shared_ptr<const PeerRecord> peer) override;
  void disconnect(const std::string& engine_id) override;
  void post(const PeerRecord& peer, std::shared_ptr<Batch> batch,
            std::vector<CopyRun> runs) override;

  /// The bound listening port (0 before start()).
  uint16_t port() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

std::unique_ptr<Transport> make_tcp_transport();

}  // namespace banaserve::transfer
