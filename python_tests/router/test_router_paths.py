# SPDX-License-Identifier: Apache-2.0
"""One request path for both modes, over real loopback sockets: a failed attempt is retried on
another worker (never the one that just failed, while another is usable), retries are counted,
and a client that goes away ends every leg."""

from __future__ import annotations

import asyncio

import msgspec
from router_testkit import eventually, pd_setup, run, single_setup

from banaserve_ext.router.http11 import build_request
from banaserve_ext.router.testing import FakeConfig, _Failure

dec = msgspec.json.decode
enc = msgspec.json.encode


def _retries(s) -> tuple[float, float]:
    m = s.router.metrics
    return m.value("retries_total"), m.value("retries_exhausted_total")


def test_single_worker_body_is_forwarded_untouched_and_streams() -> None:
    async def main() -> None:
        async with single_setup() as s:
            raw = b'{"text": "hello",  "sampling_params": {"max_new_tokens": 3}}'
            head, body = await s.client.request("POST", "/generate", raw)
            assert head.status == 200 and dec(body)["meta_info"]["completion_tokens"] == 3
            (entry,) = [e for sp in s.regular for e in s.log(sp)]
            assert entry["body"] == raw.decode() and entry["bootstrap_room"] is None
            req = {"prompt": "x", "stream": True, "max_tokens": 4}
            st, body = await s.client.post("/v1/completions", req)
            events = [e for e in body.split(b"\n\n") if e]
            assert st == 200 and len(events) == 5 and events[-1] == b"data: [DONE]"

    run(main())


def test_single_worker_retry_repicks_away_from_the_failed_worker() -> None:
    async def main() -> None:
        # one retry and no breaker: only steering away from the failed worker can save a request
        async with single_setup(
            retry_max_retries=1, disable_circuit_breaker=True, retry_initial_backoff_ms=1
        ) as s:
            bad, good = s.regular
            s.fleet.worker(bad.port).failure = _Failure(503, 10**6)
            statuses = [(await s.client.post("/generate", {"text": f"q{k}"}))[0] for k in range(40)]
            assert statuses == [200] * 40
            failed = len(s.log(bad))
            assert failed > 0  # the policy did pick the bad worker (then the retry avoided it)
            assert len(s.log(good)) == 40
            assert _retries(s) == (failed, 0)
            assert all(w.load.active_requests == 0 for w in s.router._all())

    run(main())


def test_single_worker_retries_a_dropped_connection_and_a_dead_worker() -> None:
    async def main() -> None:
        async with single_setup(retry_initial_backoff_ms=1, cb_failure_threshold=1000) as s:
            bad, good = s.regular
            s.fleet.worker(bad.port).failure = _Failure(0, 10**6)  # drop the connection
            for k in range(10):
                assert (await s.client.post("/generate", {"text": f"a{k}"}))[0] == 200
            dropped = len(s.log(bad))
            s.fleet.kill(bad.port)
            for k in range(10):
                assert (await s.client.post("/generate", {"text": f"b{k}"}))[0] == 200
            assert len(s.log(good)) == 20
            retries, exhausted = _retries(s)
            assert retries >= dropped > 0 and exhausted == 0

    run(main())


def test_single_worker_gives_up_after_the_configured_retries() -> None:
    async def main() -> None:
        async with single_setup(
            retry_max_retries=2, retry_initial_backoff_ms=1, disable_circuit_breaker=True
        ) as s:
            for sp in s.regular:
                s.fleet.worker(sp.port).failure = _Failure(503, 10**6)
            st, body = await s.client.post("/generate", {"text": "x"})
            assert st == 503 and b"injected failure" in body
            # 3 attempts, alternating: the second avoids the first's worker, the third may not
            assert sum(len(s.log(sp)) for sp in s.regular) == 3
            assert all(len(s.log(sp)) >= 1 for sp in s.regular)
            assert _retries(s) == (2, 1)
            # a 4xx is the client's fault: answered as is, not retried
            s.fleet.worker(s.regular[0].port).failure = _Failure(422, 10**6)
            s.fleet.worker(s.regular[1].port).failure = _Failure(422, 10**6)
            st, _ = await s.client.post("/generate", {"text": "y"})
            assert st == 422 and _retries(s) == (2, 1)

    run(main())


def test_single_worker_client_going_away_cancels_the_leg() -> None:
    async def main() -> None:
        async with single_setup(fake=FakeConfig(decode_ms_per_token=200.0)) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.router.bound_port)
            body = enc({"text": "abc", "stream": True, "sampling_params": {"max_new_tokens": 50}})
            writer.write(build_request("POST", "r", "/generate", body, "application/json"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head
            writer.transport.abort()
            workers = [s.fleet.worker(sp.port) for sp in s.regular]
            assert await eventually(lambda: all(w.inflight == 0 for w in workers))
            assert await eventually(lambda: s.router._inflight == 0)
            assert all(w.load.active_requests == 0 for w in s.router._all())
            assert sum(w.served for w in workers) == 1

    run(main())


def test_pd_retry_repicks_away_from_a_failing_prefill_and_decode() -> None:
    async def main() -> None:
        async with pd_setup(
            retry_max_retries=1, disable_circuit_breaker=True, retry_initial_backoff_ms=1
        ) as s:
            bad_p = s.prefill[0]
            s.fleet.worker(bad_p.port).failure = _Failure(503, 10**6)
            statuses = [(await s.client.post("/generate", {"text": f"p{k}"}))[0] for k in range(30)]
            assert statuses == [200] * 30
            failed_p = len(s.log(bad_p))
            assert failed_p > 0 and len(s.log(s.prefill[1])) == 30
            assert _retries(s) == (failed_p, 0)
            # decode side: the retry pairs a new room with another decode worker
            s.fleet.worker(bad_p.port).failure = None
            bad_d = s.decode[0]
            before = len(s.log(bad_d))
            s.fleet.worker(bad_d.port).failure = _Failure(503, 10**6)
            statuses = [(await s.client.post("/generate", {"text": f"d{k}"}))[0] for k in range(30)]
            assert statuses == [200] * 30
            failed_d = len(s.log(bad_d)) - before
            assert failed_d > 0 and _retries(s) == (failed_p + failed_d, 0)
            # every room a healthy decode worker served was prefilled: no half-dispatch
            rooms = {e["bootstrap_room"] for sp in s.prefill for e in s.log(sp)}
            assert all(e["bootstrap_room"] in rooms for e in s.log(s.decode[1]))
            assert all(w.load.active_requests == 0 for w in s.router._all())

    run(main())


def test_pd_stream_retries_before_the_first_byte_only() -> None:
    async def main() -> None:
        async with pd_setup(n_decode=1, retry_initial_backoff_ms=1) as s:
            w = s.fleet.worker(s.decode[0].port)
            w.failure = _Failure(503, 1)  # the first attempt fails before any byte: retried
            req = {"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 3}}
            st, body = await s.client.post("/generate", req)
            assert st == 200 and body.endswith(b"data: [DONE]\n\n")
            assert len(w.log) == 2 and _retries(s) == (1, 0)

    run(main())
