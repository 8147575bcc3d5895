// SPDX-License-Identifier: Apache-2.0
// What UCX chose, as one line: the transports/devices of a worker or an endpoint. The parsing is
// a pure function (tested on its own); the two wrappers capture UCX's print_info output.
#pragma once

#include <string>

#include <ucp/api/ucp.h>

namespace banaserve::transfer::ucx {

/// Condenses the text of ucp_ep_print_info / ucp_worker_print_info into "tl/dev, tl/dev, ..."
/// (unique, in order of appearance). Lines that name no transport are ignored. "" if none.
std::string condense_route(const std::string& print_info_text);

/// The transports/devices an endpoint uses (its lanes), e.g. "tcp/lo" or "sysv/memory, cma/memory".
std::string endpoint_route(ucp_ep_h ep);
/// The transports/devices a worker opened (what an endpoint may use).
std::string worker_transports(ucp_worker_h worker);

}  // namespace banaserve::transfer::ucx
