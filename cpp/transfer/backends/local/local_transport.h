// SPDX-License-Identifier: Apache-2.0
// The local backend: copies inside this process, between two registrations of this engine.
// The reference implementation every other backend is compared against in tests.
#pragma once

#include <memory>

#include "banaserve/transfer/transport.h"

namespace banaserve::transfer {

std::unique_ptr<Transport> make_local_transport();

}  // namespace banaserve::transfer
