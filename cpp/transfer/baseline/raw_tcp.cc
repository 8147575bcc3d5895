// SPDX-License-Identifier: Apache-2.0
#include "raw_tcp.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include "banaserve/transfer/completion.h"

namespace banaserve::transfer::baseline {
namespace {

bool send_all(int fd, const uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

bool recv_all(int fd, uint8_t* p, size_t n) {
  while (n > 0) {
    ssize_t k = recv(fd, p, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

void set_nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace

StatusOr<std::vector<double>> tcp_round_trips_us(uint64_t nbytes, int iterations) {
  if (iterations <= 0) return BANASERVE_INVALID("iterations must be > 0");
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  if (lfd < 0) return BANASERVE_ERRNO(StatusCode::kInternal, "socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof(addr);
  if (bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || listen(lfd, 1) != 0 ||
      getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &alen) != 0) {
    Status st = BANASERVE_ERRNO(StatusCode::kInternal, "bind/listen");
    close(lfd);
    return st;
  }
  // The echo side runs in a forked child. Everything it needs is allocated before fork(), and
  // it only calls async-signal-safe functions, so forking a multi-threaded host is safe.
  std::vector<uint8_t> child_buf(nbytes);
  const pid_t child = fork();
  if (child < 0) {
    Status st = BANASERVE_ERRNO(StatusCode::kInternal, "fork");
    close(lfd);
    return st;
  }
  if (child == 0) {
    int cfd = accept(lfd, nullptr, nullptr);
    if (cfd >= 0) {
      set_nodelay(cfd);
      uint8_t ack[8] = {0};
      for (int i = 0; i < iterations; ++i) {
        if (!recv_all(cfd, child_buf.data(), child_buf.size()) || !send_all(cfd, ack, sizeof(ack))) break;
      }
    }
    _exit(0);
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  std::vector<double> out;
  Status st;
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    st = BANASERVE_ERRNO(StatusCode::kInternal, "connect");
  } else {
    set_nodelay(fd);
    std::vector<uint8_t> buf(nbytes, 0x5a);
    uint8_t ack[8];
    out.reserve(iterations);
    for (int i = 0; i < iterations; ++i) {
      const uint64_t t0 = now_ns();
      if (!send_all(fd, buf.data(), buf.size()) || !recv_all(fd, ack, sizeof(ack))) {
        st = BANASERVE_STATUS(StatusCode::kInternal, "loopback round trip broke off");
        break;
      }
      out.push_back(static_cast<double>(now_ns() - t0) / 1000.0);
    }
  }
  if (fd >= 0) close(fd);
  close(lfd);
  int wstatus = 0;
  waitpid(child, &wstatus, 0);
  if (!st.ok()) return st;
  return out;
}

}  // namespace banaserve::transfer::baseline
