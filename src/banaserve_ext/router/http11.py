# SPDX-License-Identifier: Apache-2.0
"""A lean HTTP/1.1 wire layer: incremental request and response parsers, and message builders.

Only what a router needs: ``Content-Length`` and ``chunked`` bodies, keep-alive, bodies read to
EOF for ``Connection: close`` responses. Parsers are pure (``feed(bytes)``), so they are tested
without sockets; the server and the upstream pool wrap them in asyncio protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import InvalidArgumentError, ProtocolError

#: largest request or response head accepted (request line / status line + headers)
MAX_HEAD_BYTES = 64 * 1024

REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class HttpError(InvalidArgumentError):
    """A malformed or unacceptable HTTP request; ``status`` is the answer to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    #: header names lower-cased; a repeated header keeps its last value
    headers: dict[str, str]
    body: bytes = b""
    keep_alive: bool = True


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise ProtocolError(f"malformed header line {line[:80]!r}")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    return headers


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` body decoder."""

    __slots__ = ("_buf", "_remaining", "_state", "done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._remaining = 0
        self._state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self.done = False

    def feed(self, data: bytes | bytearray, out: Callable[[bytes], None]) -> bytes:
        """Decode what ``data`` completes, passing each payload piece to ``out``; returns the
        bytes that follow the end of the body (the next message), if the body ended."""
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n:
            st = self._state
            if st == 1:
                take = min(self._remaining, n - pos)
                out(bytes(buf[pos : pos + take]))
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = 2
            elif st == 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        raise ProtocolError("chunk size line too long")
                    break
                size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
                if size < 0:
                    raise ProtocolError("negative chunk size")
                pos = eol + 2
                if size == 0:
                    self._state = 3
                else:
                    self._remaining = size
                    self._state = 1
            elif st == 2:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("missing CRLF after chunk data")
                pos += 2
                self._state = 0
            else:  # trailers until an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                empty = eol == pos
                pos = eol + 2
                if empty:
                    self.done = True
                    rest = bytes(buf[pos:])
                    buf.clear()
                    return rest
        del buf[:pos]
        return b""


class RequestParser:
    """Incremental server-side parser; ``feed`` returns the complete requests it found."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self._buf = bytearray()
        self._head: Request | None = None
        self._need = 0
        self._chunked: ChunkedDecoder | None = None
        self._parts: list[bytes] = []
        self._size = 0
        #: a request head with ``Expect: 100-continue`` arrived and its body has not: the
        #: server should answer ``100 Continue`` (then clear the flag)
        self.expect_continue = False

    def feed(self, data: bytes) -> list[Request]:
        self._buf += data
        out: list[Request] = []
        while True:
            if self._head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD_BYTES:
                        raise HttpError(400, "request head too large")
                    return out
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                self._head = self._start(head)
                if self._head is None:
                    continue
            req = self._head
            if self._chunked is not None:
                rest = self._chunked.feed(bytes(self._buf), self._take)
                self._buf.clear()
                if not self._chunked.done:
                    return out
                self._buf += rest
                req.body = b"".join(self._parts)
                self._chunked = None
            else:
                if len(self._buf) < self._need:
                    return out
                req.body = bytes(self._buf[: self._need])
                del self._buf[: self._need]
            self._head = None
            self._parts = []
            self._size = 0
            out.append(req)

    def _take(self, piece: bytes) -> None:
        self._size += len(piece)
        if self._size > self.max_body:
            raise HttpError(413, f"request body over the {self.max_body}-byte limit")
        self._parts.append(piece)

    def _start(self, head: bytes) -> Request | None:
        lines = head.split(b"\r\n")
        while lines and not lines[0]:  # tolerate stray CRLFs between requests
            lines.pop(0)
        if not lines:
            return None
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise HttpError(400, f"malformed request line {lines[0][:80]!r}")
        try:
            headers = _parse_headers(lines[1:])
        except ProtocolError as exc:
            raise HttpError(400, str(exc)) from None
        method = parts[0].decode("latin-1")
        target = parts[1].decode("latin-1")
        version = parts[2].decode("latin-1")
        path, _, query = target.partition("?")
        conn = headers.get("connection", "").lower()
        keep_alive = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
        req = Request(method, target, path, query, version, headers, b"", keep_alive)
        if headers.get("expect", "").lower() == "100-continue" and version == "HTTP/1.1":
            self.expect_continue = True
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = ChunkedDecoder()
            self._need = 0
        else:
            try:
                self._need = int(headers.get("content-length", "0"))
            except ValueError:
                raise HttpError(400, "bad Content-Length") from None
            if self._need < 0:
                raise HttpError(400, "bad Content-Length")
            if self._need > self.max_body:
                raise HttpError(413, f"request body over the {self.max_body}-byte limit")
        return req


@dataclass
class ResponseHead:
    status: int
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]] = field(default_factory=list)
    keep_alive: bool = True


class ResponseParser:
    """Incremental client-side parser for one response at a time.

    Calls ``on_head(head)`` once, ``on_body(piece)`` for each body piece as it arrives, and
    ``on_end()`` when the body is complete (for read-to-EOF bodies: call :meth:`eof`)."""

    def __init__(
        self,
        on_head: Callable[[ResponseHead], None],
        on_body: Callable[[bytes], None],
        on_end: Callable[[], None],
        head_request: bool = False,
    ) -> None:
        self.on_head = on_head
        self.on_body = on_body
        self.on_end = on_end
        self.head_request = head_request
        self._buf = bytearray()
        self._state = 0  # 0 head, 1 content-length, 2 chunked, 3 to EOF, 4 done
        self._remaining = 0
        self._chunked: ChunkedDecoder | None = None
        self.keep_alive = True

    @property
    def done(self) -> bool:
        return self._state == 4

    def feed(self, data: bytes) -> None:
        st = self._state
        if st == 1:
            take = len(data)
            if take >= self._remaining:
                if take > self._remaining:
                    raise ProtocolError("upstream sent bytes after the response body")
                self._state = 4
                self._remaining = 0
                self.on_body(data)
                self.on_end()
            else:
                self._remaining -= take
                self.on_body(data)
            return
        if st == 2:
            assert self._chunked is not None
            rest = self._chunked.feed(data, self.on_body)
            if self._chunked.done:
                if rest:
                    raise ProtocolError("upstream sent bytes after the chunked body")
                self._state = 4
                self.on_end()
            return
        if st == 3:
            self.on_body(data)
            return
        if st == 4:
            if data:
                raise ProtocolError("upstream sent bytes with no request pending")
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD_BYTES:
                raise ProtocolError("response head too large")
            return
        head = bytes(self._buf[:end])
        rest = bytes(self._buf[end + 4 :])
        self._buf.clear()
        lines = head.split(b"\r\n")
        status_parts = lines[0].split(b" ", 2)
        if len(status_parts) < 2 or not status_parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"malformed status line {lines[0][:80]!r}")
        try:
            status = int(status_parts[1])
        except ValueError:
            raise ProtocolError(f"malformed status line {lines[0][:80]!r}") from None
        raw: list[tuple[str, str]] = []
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"malformed header line {line[:80]!r}")
            k = name.decode("latin-1")
            v = value.strip().decode("latin-1")
            raw.append((k, v))
            headers[k.lower()] = v
        conn = headers.get("connection", "").lower()
        http10 = status_parts[0] == b"HTTP/1.0"
        self.keep_alive = ("keep-alive" in conn) if http10 else ("close" not in conn)
        self.on_head(ResponseHead(status, headers, raw, self.keep_alive))
        if self.head_request or status in (204, 304) or 100 <= status < 200:
            self._state = 4
            self.on_end()
            return
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = 2
            self._chunked = ChunkedDecoder()
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError:
                raise ProtocolError("bad Content-Length from upstream") from None
            self._state = 1
            if self._remaining == 0:
                self._state = 4
                self.on_end()
                if rest:
                    raise ProtocolError("upstream sent bytes after the response body")
                return
        else:
            self._state = 3
            self.keep_alive = False
        if rest:
            self.feed(rest)

    def eof(self) -> bool:
        """The connection closed; True if that completed the response."""
        if self._state == 3:
            self._state = 4
            self.on_end()
            return True
        return self._state == 4


def build_request(
    method: str, host: str, target: str, body: bytes = b"", content_type: str | None = None
) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"
    if body or method in ("POST", "PUT", "PATCH", "DELETE"):
        head += f"Content-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
    return (head + "\r\n").encode("latin-1") + body


def build_response(
    status: int,
    body: bytes,
    content_type: str = "application/json",
    keep_alive: bool = True,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    )
    if not keep_alive:
        head += "Connection: close\r\n"
    if extra:
        head += "".join(f"{k}: {v}\r\n" for k, v in extra)
    return (head + "\r\n").encode("latin-1") + body


def build_stream_head(
    status: int,
    content_type: str,
    keep_alive: bool = True,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}\r\n"
        f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
        "Cache-Control: no-cache\r\n"
    )
    if not keep_alive:
        head += "Connection: close\r\n"
    if extra:
        head += "".join(f"{k}: {v}\r\n" for k, v in extra)
    return (head + "\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
