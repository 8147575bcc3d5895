// SPDX-License-Identifier: Apache-2.0
// FaultTransport: a fault-injecting decorator over any backend, for tests. It forwards everything
// to the wrapped backend except post(), which it may fail (after N posts), delay, or drop (never
// complete, so the engine's deadline must fail the batch).
#pragma once

#include <memory>

#include "banaserve/transfer/engine.h"
#include "banaserve/transfer/transport.h"

namespace banaserve::transfer {

/// inner must outlive the decorator.
std::unique_ptr<Transport> make_fault_transport(Transport* inner, const FaultSpec& spec);

}  // namespace banaserve::transfer
