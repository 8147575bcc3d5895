// SPDX-License-Identifier: Apache-2.0
#include <vector>

#include "banaserve/transfer/plan.h"
#include "check.h"

using namespace banaserve;
using namespace banaserve::transfer;

namespace {
RegionInfo region(uint64_t id, uint64_t addr, uint64_t nbytes) {
  RegionInfo r;
  r.id = id;
  r.addr = addr;
  r.nbytes = nbytes;
  return r;
}
const Device kHost{};
}  // namespace

TEST_CASE(region_table_finds_containing_region_only) {
  RegionTable t;
  CHECK_OK(t.insert(region(1, 0x1000, 0x1000)));
  CHECK_OK(t.insert(region(2, 0x4000, 0x100)));
  CHECK(t.find(0x1000, 0x1000, kHost) != nullptr);
  CHECK(t.find(0x1800, 0x800, kHost) != nullptr);
  CHECK(t.find(0x1800, 0x801, kHost) == nullptr);  // crosses the end
  CHECK(t.find(0x0fff, 2, kHost) == nullptr);      // starts before
  CHECK(t.find(0x3000, 1, kHost) == nullptr);      // gap
  CHECK(t.find(0x2000, 0, kHost) != nullptr);      // zero-length at the end is fine
  CHECK(t.find(0x4000, 0x100, Device{MemoryKind::kCuda, 0}) == nullptr);  // wrong device
  CHECK(t.find(UINT64_MAX - 1, 4, kHost) == nullptr);  // overflow
}

TEST_CASE(region_table_rejects_overlap_zero_and_null) {
  RegionTable t;
  CHECK_OK(t.insert(region(1, 0x1000, 0x1000)));
  CHECK_CODE(t.insert(region(2, 0x1fff, 0x10)), StatusCode::kAlreadyExists);
  CHECK_CODE(t.insert(region(3, 0x0800, 0x900)), StatusCode::kAlreadyExists);
  CHECK_CODE(t.insert(region(4, 0x3000, 0)), StatusCode::kInvalidArgument);
  CHECK_CODE(t.insert(region(5, 0, 10)), StatusCode::kInvalidArgument);
  CHECK_OK(t.insert(region(6, 0x2000, 0x10)));  // adjacent is fine
  CHECK_CODE(t.erase(99), StatusCode::kNotFound);
  CHECK_OK(t.erase(1));
  CHECK(t.find(0x1000, 1, kHost) == nullptr);
}

TEST_CASE(build_runs_coalesces_contiguous_pairs) {
  // Tagged addresses: local pages at 0x1000*k, remote at 0x100000 + 0x1000*k.
  RegionTable lt, rt;
  CHECK_OK(lt.insert(region(1, 0x1000, 0x10000)));
  CHECK_OK(rt.insert(region(1, 0x100000, 0x10000)));
  std::vector<uint64_t> la, ra, len;
  for (uint64_t k = 0; k < 8; ++k) {
    la.push_back(0x1000 + 0x1000 * k);
    ra.push_back(0x100000 + 0x1000 * k);
    len.push_back(0x1000);
  }
  auto l = prepare_descs(lt, la.data(), len.data(), la.size(), kHost);
  auto r = prepare_descs(rt, ra.data(), len.data(), ra.size(), kHost);
  CHECK(l.ok() && r.ok());
  std::vector<int64_t> li{0, 1, 2, 5, 6, 3};
  std::vector<int64_t> ri{0, 1, 2, 5, 7, 3};
  std::vector<CopyRun> runs;
  CHECK_OK(build_runs(l.value(), li.data(), r.value(), ri.data(), li.size(), 0, 1, &runs));
  CHECK_EQ(runs.size(), size_t{4});
  CHECK_EQ(runs[0].local_addr, uint64_t{0x1000});
  CHECK_EQ(runs[0].nbytes, uint64_t{0x3000});  // 0,1,2 merged
  CHECK_EQ(runs[1].nbytes, uint64_t{0x1000});  // 5 alone: 6 is not contiguous remotely
  CHECK_EQ(runs[2].remote_addr, uint64_t{0x100000 + 0x7000});
  CHECK_EQ(total_nbytes(runs.data(), runs.size()), uint64_t{6 * 0x1000});
}

TEST_CASE(build_runs_rejects_bad_indices_and_sizes_without_output) {
  RegionTable t;
  CHECK_OK(t.insert(region(1, 0x1000, 0x10000)));
  std::vector<uint64_t> a{0x1000, 0x2000}, len_a{16, 16}, len_b{16, 32};
  auto l = prepare_descs(t, a.data(), len_a.data(), 2, kHost);
  auto r = prepare_descs(t, a.data(), len_b.data(), 2, kHost);
  std::vector<CopyRun> runs;
  std::vector<int64_t> bad{0, 2}, neg{-1, 0}, ok{0, 1};
  CHECK_CODE(build_runs(l.value(), bad.data(), l.value(), ok.data(), 2, 0, 1, &runs), StatusCode::kOutOfRange);
  CHECK_CODE(build_runs(l.value(), neg.data(), l.value(), ok.data(), 2, 0, 1, &runs), StatusCode::kOutOfRange);
  CHECK_CODE(build_runs(l.value(), ok.data(), r.value(), ok.data(), 2, 0, 1, &runs), StatusCode::kInvalidArgument);
  CHECK(runs.empty());
}

TEST_CASE(prepare_rejects_unregistered_ranges) {
  RegionTable t;
  CHECK_OK(t.insert(region(1, 0x1000, 0x1000)));
  std::vector<uint64_t> a{0x1000, 0x1ff0}, len{16, 32};
  auto l = prepare_descs(t, a.data(), len.data(), 2, kHost);
  CHECK_CODE(l.status(), StatusCode::kInvalidArgument);
  uint64_t base = 0x1000;
  CHECK_CODE(prepare_layout(t, &base, 1, 0x100, 17, kHost).status(), StatusCode::kInvalidArgument);
  CHECK_OK(prepare_layout(t, &base, 1, 0x100, 16, kHost).status());
  CHECK_CODE(prepare_layout(t, &base, 1, 0, 16, kHost).status(), StatusCode::kInvalidArgument);
}

TEST_CASE(layout_runs_visit_buffer_range_and_coalesce) {
  // Two layers x (K, V): 4 buffers of 8 items of 0x100 bytes each.
  RegionTable t;
  CHECK_OK(t.insert(region(1, 0x10000, 0x10000)));
  std::vector<uint64_t> lb{0x10000, 0x11000, 0x12000, 0x13000};
  std::vector<uint64_t> rb{0x14000, 0x15000, 0x16000, 0x17000};
  auto l = prepare_layout(t, lb.data(), 4, 0x100, 8, kHost);
  auto r = prepare_layout(t, rb.data(), 4, 0x100, 8, kHost);
  std::vector<int64_t> li{2, 3, 4}, ri{5, 6, 7};
  std::vector<CopyRun> runs;
  CHECK_OK(build_runs(l.value(), li.data(), r.value(), ri.data(), 3, 2, 4, &runs));
  CHECK_EQ(runs.size(), size_t{2});  // one coalesced run per buffer of layer 1
  CHECK_EQ(runs[0].local_addr, uint64_t{0x12000 + 0x200});
  CHECK_EQ(runs[0].remote_addr, uint64_t{0x16000 + 0x500});
  CHECK_EQ(runs[0].nbytes, uint64_t{0x300});
  CHECK_EQ(runs[1].local_addr, uint64_t{0x13000 + 0x200});
  runs.clear();
  CHECK_CODE(build_runs(l.value(), li.data(), r.value(), ri.data(), 3, 5, 4, &runs), StatusCode::kOutOfRange);
}

TEST_CASE(split_runs_balances_bytes_and_preserves_content) {
  std::vector<CopyRun> runs{{0, 1000, 100}, {200, 2000, 700}, {1000, 5000, 200}};
  const auto parts = split_runs(&runs, 4, 100);
  CHECK_EQ(parts.size(), size_t{4});
  uint64_t total = 0;
  for (auto [b, e] : parts) {
    const uint64_t n = total_nbytes(runs.data() + b, e - b);
    CHECK_EQ(n, uint64_t{250});
    total += n;
  }
  CHECK_EQ(total, uint64_t{1000});
  // The cut run keeps local/remote in step.
  for (const auto& r : runs) {
    if (r.local_addr >= 200 && r.local_addr < 900) CHECK_EQ(r.remote_addr - r.local_addr, uint64_t{1800});
  }
  std::vector<CopyRun> small{{0, 0, 10}};
  CHECK_EQ(split_runs(&small, 4, 100).size(), size_t{1});
  std::vector<CopyRun> none;
  CHECK(split_runs(&none, 4, 100).empty());
}

int main() { return banaserve::testing::run_all(); }
