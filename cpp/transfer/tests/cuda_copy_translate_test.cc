// SPDX-License-Identifier: Apache-2.0
// The cuda backend's address translation (pure; runs in every build, no GPU needed).
#include "../backends/cuda/copy_translate.h"

#include "check.h"

using namespace banaserve;
using namespace banaserve::transfer;

namespace {

RegionTable peer_regions() {
  RegionInfo gpu;
  gpu.id = 1;
  gpu.addr = 0x10000;
  gpu.nbytes = 0x1000;
  gpu.device = Device{MemoryKind::kCuda, 0};
  gpu.ipc_handle = std::string(64, 'h');
  gpu.ipc_offset = 0x200;
  RegionInfo host;
  host.id = 2;
  host.addr = 0x40000;
  host.nbytes = 0x1000;
  return RegionTable({gpu, host});
}

// The "mapping" of a GPU region is 0x900000 + ipc_offset; host regions cannot be mapped.
StatusOr<uint64_t> fake_map(const RegionInfo& r) {
  if (r.device.kind != MemoryKind::kCuda) {
    return BANASERVE_STATUS(StatusCode::kNotImplemented, "host region");
  }
  return uint64_t{0x900000} + r.ipc_offset;
}

}  // namespace

TEST_CASE(write_goes_to_the_mapped_peer_address_and_merges_contiguous_runs) {
  std::vector<CopyRun> runs{{0x100, 0x10010, 0x10}, {0x110, 0x10020, 0x20}, {0x500, 0x10800, 0}};
  auto out = cuda::translate_runs(runs, Op::kWrite, peer_regions(), false, fake_map);
  CHECK_OK(out.status());
  CHECK_EQ(out.value().size(), size_t{1});  // merged; the empty run dropped
  CHECK_EQ(out.value()[0].dst, uint64_t{0x900000 + 0x200 + 0x10});
  CHECK_EQ(out.value()[0].src, uint64_t{0x100});
  CHECK_EQ(out.value()[0].nbytes, uint64_t{0x30});
}

TEST_CASE(read_swaps_source_and_destination) {
  std::vector<CopyRun> runs{{0x100, 0x10ff0, 0x10}};
  auto out = cuda::translate_runs(runs, Op::kRead, peer_regions(), false, fake_map);
  CHECK_OK(out.status());
  CHECK_EQ(out.value()[0].src, uint64_t{0x900000 + 0x200 + 0xff0});
  CHECK_EQ(out.value()[0].dst, uint64_t{0x100});
}

TEST_CASE(ranges_outside_regions_and_unmappable_regions_are_errors) {
  std::vector<CopyRun> beyond{{0x100, 0x10ff0, 0x20}};  // crosses the region's end
  CHECK(cuda::translate_runs(beyond, Op::kWrite, peer_regions(), false, fake_map).status().code() ==
        StatusCode::kInvalidArgument);
  std::vector<CopyRun> host{{0x100, 0x40000, 0x10}};
  CHECK(cuda::translate_runs(host, Op::kWrite, peer_regions(), false, fake_map).status().code() ==
        StatusCode::kNotImplemented);
}

TEST_CASE(in_process_addresses_are_used_as_they_are) {
  std::vector<CopyRun> runs{{0x100, 0x7000, 0x10}};
  auto out = cuda::translate_runs(runs, Op::kWrite, RegionTable(), true, fake_map);
  CHECK_OK(out.status());
  CHECK_EQ(out.value()[0].dst, uint64_t{0x7000});
}

int main() { return banaserve::testing::run_all(); }
