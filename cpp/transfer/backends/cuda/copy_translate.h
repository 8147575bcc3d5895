// SPDX-License-Identifier: Apache-2.0
// Pure address translation of the cuda backend (no CUDA header: unit-tested in every build).
// A peer's GPU region is reached through the CUDA IPC mapping opened in this process; a copy run
// names the peer's virtual address, which becomes mapped_base + (addr - region.addr).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "banaserve/common/status.h"
#include "banaserve/transfer/plan.h"
#include "banaserve/transfer/types.h"

namespace banaserve::transfer::cuda {

/// One copy as the CUDA runtime sees it.
struct DeviceCopy {
  uint64_t dst;
  uint64_t src;
  uint64_t nbytes;
};

/// Maps a peer region to its base address in this process (an opened IPC mapping plus the
/// region's ipc_offset), or an error (no handle published, open failed).
using RegionMapper = std::function<StatusOr<uint64_t>(const RegionInfo& region)>;

/// Resolves runs against the peer's regions: for kWrite local → remote, for kRead remote → local.
/// Zero-length runs are dropped; adjacent copies contiguous on both sides are merged.
/// kInvalidArgument when a remote range lies in no published region.
inline StatusOr<std::vector<DeviceCopy>> translate_runs(const std::vector<CopyRun>& runs, Op op,
                                                        const RegionTable& remote_regions,
                                                        bool remote_is_self,
                                                        const RegionMapper& map) {
  std::vector<DeviceCopy> out;
  out.reserve(runs.size());
  for (const CopyRun& r : runs) {
    if (r.nbytes == 0) continue;
    uint64_t remote = r.remote_addr;
    if (!remote_is_self) {
      const RegionInfo* region = nullptr;
      for (MemoryKind kind : {MemoryKind::kCuda, MemoryKind::kHost}) {
        for (const RegionInfo& candidate : remote_regions.regions()) {
          if (candidate.device.kind == kind && r.remote_addr >= candidate.addr &&
              r.remote_addr + r.nbytes <= candidate.addr + candidate.nbytes) {
            region = &candidate;
            break;
          }
        }
        if (region != nullptr) break;
      }
      if (region == nullptr) {
        return BANASERVE_INVALID("remote range [" + std::to_string(r.remote_addr) + ", +" +
                                 std::to_string(r.nbytes) + ") lies in no region of the peer");
      }
      BANASERVE_ASSIGN_OR_RETURN(uint64_t base, map(*region));
      remote = base + (r.remote_addr - region->addr);
    }
    DeviceCopy c = op == Op::kWrite ? DeviceCopy{remote, r.local_addr, r.nbytes}
                                    : DeviceCopy{r.local_addr, remote, r.nbytes};
    if (!out.empty() && out.back().dst + out.back().nbytes == c.dst &&
        out.back().src + out.back().nbytes == c.src) {
      out.back().nbytes += c.nbytes;
    } else {
      out.push_back(c);
    }
  }
  return out;
}

}  // namespace banaserve::transfer::cuda
