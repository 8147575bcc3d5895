// SPDX-License-Identifier: Apache-2.0
// The ucx backend: UCP one-sided RMA between engines (RDMA where UCX finds an RDMA device, else
// UCX's shared-memory or TCP transports). Built only when UCX is found (pkg-config `ucx`).
#pragma once

#include <memory>

#include "banaserve/transfer/transport.h"

namespace banaserve::transfer {

std::unique_ptr<Transport> make_ucx_transport();

}  // namespace banaserve::transfer
