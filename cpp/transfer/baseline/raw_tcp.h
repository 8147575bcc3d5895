// SPDX-License-Identifier: Apache-2.0
// Baselines for the benchmarks: what the bare machine does, measured in the same run as the
// engine, so results can be reported as ratios.
#pragma once

#include <cstdint>
#include <vector>

#include "banaserve/common/status.h"

namespace banaserve::transfer::baseline {

/// Round trips of "nbytes request, 8-byte reply" between this process and a forked child over a
/// loopback TCP connection with TCP_NODELAY: the minimum any acknowledged remote write between
/// two processes can cost on this host.
/// Returns each round trip's duration in microseconds.
StatusOr<std::vector<double>> tcp_round_trips_us(uint64_t nbytes, int iterations);

}  // namespace banaserve::transfer::baseline
