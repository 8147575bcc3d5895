// SPDX-License-Identifier: Apache-2.0
// The one place that knows which backends are compiled in (their names: backend_names.h). Each
// backend is compiled only when its directory is part of the build (CMake defines
// BANASERVE_HAVE_<NAME>_BACKEND for this file alone).
#include "../backends/local/local_transport.h"
#include "banaserve/transfer/backend_names.h"
#include "banaserve/transfer/fence.h"
#include "banaserve/transfer/transport.h"

namespace banaserve::transfer {

#ifdef BANASERVE_HAVE_SHM_BACKEND
std::unique_ptr<Transport> make_shm_transport();
#endif
#ifdef BANASERVE_HAVE_TCP_BACKEND
std::unique_ptr<Transport> make_tcp_transport();
#endif
#ifdef BANASERVE_HAVE_UCX_BACKEND
std::unique_ptr<Transport> make_ucx_transport();
#endif
#ifdef BANASERVE_HAVE_CUDA_BACKEND
std::unique_ptr<Transport> make_cuda_transport();
StatusOr<std::shared_ptr<ReadyFence>> make_cuda_event_fence(uint64_t event_handle);
#endif

StatusOr<std::shared_ptr<ReadyFence>> make_device_event_fence(uint64_t event_handle) {
#ifdef BANASERVE_HAVE_CUDA_BACKEND
  return make_cuda_event_fence(event_handle);
#else
  (void)event_handle;
  return BANASERVE_STATUS(StatusCode::kNotImplemented,
                          "CUDA event fences need the cuda backend, which is not part of this build");
#endif
}

namespace {

struct Compiled {
  const char* name;
  std::unique_ptr<Transport> (*make)();
};

// The backends of this build, by their names in backend_names.h.
const std::vector<Compiled>& compiled() {
  static const std::vector<Compiled> table{
      {backend::kLocal, &make_local_transport},
#ifdef BANASERVE_HAVE_SHM_BACKEND
      {backend::kShm, &make_shm_transport},
#endif
#ifdef BANASERVE_HAVE_TCP_BACKEND
      {backend::kTcp, &make_tcp_transport},
#endif
#ifdef BANASERVE_HAVE_UCX_BACKEND
      {backend::kUcx, &make_ucx_transport},
#endif
#ifdef BANASERVE_HAVE_CUDA_BACKEND
      {backend::kCuda, &make_cuda_transport},
#endif
  };
  return table;
}

const Compiled* find_compiled(const std::string& name) {
  for (const Compiled& c : compiled()) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

}  // namespace

std::vector<std::string> available_transports() {
  std::vector<std::string> names;
  for (const BackendName& b : kBackendNames) {
    if (find_compiled(b.name) != nullptr) names.emplace_back(b.name);
  }
  return names;
}

StatusOr<std::unique_ptr<Transport>> create_transport(const std::string& name) {
  if (const Compiled* c = find_compiled(name)) return c->make();
  if (is_known_backend(name)) {
    return BANASERVE_STATUS(StatusCode::kNotImplemented,
                            "transfer backend '" + name + "' is not compiled into this build");
  }
  return BANASERVE_STATUS(StatusCode::kNotFound, "unknown transfer backend '" + name + "'");
}

}  // namespace banaserve::transfer
