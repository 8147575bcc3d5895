// SPDX-License-Identifier: Apache-2.0
// The one list of backend names (backend_names.h) against the registry and the engine.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "banaserve/transfer/backend_names.h"
#include "banaserve/transfer/engine.h"
#include "banaserve/transfer/transport.h"
#include "check.h"

using namespace banaserve;
using namespace banaserve::transfer;

TEST_CASE(every_listed_backend_is_created_under_its_name_or_is_not_compiled_in) {
  const std::vector<std::string> available = available_transports();
  for (const BackendName& b : kBackendNames) {
    auto t = create_transport(b.name);
    const bool built = std::find(available.begin(), available.end(), b.name) != available.end();
    CHECK_EQ(t.ok(), built);
    if (t.ok()) {
      CHECK_EQ(std::string(t.value()->name()), std::string(b.name));
    } else {
      CHECK_EQ(t.status().code(), StatusCode::kNotImplemented);
    }
  }
  CHECK_CODE(create_transport("rdma").status(), StatusCode::kNotFound);
  CHECK_CODE(create_transport("").status(), StatusCode::kNotFound);
}

TEST_CASE(available_backends_follow_the_list_order_with_local_first) {
  const std::vector<std::string> names = backend_names();
  const std::vector<std::string> available = available_transports();
  CHECK(!available.empty());
  CHECK_EQ(available.front(), std::string(backend::kLocal));
  size_t pos = 0;
  for (const auto& name : available) {
    auto it = std::find(names.begin() + pos, names.end(), name);
    CHECK(it != names.end());
    pos = static_cast<size_t>(it - names.begin()) + 1;
  }
}

TEST_CASE(defaults_exclude_local_and_the_opt_in_ucx) {
  const std::vector<std::string> defaults = default_backends();
  CHECK(std::find(defaults.begin(), defaults.end(), backend::kLocal) == defaults.end());
  CHECK(std::find(defaults.begin(), defaults.end(), backend::kUcx) == defaults.end());
  CHECK(std::find(defaults.begin(), defaults.end(), backend::kTcp) != defaults.end());
  CHECK(EngineConfig{}.backends == defaults);
  for (const auto& name : defaults) CHECK(is_known_backend(name));
  CHECK(!is_known_backend("rdma"));
}

TEST_CASE(engine_starts_the_chosen_backends_and_refuses_unknown_names) {
  {
    EngineConfig config;
    config.backends = {"nope"};
    Engine e(config);
    CHECK_CODE(e.start(), StatusCode::kInvalidArgument);
  }
  {
    EngineConfig config;
    config.backends = {};
    config.force_backend = backend::kTcp;  // not started: refused
    Engine e(config);
    CHECK_CODE(e.start(), StatusCode::kInvalidArgument);
  }
  {
    EngineConfig config;
    config.backends = {backend::kLocal};  // local is always there; naming it is harmless
    config.force_backend = backend::kLocal;
    Engine e(config);
    CHECK_OK(e.start());
    e.stop();
  }
}

int main() { return banaserve::testing::run_all(); }
