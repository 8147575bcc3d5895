// SPDX-License-Identifier: Apache-2.0
// Pure planning functions: validation of ranges against registrations, index → address
// resolution and coalescing into copy runs. No I/O, no threads, no global state; everything the
// hot path computes per page lives here so it can be tested without an engine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "banaserve/common/status.h"
#include "banaserve/transfer/types.h"

namespace banaserve::transfer {

/// One contiguous copy: nbytes from local_addr to remote_addr (kWrite) or back (kRead).
struct CopyRun {
  uint64_t local_addr;
  uint64_t remote_addr;
  uint64_t nbytes;
};

/// A sorted, non-overlapping set of regions with O(log n) range lookup. Value type; the engine
/// keeps one per peer and one for itself (guarded by its own lock).
class RegionTable {
 public:
  RegionTable() = default;
  explicit RegionTable(std::vector<RegionInfo> regions);  // sorts; overlapping input is a bug

  /// kInvalidArgument if overlapping an existing region or zero-sized.
  Status insert(const RegionInfo& region);
  /// kNotFound if no region has that id.
  Status erase(uint64_t region_id);
  /// The region fully containing [addr, addr + nbytes) on `device`, or nullptr. nbytes == 0 is
  /// accepted when addr lies inside (or at the end of) a region.
  const RegionInfo* find(uint64_t addr, uint64_t nbytes, Device device) const;
  const RegionInfo* find_id(uint64_t region_id) const;
  const std::vector<RegionInfo>& regions() const { return regions_; }
  size_t size() const { return regions_.size(); }
  /// Identity of this version of the table, stamped by its owner (the engine) whenever it
  /// publishes a changed table; prepared lists remember it to notice later changes.
  uint64_t generation() const { return generation_; }
  void set_generation(uint64_t generation) { generation_ = generation; }

 private:
  std::vector<RegionInfo> regions_;  // sorted by addr
  uint64_t generation_ = 0;
};

/// Validates [addr, addr+nbytes) against table; the error names `what` and the offending range.
Status check_range(const RegionTable& table, uint64_t addr, uint64_t nbytes, Device device,
                   const char* what);

/// A prepared list: either explicit descriptors (addr[i], nbytes[i]) or a layout of equally
/// strided buffers (bases[b] + item * item_nbytes for item < num_items). Validated once against
/// a RegionTable at prepare time; posting only checks indices.
struct PreparedList {
  enum class Kind : uint8_t { kDescs = 0, kLayout = 1 };
  Kind kind = Kind::kDescs;
  Device device;
  std::vector<uint64_t> addrs;   // kDescs: descriptor addresses; kLayout: buffer bases
  std::vector<uint64_t> nbytes;  // kDescs only
  uint64_t item_nbytes = 0;      // kLayout only
  uint64_t num_items = 0;        // kLayout only
  // Engine bookkeeping: whose registrations validated this list ("" = this engine) and at which
  // generation of that table; a later change of the table triggers re-validation at submit.
  std::string owner;
  uint64_t generation = 0;

  size_t num_entries() const { return kind == Kind::kDescs ? addrs.size() : num_items; }
  size_t num_buffers() const { return kind == Kind::kDescs ? 1 : addrs.size(); }
};

/// Builds and validates a descriptor list (every range must lie in one region of `table`).
StatusOr<PreparedList> prepare_descs(const RegionTable& table, const uint64_t* addrs,
                                     const uint64_t* nbytes, size_t n, Device device);
/// Builds and validates a layout (every buffer [base, base + item_nbytes * num_items) must lie
/// in one region). item_nbytes must be > 0.
StatusOr<PreparedList> prepare_layout(const RegionTable& table, const uint64_t* bases,
                                      size_t num_buffers, uint64_t item_nbytes,
                                      uint64_t num_items, Device device);

/// Resolves n index pairs into copy runs, coalescing runs that are contiguous on both sides.
/// For layouts, buffers [buf_begin, buf_end) are visited in order, each with every index pair.
/// Fails (writing nothing into *out beyond what it had) on: index out of range (kOutOfRange),
/// mismatched sizes or layouts (kInvalidArgument). Appends to *out.
Status build_runs(const PreparedList& local, const int64_t* local_idx, const PreparedList& remote,
                  const int64_t* remote_idx, size_t n, uint32_t buf_begin, uint32_t buf_end,
                  std::vector<CopyRun>* out);

/// Splits runs into at most max_parts parts of roughly equal bytes, cutting runs where needed
/// (never below min_part_nbytes per part unless the total is smaller). Returns the part
/// boundaries as half-open ranges into *runs after cutting; the runs vector may grow.
std::vector<std::pair<size_t, size_t>> split_runs(std::vector<CopyRun>* runs, size_t max_parts,
                                                  uint64_t min_part_nbytes);

uint64_t total_nbytes(const CopyRun* runs, size_t n);

}  // namespace banaserve::transfer
