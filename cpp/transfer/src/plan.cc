// SPDX-License-Identifier: Apache-2.0
#include "banaserve/transfer/plan.h"

#include <algorithm>
#include <string>

namespace banaserve::transfer {
namespace {

std::string hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

bool add_overflows(uint64_t a, uint64_t b) { return a + b < a; }

}  // namespace

RegionTable::RegionTable(std::vector<RegionInfo> regions) : regions_(std::move(regions)) {
  std::sort(regions_.begin(), regions_.end(),
            [](const RegionInfo& a, const RegionInfo& b) { return a.addr < b.addr; });
}

Status RegionTable::insert(const RegionInfo& region) {
  if (region.nbytes == 0) return BANASERVE_INVALID("cannot register a zero-sized region");
  if (region.addr == 0) return BANASERVE_INVALID("cannot register a null address");
  if (add_overflows(region.addr, region.nbytes)) {
    return BANASERVE_INVALID("region " + hex(region.addr) + " + " + std::to_string(region.nbytes) +
                             " wraps around the address space");
  }
  auto it = std::lower_bound(regions_.begin(), regions_.end(), region.addr,
                             [](const RegionInfo& r, uint64_t a) { return r.addr < a; });
  const uint64_t end = region.addr + region.nbytes;
  if (it != regions_.end() && it->addr < end) {
    return BANASERVE_STATUS(StatusCode::kAlreadyExists,
                            "region [" + hex(region.addr) + ", " + hex(end) +
                                ") overlaps registered region " + std::to_string(it->id));
  }
  if (it != regions_.begin()) {
    auto prev = std::prev(it);
    if (prev->addr + prev->nbytes > region.addr) {
      return BANASERVE_STATUS(StatusCode::kAlreadyExists,
                              "region [" + hex(region.addr) + ", " + hex(end) +
                                  ") overlaps registered region " + std::to_string(prev->id));
    }
  }
  regions_.insert(it, region);
  return Status();
}

Status RegionTable::erase(uint64_t region_id) {
  auto it = std::find_if(regions_.begin(), regions_.end(),
                         [&](const RegionInfo& r) { return r.id == region_id; });
  if (it == regions_.end()) {
    return BANASERVE_STATUS(StatusCode::kNotFound,
                            "no registered region with id " + std::to_string(region_id));
  }
  regions_.erase(it);
  return Status();
}

const RegionInfo* RegionTable::find(uint64_t addr, uint64_t nbytes, Device device) const {
  if (add_overflows(addr, nbytes)) return nullptr;
  // Last region starting at or before addr.
  auto it = std::upper_bound(regions_.begin(), regions_.end(), addr,
                             [](uint64_t a, const RegionInfo& r) { return a < r.addr; });
  if (it == regions_.begin()) return nullptr;
  const RegionInfo& r = *std::prev(it);
  if (r.device != device) return nullptr;
  if (addr + nbytes > r.addr + r.nbytes) return nullptr;
  if (nbytes == 0 && addr > r.addr + r.nbytes) return nullptr;
  return &r;
}

const RegionInfo* RegionTable::find_id(uint64_t region_id) const {
  for (const auto& r : regions_) {
    if (r.id == region_id) return &r;
  }
  return nullptr;
}

Status check_range(const RegionTable& table, uint64_t addr, uint64_t nbytes, Device device,
                   const char* what) {
  if (table.find(addr, nbytes, device) != nullptr) return Status();
  return BANASERVE_INVALID(std::string(what) + " range [" + hex(addr) + ", +" +
                           std::to_string(nbytes) + ") is not inside one registered " +
                           (device.kind == MemoryKind::kHost ? "host" : "device") + " region");
}

StatusOr<PreparedList> prepare_descs(const RegionTable& table, const uint64_t* addrs,
                                     const uint64_t* nbytes, size_t n, Device device) {
  PreparedList list;
  list.kind = PreparedList::Kind::kDescs;
  list.device = device;
  list.addrs.assign(addrs, addrs + n);
  list.nbytes.assign(nbytes, nbytes + n);
  // Consecutive descriptors usually share a region: check the cached one first.
  const RegionInfo* last = nullptr;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t a = addrs[i], len = nbytes[i];
    if (last && !add_overflows(a, len) && a >= last->addr && a + len <= last->addr + last->nbytes) {
      continue;
    }
    last = table.find(a, len, device);
    if (last == nullptr) {
      return check_range(table, a, len, device, "descriptor").with_context(
          "descriptor " + std::to_string(i));
    }
  }
  return list;
}

StatusOr<PreparedList> prepare_layout(const RegionTable& table, const uint64_t* bases,
                                      size_t num_buffers, uint64_t item_nbytes,
                                      uint64_t num_items, Device device) {
  if (item_nbytes == 0) return BANASERVE_INVALID("layout item_nbytes must be > 0");
  if (num_buffers == 0) return BANASERVE_INVALID("layout needs at least one buffer");
  if (num_items != 0 && item_nbytes > UINT64_MAX / num_items) {
    return BANASERVE_INVALID("layout item_nbytes * num_items overflows");
  }
  const uint64_t span = item_nbytes * num_items;
  for (size_t b = 0; b < num_buffers; ++b) {
    BANASERVE_RETURN_IF_ERROR(check_range(table, bases[b], span, device, "layout buffer")
                                  .with_context("buffer " + std::to_string(b)));
  }
  PreparedList list;
  list.kind = PreparedList::Kind::kLayout;
  list.device = device;
  list.addrs.assign(bases, bases + num_buffers);
  list.item_nbytes = item_nbytes;
  list.num_items = num_items;
  return list;
}

namespace {

// Appends a run, merging it into the previous one when contiguous on both sides.
inline void append_run(std::vector<CopyRun>* out, uint64_t l, uint64_t r, uint64_t len) {
  if (len == 0) return;
  if (!out->empty()) {
    CopyRun& back = out->back();
    if (back.local_addr + back.nbytes == l && back.remote_addr + back.nbytes == r) {
      back.nbytes += len;
      return;
    }
  }
  out->push_back(CopyRun{l, r, len});
}

Status check_indices(const int64_t* idx, size_t n, size_t limit, const char* side) {
  for (size_t k = 0; k < n; ++k) {
    if (idx[k] < 0 || static_cast<uint64_t>(idx[k]) >= limit) {
      return BANASERVE_STATUS(StatusCode::kOutOfRange,
                              std::string(side) + " index " + std::to_string(idx[k]) +
                                  " at position " + std::to_string(k) + " is outside [0, " +
                                  std::to_string(limit) + ")");
    }
  }
  return Status();
}

}  // namespace

Status build_runs(const PreparedList& local, const int64_t* local_idx, const PreparedList& remote,
                  const int64_t* remote_idx, size_t n, uint32_t buf_begin, uint32_t buf_end,
                  std::vector<CopyRun>* out) {
  if (local.kind != remote.kind) {
    return BANASERVE_INVALID("local and remote lists must both be descriptor lists or layouts");
  }
  BANASERVE_RETURN_IF_ERROR(check_indices(local_idx, n, local.num_entries(), "local"));
  BANASERVE_RETURN_IF_ERROR(check_indices(remote_idx, n, remote.num_entries(), "remote"));
  if (local.kind == PreparedList::Kind::kDescs) {
    for (size_t k = 0; k < n; ++k) {
      if (local.nbytes[local_idx[k]] != remote.nbytes[remote_idx[k]]) {
        return BANASERVE_INVALID("size mismatch at position " + std::to_string(k) + ": local " +
                                 std::to_string(local.nbytes[local_idx[k]]) + " bytes, remote " +
                                 std::to_string(remote.nbytes[remote_idx[k]]) + " bytes");
      }
    }
    out->reserve(out->size() + n);
    for (size_t k = 0; k < n; ++k) {
      append_run(out, local.addrs[local_idx[k]], remote.addrs[remote_idx[k]],
                 local.nbytes[local_idx[k]]);
    }
    return Status();
  }
  if (local.item_nbytes != remote.item_nbytes) {
    return BANASERVE_INVALID("layout item sizes differ: local " +
                             std::to_string(local.item_nbytes) + ", remote " +
                             std::to_string(remote.item_nbytes));
  }
  if (local.num_buffers() != remote.num_buffers()) {
    return BANASERVE_INVALID("layouts have different buffer counts: local " +
                             std::to_string(local.num_buffers()) + ", remote " +
                             std::to_string(remote.num_buffers()));
  }
  const uint32_t end = static_cast<uint32_t>(
      std::min<uint64_t>(buf_end, static_cast<uint64_t>(local.num_buffers())));
  if (buf_begin > end) {
    return BANASERVE_STATUS(StatusCode::kOutOfRange,
                            "buffer range [" + std::to_string(buf_begin) + ", " +
                                std::to_string(buf_end) + ") is outside the layout's " +
                                std::to_string(local.num_buffers()) + " buffers");
  }
  const uint64_t item = local.item_nbytes;
  out->reserve(out->size() + n * (end - buf_begin));
  for (uint32_t b = buf_begin; b < end; ++b) {
    const uint64_t lb = local.addrs[b], rb = remote.addrs[b];
    for (size_t k = 0; k < n; ++k) {
      append_run(out, lb + static_cast<uint64_t>(local_idx[k]) * item,
                 rb + static_cast<uint64_t>(remote_idx[k]) * item, item);
    }
  }
  return Status();
}

uint64_t total_nbytes(const CopyRun* runs, size_t n) {
  uint64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += runs[i].nbytes;
  return total;
}

std::vector<std::pair<size_t, size_t>> split_runs(std::vector<CopyRun>* runs, size_t max_parts,
                                                  uint64_t min_part_nbytes) {
  std::vector<std::pair<size_t, size_t>> parts;
  const uint64_t total = total_nbytes(runs->data(), runs->size());
  if (runs->empty()) return parts;
  if (max_parts <= 1 || total <= min_part_nbytes) {
    parts.emplace_back(0, runs->size());
    return parts;
  }
  size_t nparts = std::min<uint64_t>(max_parts, std::max<uint64_t>(1, total / std::max<uint64_t>(min_part_nbytes, 1)));
  const uint64_t target = (total + nparts - 1) / nparts;
  std::vector<CopyRun> out;
  out.reserve(runs->size() + nparts);
  uint64_t acc = 0;
  size_t part_start = 0;
  for (const CopyRun& r0 : *runs) {
    CopyRun r = r0;
    while (r.nbytes > 0) {
      const uint64_t room = target - acc;
      if (r.nbytes <= room) {
        out.push_back(r);
        acc += r.nbytes;
        r.nbytes = 0;
      } else {
        out.push_back(CopyRun{r.local_addr, r.remote_addr, room});
        r.local_addr += room;
        r.remote_addr += room;
        r.nbytes -= room;
        acc = target;
      }
      if (acc == target) {
        parts.emplace_back(part_start, out.size());
        part_start = out.size();
        acc = 0;
      }
    }
  }
  if (part_start < out.size()) parts.emplace_back(part_start, out.size());
  runs->swap(out);
  return parts;
}

}  // namespace banaserve::transfer
