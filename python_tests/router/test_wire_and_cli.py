# SPDX-License-Identifier: Apache-2.0
"""HTTP/1.1 parsers, circuit breaker, the command line, and the router as a process."""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from banaserve_ext.errors import InvalidArgumentError, ProtocolError
from banaserve_ext.router.breaker import CircuitBreaker, HealthTracker
from banaserve_ext.router.config import add_arguments, config_from_args, ignored_flags_used
from banaserve_ext.router.http11 import (
    ChunkedDecoder,
    HttpError,
    RequestParser,
    ResponseParser,
    chunk,
)


# -- wire ---------------------------------------------------------------------------------------
def test_chunked_decoder_at_every_split_point() -> None:
    payloads = [b"data: one\n\n", b"x" * 300, b"\xe2\x82\xac", b"last"]
    wire = b"".join(chunk(p) for p in payloads) + b"0\r\n\r\nNEXT"
    for cut in range(len(wire) + 1):
        d = ChunkedDecoder()
        out: list[bytes] = []
        rest = d.feed(wire[:cut], out.append)
        if d.done:
            rest += wire[cut:]
        else:
            rest = d.feed(wire[cut:], out.append)
        assert d.done and rest == b"NEXT" and b"".join(out) == b"".join(payloads), cut


def test_chunked_decoder_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(b"zz\r\n", lambda _: None)
    with pytest.raises(ProtocolError):
        ChunkedDecoder().feed(b"3\r\nabcXY", lambda _: None)


def test_request_parser_pipelined_chunked_and_keep_alive() -> None:
    p = RequestParser(max_body=1000)
    wire = (
        b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /v1/completions?a=1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /health HTTP/1.0\r\n\r\n"
    )
    reqs = []
    for i in range(0, len(wire), 7):  # arbitrary fragmentation
        reqs += p.feed(wire[i : i + 7])
    assert [(r.method, r.path, r.body, r.keep_alive) for r in reqs] == [
        ("POST", "/generate", b"hello", True),
        ("POST", "/v1/completions", b"abcde", True),
        ("GET", "/health", b"", False),
    ]
    assert reqs[1].query == "a=1"


def test_request_parser_limits_and_errors() -> None:
    with pytest.raises(HttpError) as e:
        RequestParser(10).feed(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n")
    assert e.value.status == 413
    with pytest.raises(HttpError) as e:
        RequestParser(10).feed(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n" + b"z" * 11
        )
    assert e.value.status == 413
    with pytest.raises(HttpError) as e:
        RequestParser(10).feed(b"NOT HTTP\r\n\r\n")
    assert e.value.status == 400
    with pytest.raises(HttpError):
        RequestParser(10).feed(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")


def test_response_parser_content_length_chunked_and_eof() -> None:
    events: list = []
    p = ResponseParser(
        lambda h: events.append(h.status), events.append, lambda: events.append("end")
    )
    p.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    p.feed(b"cd")
    assert events == [200, b"ab", b"cd", "end"] and p.done and p.keep_alive
    events.clear()
    p = ResponseParser(
        lambda h: events.append(h.status), events.append, lambda: events.append("end")
    )
    p.feed(b"HTTP/1.1 503 X\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert events == [503, b"hi", "end"]
    events.clear()
    p = ResponseParser(
        lambda h: events.append(h.status), events.append, lambda: events.append("end")
    )
    p.feed(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert not p.done and p.eof() and events == [200, b"all of it", "end"] and not p.keep_alive


# -- breaker and health -------------------------------------------------------------------------
def test_circuit_breaker_opens_half_opens_and_closes() -> None:
    b = CircuitBreaker(failure_threshold=3, success_threshold=2, timeout_s=10.0)
    for t in range(2):
        b.record(False, t)
    b.record(True, 2)  # a success resets the consecutive count
    for t in range(3, 6):
        b.record(False, t)
    assert b.state == "open" and not b.allows(10.0)
    assert b.allows(15.0) and b.state == "half_open"
    b.record(False, 15.0)
    assert b.state == "open" and not b.allows(20.0)
    assert b.allows(25.0)
    b.record(True, 25.0)
    b.record(True, 25.1)
    assert b.state == "closed" and b.allows(25.2)
    assert CircuitBreaker(enabled=False).allows(0.0)
    with pytest.raises(InvalidArgumentError):
        CircuitBreaker(failure_threshold=0)


def test_health_tracker_hysteresis() -> None:
    h = HealthTracker(failure_threshold=2, success_threshold=2)
    assert h.record(False) and not h.record(False)
    assert not h.record(True) and h.record(True)


# -- command line -------------------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_sglang_router_pd_command_line_is_accepted() -> None:
    argv = (
        "--pd-disaggregation --prefill http://127.0.0.1:31001 8998 --prefill http://127.0.0.1:31002"
        " none --decode http://127.0.0.1:31011 --decode http://127.0.0.1:31012/ --host 127.0.0.1"
        " --port 30000 --prometheus-host 127.0.0.1 --prometheus-port 29000"
        " --shutdown-grace-period-secs 2 --log-level warn --policy cache_aware"
        " --prefill-policy random --retry-max-retries 3 --cb-failure-threshold 4"
        " --health-check-interval-secs 5 --request-timeout-secs 60 --dp-aware"
        " --worker-startup-timeout-secs 30 --cache-threshold 0.5"
    ).split()
    args = _parse(argv)
    cfg = config_from_args(args)
    assert [(s.url, s.bootstrap_port) for s in cfg.prefill] == [
        ("http://127.0.0.1:31001", 8998),
        ("http://127.0.0.1:31002", None),
    ]
    assert [s.url for s in cfg.decode] == ["http://127.0.0.1:31011", "http://127.0.0.1:31012"]
    assert (cfg.policy, cfg.prefill_policy, cfg.decode_policy) == ("cache_aware", "random", None)
    assert cfg.retry_max_retries == 3 and cfg.cb_failure_threshold == 4
    assert cfg.cache_threshold == 0.5 and cfg.shutdown_grace_period_secs == 2
    assert ignored_flags_used(args) == ["--dp-aware", "--worker-startup-timeout-secs"]


def test_bad_command_lines_fail_clearly() -> None:
    with pytest.raises(InvalidArgumentError, match="bootstrap port"):
        config_from_args(_parse(["--prefill", "http://127.0.0.1:1", "eighty"]))
    with pytest.raises(InvalidArgumentError, match="URL"):
        config_from_args(_parse(["--decode", "127.0.0.1:5"]))
    with pytest.raises(InvalidArgumentError, match=r"URL \[BOOTSTRAP"):
        config_from_args(_parse(["--prefill", "http://127.0.0.1:1", "2", "3"]))
    with pytest.raises(SystemExit):
        _parse(["--policy", "bucket"])


def test_banaserve_router_subcommand_help(capsys: pytest.CaptureFixture[str]) -> None:
    from banaserve_ext.cli import main

    with pytest.raises(SystemExit) as e:
        main(["router", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--prefill" in out and "--prefill-policy" in out


# -- the router as a process --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_module_serves_and_drains_in_flight_requests_on_sigterm() -> None:
    env = dict(os.environ)
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    fake = subprocess.Popen(
        [sys.executable, "-m", "banaserve_ext.router.testing", "--max-seconds", "60",
         "--prefill", "127.0.0.1:0:0", "--decode", "127.0.0.1:0",
         "--decode-ms-per-token", "100", "--kv-wait-s", "5"],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    router = None
    try:
        assert fake.stdout is not None
        ready = fake.stdout.readline().split()
        assert ready[0] == "READY", ready
        pre = ready[2].split("=")[1]
        pport, bport = pre.split("/")
        dport = ready[3].split("=")[1]
        port = _free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "banaserve_ext.router", "--pd-disaggregation",
             "--prefill", f"http://127.0.0.1:{pport}", bport,
             "--decode", f"http://127.0.0.1:{dport}", "--host", "127.0.0.1",
             "--port", str(port), "--prometheus-port", "0", "--log-level", "warn",
             "--shutdown-grace-period-secs", "10"],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        conn = None
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/health")
                if conn.getresponse().read() == b"OK":
                    break
            except OSError:
                time.sleep(0.05)
        assert conn is not None
        body = b'{"text": "hi", "stream": true, "sampling_params": {"max_new_tokens": 5}}'
        conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        first = resp.readline()
        assert first.startswith(b"data: ")
        router.send_signal(signal.SIGTERM)  # mid-stream: the stream must still complete
        rest = resp.read()
        assert rest.count(b"data: ") == 5 and rest.endswith(b"data: [DONE]\n\n")
        assert router.wait(20) == 0
    finally:
        for p in (router, fake):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
