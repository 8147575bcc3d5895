# SPDX-License-Identifier: Apache-2.0
"""The router over real loopback HTTP against fake SGLang workers."""

from __future__ import annotations

import asyncio
import collections

import msgspec
import pytest
from router_testkit import Client, eventually, pd_setup, run

from banaserve_ext.router.http11 import build_request
from banaserve_ext.router.testing import FakeConfig

dec = msgspec.json.decode
enc = msgspec.json.encode


def test_generate_returns_the_decode_answer_byte_for_byte_and_pairs_legs() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            status, body = await s.client.post(
                "/generate", {"text": "hello " * 50, "sampling_params": {"max_new_tokens": 5}}
            )
            assert status == 200
            (p_entry,) = s.all_logs("prefill")
            (d_entry,) = s.all_logs("decode")
            # both legs got the same body, with the chosen prefill's bootstrap fields
            assert p_entry["body"] == d_entry["body"]
            assert p_entry["bootstrap_room"] == d_entry["bootstrap_room"]
            assert 0 <= d_entry["bootstrap_room"] < 2**63
            assert d_entry["bootstrap_host"] == "127.0.0.1"
            pspec = next(sp for sp in s.prefill if s.log(sp))
            assert d_entry["bootstrap_port"] == pspec.bootstrap_port
            # the router's answer is exactly what that decode worker answers for that body
            dspec = next(sp for sp in s.decode if s.log(sp))
            direct = Client(dspec.port)
            _, want = await direct.request("POST", "/generate", d_entry["body"].encode())
            direct.close()
            assert body == want and b'{ "text": ' in body  # not re-serialized

    run(main())


def test_openai_routes_stream_and_not() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
            status, body = await s.client.post("/v1/chat/completions", chat)
            assert status == 200 and dec(body)["object"] == "chat.completion"
            status, body = await s.client.post("/v1/completions", {"prompt": "x" * 10})
            assert status == 200 and dec(body)["object"] == "text_completion"
            status, body = await s.client.post("/v1/chat/completions", {**chat, "stream": True})
            events = [e for e in body.split(b"\n\n") if e]
            assert status == 200 and len(events) == 4 and events[-1] == b"data: [DONE]"
            assert dec(events[0][6:])["object"] == "chat.completion.chunk"
            # the stream flag reaches the prefill leg too, as with sglang_router
            assert any(e["stream"] is True for e in s.all_logs("prefill"))

    run(main())


async def _read_stream_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    return head


async def _read_chunk(reader: asyncio.StreamReader) -> bytes:
    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
    data = await reader.readexactly(size + 2)
    return data[:-2]


def test_stream_arrives_chunk_by_chunk_while_decode_is_still_generating() -> None:
    async def main() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=150.0)
        async with pd_setup(fake=fake) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.router.bound_port)
            body = enc({"text": "abc", "stream": True, "sampling_params": {"max_new_tokens": 6}})
            for _ in range(2):  # twice on one keep-alive connection
                writer.write(build_request("POST", "r", "/generate", body, "application/json"))
                await _read_stream_head(reader)
                first = await _read_chunk(reader)
                assert first.startswith(b"data: ") and b'"completion_tokens":1' in first
                # the decode worker has not finished: the chunk was forwarded as it came
                busy = [sp for sp in s.decode if s.fleet.worker(sp.port).inflight > 0]
                assert len(busy) == 1
                rest = []
                while True:
                    c = await _read_chunk(reader)
                    if not c:
                        break
                    rest.append(c)
                assert len(rest) == 6 and rest[-1] == b"data: [DONE]\n\n"
            writer.close()

    run(main())


def test_client_going_away_cancels_both_legs() -> None:
    async def main() -> None:
        fake = FakeConfig(kv_wait_s=5.0, decode_ms_per_token=200.0)
        async with pd_setup(fake=fake) as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.router.bound_port)
            body = enc({"text": "abc", "stream": True, "sampling_params": {"max_new_tokens": 50}})
            writer.write(build_request("POST", "r", "/generate", body, "application/json"))
            await _read_stream_head(reader)
            await _read_chunk(reader)
            writer.transport.abort()
            workers = [s.fleet.worker(sp.port) for sp in s.decode + s.prefill]
            assert await eventually(lambda: all(w.inflight == 0 for w in workers))
            assert await eventually(lambda: s.router._inflight == 0)
            loads = [w.load for w in s.router._all()]
            assert all(ld.active_requests == 0 and ld.inflight_prefill_tokens == 0 for ld in loads)
            assert sum(w.served for w in workers) == 2  # one leg each, never finished

    run(main())


def test_malformed_requests_get_400() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            c = s.client
            for path, raw in [
                ("/generate", b"{not json"),
                ("/generate", b"[1, 2]"),
                ("/generate", b'{"sampling_params": {}}'),
                ("/generate", b'{"text": 5}'),
                ("/generate", b'{"text": "a", "stream": "yes"}'),
                ("/v1/chat/completions", b'{"messages": []}'),
                ("/v1/completions", b'{"prompt": 3}'),
            ]:
                head, body = await c.request("POST", path, raw)
                assert head.status == 400, (path, raw, body)
                assert "message" in dec(body)["error"]
            assert s.all_logs("prefill") == [] and s.all_logs("decode") == []
            # a broken request line
            reader, writer = await asyncio.open_connection("127.0.0.1", s.router.bound_port)
            writer.write(b"GARBAGE\r\n\r\n")
            resp = await reader.read()
            assert resp.startswith(b"HTTP/1.1 400 ")
            writer.close()

    run(main())


def test_payload_limit_gives_413() -> None:
    async def main() -> None:
        async with pd_setup(max_payload_size=1000) as s:
            head, _ = await s.client.request("POST", "/generate", enc({"text": "x" * 2000}))
            assert head.status == 413

    run(main())


def test_unknown_route_404_and_wrong_method_405() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            assert (await s.client.get("/nope"))[0] == 404
            assert (await s.client.request("GET", "/generate"))[0].status == 405

    run(main())


def test_load_aware_spreads_a_burst_and_counters_return_to_zero() -> None:
    async def main() -> None:
        fake = FakeConfig(kv_wait_s=5.0, prefill_ms=20.0, decode_ms=20.0)
        async with pd_setup(fake=fake) as s:
            clients = [Client(s.router.bound_port) for _ in range(16)]

            async def one(c: Client, k: int) -> int:
                return (await c.post("/generate", {"text": f"{k} " + "y" * 400}))[0]

            statuses = await asyncio.gather(*(one(clients[k % 16], k) for k in range(64)))
            assert statuses == [200] * 64
            for c in clients:
                c.close()
            per_p = [len(s.log(sp)) for sp in s.prefill]
            per_d = [len(s.log(sp)) for sp in s.decode]
            assert sum(per_p) == 64 and min(per_p) >= 28, per_p
            assert sum(per_d) == 64 and min(per_d) >= 28, per_d
            loads = [w.load for w in s.router._all()]
            assert all(ld.active_requests == 0 and ld.inflight_prefill_tokens == 0 for ld in loads)

    run(main())


def test_worker_killed_under_load_leaves_no_half_dispatched_request() -> None:
    async def main() -> None:
        fake = FakeConfig(kv_wait_s=1.0, prefill_ms=5.0, decode_ms=5.0)
        async with pd_setup(fake=fake, retry_initial_backoff_ms=5.0) as s:
            clients = [Client(s.router.bound_port) for _ in range(8)]
            victim = s.prefill[0].port
            results: list[int] = []

            async def worker(c: Client, n: int) -> None:
                for k in range(n):
                    results.append((await c.post("/generate", {"text": f"{k} zz"}))[0])

            killed_with_inflight = False

            async def killer() -> None:
                nonlocal killed_with_inflight
                vw = s.fleet.worker(victim)
                await eventually(lambda: len(results) >= 40 and vw.inflight > 0)
                killed_with_inflight = vw.inflight > 0
                s.fleet.kill(victim)

            await asyncio.gather(killer(), *(worker(c, 25) for c in clients))
            for c in clients:
                c.close()
            assert results == [200] * 200
            # every decode leg's prefill leg was sent (the victim's log survives its death) ...
            prefill_rooms = {e["bootstrap_room"] for sp in s.prefill for e in s.log(sp)}
            decode_rooms = [e["bootstrap_room"] for sp in s.decode for e in s.log(sp)]
            assert all(r in prefill_rooms for r in decode_rooms)
            # ... and none was left waiting for KV that never came: the router aborted them
            assert [s.fleet.worker(sp.port).kv_timeouts for sp in s.decode] == [0, 0]
            assert all(s.fleet.worker(sp.port).inflight == 0 for sp in s.decode)
            assert all(w.load.active_requests == 0 for w in s.router._all())
            assert killed_with_inflight

    run(main())


def test_retry_repicks_after_decode_5xx_and_breaker_opens() -> None:
    async def main() -> None:
        async with pd_setup(
            cb_failure_threshold=2, cb_timeout_duration_secs=300, retry_initial_backoff_ms=1
        ) as s:
            from banaserve_ext.router.testing import _Failure

            bad = s.decode[0].port
            s.fleet.worker(bad).failure = _Failure(503, 1000)
            statuses = [(await s.client.post("/generate", {"text": f"q{k}"}))[0] for k in range(30)]
            assert statuses == [200] * 30
            w = next(w for w in s.router.decode if w.url.endswith(f":{bad}"))
            assert w.breaker.state == "open"
            assert len(s.log(s.decode[0])) == 2  # exactly the failures that opened the breaker
            status, body = await s.client.get("/metrics")
            assert b"banaserve_router_retries_total" in body

    run(main())


def test_no_usable_worker_gives_503_with_a_reason_and_nothing_is_sent() -> None:
    async def main() -> None:
        async with pd_setup(n_prefill=1) as s:
            url = s.prefill[0].url
            status, _ = await s.client.request("DELETE", f"/workers?url={url}")
            assert status.status == 200
            status, body = await s.client.post("/generate", {"text": "x"})
            assert status == 503 and b"no prefill worker" in body
            assert s.all_logs("decode") == []

    run(main())


def test_workers_list_add_remove_at_run_time() -> None:
    async def main() -> None:
        async with pd_setup(n_prefill=1, n_decode=1) as s:
            status, body = await s.client.get("/workers")
            assert status == 200 and dec(body)["total"] == 2
            # start a second decode worker and register it (smg's body)
            from banaserve_ext.router.testing import FakeSpec

            spec = FakeSpec("127.0.0.1", 0, "decode")
            extra = await s.fleet.add(spec)
            url = spec.url
            st, body = await s.client.post("/workers", {"url": url, "worker_type": "decode"})
            assert st == 202 and dec(body)["status"] == "accepted"
            wid = dec(body)["worker_id"]
            assert dec(body)["location"] == f"/workers/{wid}"
            st, body = await s.client.post("/workers", {"url": url, "worker_type": "decode"})
            assert st == 409 and dec(body)["code"] == "WORKER_ALREADY_EXISTS"
            st, _ = await s.client.post("/workers", {"url": "ftp://x", "worker_type": "decode"})
            assert st == 400
            for k in range(20):
                assert (await s.client.post("/generate", {"text": f"{k}"}))[0] == 200
            assert len(extra.log) > 0
            # nothing in flight: the worker is gone when DELETE answers
            head, body = await s.client.request("DELETE", "/workers/" + url.replace("/", "%2F"))
            assert head.status == 200 and dec(body)["status"] == "removed"
            assert (await s.client.get(f"/workers/{wid}"))[0] == 404
            n = len(extra.log)
            for k in range(10):
                assert (await s.client.post("/generate", {"text": f"{k}"}))[0] == 200
            assert len(extra.log) == n
            head, _ = await s.client.request("DELETE", "/workers?url=" + url)
            assert head.status == 404

    run(main())


def test_control_plane_endpoints() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            c = s.client
            assert (await c.get("/health"))[0] == 200
            assert (await c.get("/health_generate"))[0] == 200
            assert (await c.get("/readiness"))[0] == 200
            st, body = await c.get("/v1/models")
            assert st == 200 and dec(body)["data"][0]["id"] == "fake-model"
            st, body = await c.get("/get_server_info")
            assert st == 200 and dec(body)["port"] == s.prefill[0].port  # first prefill
            assert (await c.get("/get_model_info"))[0] == 200
            st, body = await c.get("/get_loads")
            assert st == 200 and len(dec(body)["workers"]) == 4
            st, body = await c.post("/flush_cache", {})
            assert st == 200 and dec(body)["workers"] == 4
            await c.post("/generate", {"text": "x"})
            assert s.router.bound_metrics_port is not None
            mc = Client(s.router.bound_metrics_port)
            st, body = await mc.get("/metrics")
            mc.close()
            assert st == 200
            assert b'banaserve_router_requests_total{route="/generate",status="200"} 1' in body
            assert b"banaserve_router_worker_selection_total" in body

    run(main())


def test_logprobs_are_merged_from_both_legs() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            req = {
                "text": "abcd" * 3,
                "return_logprob": True,
                "sampling_params": {"max_new_tokens": 2},
            }
            st, body = await s.client.post("/generate", req)
            meta = dec(body)["meta_info"]
            assert st == 200 and len(meta["input_token_logprobs"]) == 3  # 12 chars / 4
            assert len(meta["output_token_logprobs"]) == 2
            st, body = await s.client.post("/generate", {**req, "stream": True})
            events = [dec(e[6:]) for e in body.split(b"\n\n") if e and e != b"data: [DONE]"]
            assert st == 200 and len(events) == 2
            assert all(len(e["meta_info"]["input_token_logprobs"]) == 3 for e in events)

    run(main())


def test_batches_get_one_bootstrap_room_per_item() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            st, _ = await s.client.post("/generate", {"text": ["a", "b", "c"]})
            assert st == 200
            (d,) = s.all_logs("decode")
            assert len(d["bootstrap_room"]) == 3 and len(set(d["bootstrap_room"])) == 3
            assert len(d["bootstrap_port"]) == 3

    run(main())


def test_request_timeout_gives_504_and_frees_the_legs() -> None:
    async def main() -> None:
        fake = FakeConfig(kv_wait_s=10.0, decode_ms=3000.0)
        async with pd_setup(fake=fake, request_timeout_secs=0.3) as s:
            st, body = await s.client.post("/generate", {"text": "x"})
            assert st == 504 and b"timed out" in body
            assert await eventually(
                lambda: all(w.load.active_requests == 0 for w in s.router._all())
            )

    run(main())


def test_prefill_4xx_is_returned_as_is_without_retry() -> None:
    async def main() -> None:
        from banaserve_ext.router.testing import _Failure

        async with pd_setup(n_prefill=1) as s:
            s.fleet.worker(s.prefill[0].port).failure = _Failure(422, 1)
            st, body = await s.client.post("/generate", {"text": "x"})
            assert st == 422 and b"injected failure" in body
            assert len(s.log(s.prefill[0])) == 1
            st, _ = await s.client.post("/generate", {"text": "x"})
            assert st == 200

    run(main())


def test_policies_selectable_per_side() -> None:
    async def main() -> None:
        async with pd_setup(prefill_policy="cache_aware", decode_policy="round_robin") as s:
            prefixes = ["A" * 400, "B" * 400]
            for k in range(20):
                st, _ = await s.client.post("/generate", {"text": prefixes[k % 2] + str(k)})
                assert st == 200
            owner = collections.defaultdict(set)
            for sp in s.prefill:
                for e in s.log(sp):
                    owner[dec(e["body"])["text"][0]].add(sp.port)
            assert all(len(v) == 1 for v in owner.values())
            assert [len(s.log(sp)) for sp in s.decode] == [10, 10]

    run(main())


def test_health_checks_take_a_dead_worker_out_and_polls_reach_the_policy() -> None:
    async def main() -> None:
        async with pd_setup(
            health_check_interval_secs=0.05,
            health_failure_threshold=2,
            health_check_timeout_secs=1.0,
            load_monitor_interval=0.05,
        ) as s:
            victim = s.decode[1]
            s.fleet.worker(victim.port).static_load = {"num_tokens": 777, "num_waiting_reqs": 3}
            rw = next(w for w in s.router.decode if w.url == victim.url)
            assert await eventually(lambda: rw.load.polled_load == 777.0)
            assert rw.load.queued_requests == 3
            s.fleet.kill(victim.port)
            assert await eventually(lambda: not rw.health.healthy)
            for k in range(20):
                assert (await s.client.post("/generate", {"text": f"{k}"}))[0] == 200
            st, body = await s.client.get("/workers")
            states = {w["url"]: w["is_healthy"] for w in dec(body)["workers"]}
            assert states[victim.url] is False

    run(main())


def test_expect_100_continue_is_answered() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            reader, writer = await asyncio.open_connection("127.0.0.1", s.router.bound_port)
            body = enc({"text": "x" * 3000})
            writer.write(
                b"POST /generate HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
                b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
            )
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            writer.close()

    run(main())


def test_decode_worker_near_full_kv_is_avoided() -> None:
    async def main() -> None:
        async with pd_setup(load_monitor_interval=0.05) as s:
            full = s.decode[0]
            s.fleet.worker(full.port).static_load = {"num_tokens": 90_000, "num_waiting_reqs": 0}
            rw = next(w for w in s.router.decode if w.url == full.url)
            assert await eventually(lambda: rw.load.kv_used_tokens == 90_000)
            assert rw.load.kv_capacity_tokens == 100_000  # from /get_server_info
            for k in range(20):
                assert (await s.client.post("/generate", {"text": f"{k}"}))[0] == 200
            assert len(s.log(full)) == 0 and len(s.log(s.decode[1])) == 20

    run(main())


def test_streaming_request_whose_prefill_fails_is_not_left_waiting() -> None:
    async def main() -> None:
        from banaserve_ext.router.testing import _Failure

        # decode legs wait up to 5 s for their prefill; a failed prefill must end them at once
        async with pd_setup(n_prefill=1, request_timeout_secs=3.0) as s:
            s.fleet.worker(s.prefill[0].port).failure = _Failure(422, 1)
            st, body = await s.client.post("/generate", {"text": "x", "stream": True}, timeout=10)
            assert st == 422 and b"injected failure" in body
            s.fleet.worker(s.prefill[0].port).failure = _Failure(503, 1)
            st, body = await s.client.post("/generate", {"text": "y", "stream": True}, timeout=10)
            assert st == 200 and body.endswith(b"data: [DONE]\n\n")  # retried on a new pair
            workers = [s.fleet.worker(sp.port) for sp in s.decode]
            assert await eventually(lambda: all(w.inflight == 0 for w in workers), 1.0)

    run(main())


@pytest.mark.parametrize(
    "extra", [{}, {"stream": True, "return_logprob": True}], ids=["whole", "stream-logprobs"]
)
def test_request_whose_decode_dies_does_not_wait_for_its_prefill(extra: dict) -> None:
    """A decode server dying under a PD request the router answers after the prefill leg (whole,
    or streamed with input log-probs to merge): the prefill leg would wait for the gone decode
    (SGLang: until its bootstrap timeout; here a prefill that never ends), so the router must
    answer 502 naming the decode at once and close the prefill leg."""

    async def main() -> None:
        from banaserve_ext.router.testing import _Failure

        fake = FakeConfig(kv_wait_s=5.0, prefill_ms=600_000.0)
        async with pd_setup(n_prefill=1, n_decode=1, fake=fake, disable_retries=True) as s:
            s.fleet.worker(s.decode[0].port).failure = _Failure(0, 1)  # drops the connection
            st, body = await s.client.post("/generate", {"text": "x", **extra}, timeout=60)
            assert st == 502 and s.decode[0].url.encode() in body, (st, body)
            prefill = s.fleet.worker(s.prefill[0].port)
            assert await eventually(lambda: prefill.inflight == 0, 5.0)

    run(main())
