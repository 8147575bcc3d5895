// SPDX-License-Identifier: Apache-2.0
#include "ucx_util.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <vector>

namespace banaserve::transfer::ucx {
namespace {

std::string capture(void (*print)(void*, FILE*), void* obj) {
  char* buf = nullptr;
  size_t len = 0;
  FILE* f = open_memstream(&buf, &len);
  if (f == nullptr) return "";
  print(obj, f);
  std::fclose(f);
  std::string text(buf, len);
  std::free(buf);
  return text;
}

}  // namespace

std::string condense_route(const std::string& text) {
  // Endpoint lines look like "#  lane[1]:  3:cma/memory.0 md[3]  -> md[3]/cma/sysdev[255] rma_bw#0".
  std::vector<std::string> out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const size_t lane = line.find("lane[");
    if (lane == std::string::npos) continue;
    const size_t colon = line.find(':', line.find("]:", lane) + 2);
    if (colon == std::string::npos) continue;
    size_t end = line.find_first_of(" \t", colon + 1);
    std::string tl = line.substr(colon + 1, end == std::string::npos ? std::string::npos : end - colon - 1);
    const size_t dot = tl.rfind('.');
    if (dot != std::string::npos && dot > tl.find('/')) tl.resize(dot);  // "tcp/lo.0" -> "tcp/lo"
    if (tl.find('/') == std::string::npos) continue;
    std::string roles;
    for (const char* role : {"rma_bw", "rma", "amo", "am_bw", "am"}) {
      const std::string r = std::string(" ") + role;
      size_t at = line.find(r, line.find("->"));
      while (at != std::string::npos) {
        const char next = at + r.size() < line.size() ? line[at + r.size()] : ' ';
        if (next == ' ' || next == '#') break;
        at = line.find(r, at + 1);
      }
      if (at != std::string::npos) roles += (roles.empty() ? "" : ",") + std::string(role);
    }
    const std::string item = roles.empty() ? tl : tl + "(" + roles + ")";
    bool seen = false;
    for (const auto& o : out) seen = seen || o == item;
    if (!seen) out.push_back(item);
  }
  std::string joined;
  for (const auto& o : out) joined += (joined.empty() ? "" : ", ") + o;
  return joined;
}

std::string endpoint_route(ucp_ep_h ep) {
  return condense_route(capture([](void* o, FILE* f) { ucp_ep_print_info(static_cast<ucp_ep_h>(o), f); }, ep));
}

std::string worker_transports(ucp_worker_h worker) {
  return condense_route(
      capture([](void* o, FILE* f) { ucp_worker_print_info(static_cast<ucp_worker_h>(o), f); }, worker));
}

}  // namespace banaserve::transfer::ucx
