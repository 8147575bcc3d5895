// SPDX-License-Identifier: Apache-2.0
// Pure helpers of the shm backend's copy loop: translating a peer address into our mapping of its
// memfd, and walking a list of runs in bounded chunks (memcpy) or iovec batches (process_vm_*).
// No syscalls, no state: tested on their own in tests/copy_plan_test.cc.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

#include "banaserve/transfer/types.h"

namespace banaserve::transfer::shm {

/// One run after resolution. For the mapped path `remote` is an address in OUR process (inside
/// the mapping of the peer's memfd); for the cross-memory-attach path it is the peer's address.
struct ResolvedRun {
  uint64_t local;
  uint64_t remote;
  uint64_t nbytes;
};

/// Position inside a run list: run index and byte offset within that run.
struct RunCursor {
  size_t index = 0;
  uint64_t offset = 0;
};

/// Address in our mapping (based at map_base, covering the whole memfd) of the peer address
/// `addr`, which must lie in `region`: map_base + shm_offset + (addr - region.addr).
inline uint64_t mapped_address(uint64_t map_base, const RegionInfo& region, uint64_t addr) {
  return map_base + region.shm_offset + (addr - region.addr);
}

/// True when [shm_offset, shm_offset + nbytes) of the region fits a file of file_nbytes bytes
/// (overflow-safe).
bool region_fits_file(const RegionInfo& region, uint64_t file_nbytes);

/// Moves the cursor forward by nbytes, skipping zero-length runs. Returns the bytes actually
/// skipped (less than nbytes only at the end of the list).
uint64_t advance_cursor(const ResolvedRun* runs, size_t n, RunCursor* cur, uint64_t nbytes);

/// True when the cursor is past the last non-empty run.
bool cursor_done(const ResolvedRun* runs, size_t n, RunCursor cur);

/// Fills at most max_iov iovec pairs with at most max_bytes bytes starting at `cur` (which is not
/// moved). Zero-length runs are skipped. Returns the number of pairs; *nbytes gets their total.
size_t fill_iovecs(const ResolvedRun* runs, size_t n, RunCursor cur, uint64_t max_bytes,
                   size_t max_iov, struct iovec* local, struct iovec* remote, uint64_t* nbytes);

/// Copies up to max_bytes from the cursor on with memcpy (kWrite: local → remote, kRead: remote
/// → local) and advances it. Returns the bytes copied.
uint64_t copy_chunk(const ResolvedRun* runs, size_t n, RunCursor* cur, uint64_t max_bytes, Op op);

}  // namespace banaserve::transfer::shm
