// SPDX-License-Identifier: Apache-2.0
#include "copy_plan.h"

#include <algorithm>
#include <cstring>

namespace banaserve::transfer::shm {

bool region_fits_file(const RegionInfo& region, uint64_t file_nbytes) {
  return region.shm_offset <= file_nbytes && region.nbytes <= file_nbytes - region.shm_offset;
}

uint64_t advance_cursor(const ResolvedRun* runs, size_t n, RunCursor* cur, uint64_t nbytes) {
  uint64_t moved = 0;
  while (cur->index < n) {
    uint64_t left = runs[cur->index].nbytes - cur->offset;
    if (left == 0) {
      ++cur->index;
      cur->offset = 0;
      continue;
    }
    if (moved == nbytes) break;
    uint64_t step = std::min(left, nbytes - moved);
    cur->offset += step;
    moved += step;
  }
  return moved;
}

bool cursor_done(const ResolvedRun* runs, size_t n, RunCursor cur) {
  for (size_t i = cur.index; i < n; ++i) {
    if (runs[i].nbytes > (i == cur.index ? cur.offset : 0)) return false;
  }
  return true;
}

size_t fill_iovecs(const ResolvedRun* runs, size_t n, RunCursor cur, uint64_t max_bytes,
                   size_t max_iov, struct iovec* local, struct iovec* remote, uint64_t* nbytes) {
  size_t k = 0;
  uint64_t total = 0;
  for (size_t i = cur.index; i < n && k < max_iov && total < max_bytes; ++i) {
    uint64_t off = i == cur.index ? cur.offset : 0;
    if (runs[i].nbytes <= off) continue;
    uint64_t len = std::min(runs[i].nbytes - off, max_bytes - total);
    local[k].iov_base = reinterpret_cast<void*>(runs[i].local + off);
    local[k].iov_len = len;
    remote[k].iov_base = reinterpret_cast<void*>(runs[i].remote + off);
    remote[k].iov_len = len;
    ++k;
    total += len;
  }
  *nbytes = total;
  return k;
}

uint64_t copy_chunk(const ResolvedRun* runs, size_t n, RunCursor* cur, uint64_t max_bytes, Op op) {
  uint64_t copied = 0;
  while (cur->index < n && copied < max_bytes) {
    const ResolvedRun& r = runs[cur->index];
    uint64_t len = std::min(r.nbytes - cur->offset, max_bytes - copied);
    if (len > 0) {
      auto* local = reinterpret_cast<char*>(r.local + cur->offset);
      auto* remote = reinterpret_cast<char*>(r.remote + cur->offset);
      if (op == Op::kWrite) {
        std::memcpy(remote, local, len);
      } else {
        std::memcpy(local, remote, len);
      }
      cur->offset += len;
      copied += len;
    }
    if (cur->offset == r.nbytes) {
      ++cur->index;
      cur->offset = 0;
    }
  }
  return copied;
}

}  // namespace banaserve::transfer::shm
