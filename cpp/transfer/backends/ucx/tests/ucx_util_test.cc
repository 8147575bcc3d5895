// SPDX-License-Identifier: Apache-2.0
#include "../ucx_util.h"

#include "check.h"

using banaserve::transfer::ucx::condense_route;

// CHECK_EQ prints with unary +, which strings lack.
#define CHECK_STR(a, b)                                                                   \
  do {                                                                                    \
    const std::string va_ = (a), vb_ = (b);                                               \
    if (va_ != vb_) ::banaserve::testing::fail(__FILE__, __LINE__, "'" + va_ + "' vs '" + vb_ + "'"); \
  } while (0)

TEST_CASE(condenses_tcp_lanes_with_roles) {
  const std::string text =
      "#\n# UCP endpoint \n#\n#               peer: <no debug data>\n"
      "#                 lane[0]:  0:tcp/lo.0 md[0]                -> md[0]/tcp/sysdev[255] rma_bw#0 am am_bw#0\n"
      "#                 am_send: 0..<egr/short>..8185..<egr/zcopy>..8192..<rndv>..(inf)\n";
  CHECK_STR(condense_route(text), std::string("tcp/lo(rma_bw,am_bw,am)"));
}

TEST_CASE(condenses_shared_memory_lanes_in_order) {
  const std::string text =
      "#                 lane[0]:  0:self/memory0.0 md[0]          -> md[0]/self/sysdev[255] am am_bw#0\n"
      "#                 lane[1]:  1:posix/memory.0 md[1]           -> md[1]/posix/sysdev[255]\n"
      "#                 lane[2]:  2:cma/memory.0 md[2]            -> md[2]/cma/sysdev[255] rma_bw#0\n"
      "#                  put[0]: 0..<short>..4294967296..<bcopy>..(inf)\n";
  CHECK_STR(condense_route(text),
           std::string("self/memory0(am_bw,am), posix/memory, cma/memory(rma_bw)"));
}

TEST_CASE(ignores_text_without_lanes) {
  CHECK_STR(condense_route("# UCP worker 'vm:1'\n#   address: 79 bytes\n"), std::string(""));
  CHECK_STR(condense_route(""), std::string(""));
}

int main() { return banaserve::testing::run_all(); }
