// SPDX-License-Identifier: Apache-2.0
// The names of the transfer backends, listed once. Each backend's Transport::name(), the registry
// that creates them (src/backend_registry.cc), EngineConfig::backends, the bindings
// (_core.backend_names(), _core.default_backends()) and through them the Python façade all use
// this list; a new backend is one line here plus its directory.
#pragma once

#include <array>
#include <cstring>
#include <string>
#include <vector>

namespace banaserve::transfer {

namespace backend {
inline constexpr char kLocal[] = "local";  // this engine itself; every engine runs it
inline constexpr char kShm[] = "shm";      // same host, shared memory
inline constexpr char kTcp[] = "tcp";      // any host, TCP
inline constexpr char kUcx[] = "ucx";      // any host, UCX (RDMA); opt-in
inline constexpr char kCuda[] = "cuda";    // same host, CUDA IPC
}  // namespace backend

struct BackendName {
  const char* name;
  bool on_by_default;  // started by an engine whose configuration does not choose
};

/// Every backend this library knows, compiled into this build or not, in the order an engine
/// considers them.
inline constexpr std::array<BackendName, 5> kBackendNames{{
    {backend::kLocal, true},
    {backend::kShm, true},
    {backend::kTcp, true},
    {backend::kUcx, false},
    {backend::kCuda, true},
}};

inline bool is_known_backend(const std::string& name) {
  for (const BackendName& b : kBackendNames) {
    if (name == b.name) return true;
  }
  return false;
}

/// The names of kBackendNames, in order.
inline std::vector<std::string> backend_names() {
  std::vector<std::string> out;
  for (const BackendName& b : kBackendNames) out.emplace_back(b.name);
  return out;
}

/// The backends an engine starts besides local when its configuration does not choose.
inline std::vector<std::string> default_backends() {
  std::vector<std::string> out;
  for (const BackendName& b : kBackendNames) {
    if (b.on_by_default && std::strcmp(b.name, backend::kLocal) != 0) out.emplace_back(b.name);
  }
  return out;
}

}  // namespace banaserve::transfer
