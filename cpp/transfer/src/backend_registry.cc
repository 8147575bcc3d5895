// SPDX-License-Identifier: Apache-2.0
// The one place that knows which backends exist. Each backend is compiled only when its directory
// is part of the build (CMake defines BANASERVE_HAVE_<NAME>_BACKEND for this file alone).
#include "../backends/local/local_transport.h"
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

std::vector<std::string> available_transports() {
  std::vector<std::string> names{"local"};
#ifdef BANASERVE_HAVE_SHM_BACKEND
  names.emplace_back("shm");
#endif
#ifdef BANASERVE_HAVE_TCP_BACKEND
  names.emplace_back("tcp");
#endif
#ifdef BANASERVE_HAVE_UCX_BACKEND
  names.emplace_back("ucx");
#endif
#ifdef BANASERVE_HAVE_CUDA_BACKEND
  names.emplace_back("cuda");
#endif
  return names;
}

StatusOr<std::unique_ptr<Transport>> create_transport(const std::string& name) {
  if (name == "local") return make_local_transport();
#ifdef BANASERVE_HAVE_SHM_BACKEND
  if (name == "shm") return make_shm_transport();
#endif
#ifdef BANASERVE_HAVE_TCP_BACKEND
  if (name == "tcp") return make_tcp_transport();
#endif
#ifdef BANASERVE_HAVE_UCX_BACKEND
  if (name == "ucx") return make_ucx_transport();
#endif
#ifdef BANASERVE_HAVE_CUDA_BACKEND
  if (name == "cuda") return make_cuda_transport();
#endif
  if (name == "shm" || name == "tcp" || name == "cuda" || name == "ucx" || name == "rdma") {
    return BANASERVE_STATUS(StatusCode::kNotImplemented,
                            "transfer backend '" + name + "' is not compiled into this build");
  }
  return BANASERVE_STATUS(StatusCode::kNotFound, "unknown transfer backend '" + name + "'");
}

}  // namespace banaserve::transfer
