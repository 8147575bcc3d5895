# SPDX-License-Identifier: Apache-2.0
"""The control plane in smg 1.13's shapes, and worker removal by draining (what a live P/D
role flip does: take a worker out, let its requests finish, register it again in another
role), over real loopback sockets."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
from router_testkit import Client, eventually, pd_setup, run, single_setup

from banaserve_ext.router.http11 import build_request
from banaserve_ext.router.testing import FakeConfig, FakeSpec

dec = msgspec.json.decode

SMG_ENTRY_FIELDS = {"id", "model_id", "url", "worker_type", "is_healthy", "status", "load"}


def test_workers_answer_in_smg_shape() -> None:
    async def main() -> None:
        async with pd_setup() as s:
            c = s.client
            # the model id is learned from each worker's /v1/models in the background
            ids: dict[str, str] = {}

            async def listing() -> dict:
                return dec((await c.get("/workers"))[1])

            for _ in range(200):
                body = await listing()
                if all(w["model_id"] == "fake-model" for w in body["workers"]):
                    break
                await asyncio.sleep(0.01)
            assert body["total"] == 4
            assert body["stats"] == {"prefill_count": 2, "decode_count": 2, "regular_count": 0}
            for w in body["workers"]:
                assert SMG_ENTRY_FIELDS | {"labels"} <= set(w), w
                assert str(uuid.UUID(w["id"])) == w["id"]
                assert w["model_id"] == "fake-model"
                assert w["is_healthy"] is True and w["status"] == "ready"
                assert w["load"] == 0 and w["labels"] == {}
                assert w["worker_type"] in ("prefill", "decode")
                ids[w["url"]] = w["id"]
                st, one = await c.get(f"/workers/{w['id']}")
                assert st == 200 and dec(one)["id"] == w["id"] and dec(one)["url"] == w["url"]
            p = next(w for w in body["workers"] if w["worker_type"] == "prefill")
            assert p["bootstrap_port"] in {sp.bootstrap_port for sp in s.prefill}
            # by URL too (percent-encoded), and a filter by model
            url = s.decode[0].url
            st, one = await c.get("/workers/" + url.replace(":", "%3A").replace("/", "%2F"))
            assert st == 200 and dec(one)["id"] == ids[url]
            assert dec((await c.get("/workers?model=other"))[1])["total"] == 0
            st, err = await c.get(f"/workers/{uuid.uuid4()}")
            assert st == 404 and dec(err)["code"] == "WORKER_NOT_FOUND"

    run(main())


def test_post_workers_accepts_smg_body_and_rejects_what_cannot_work() -> None:
    async def main() -> None:
        async with pd_setup(n_prefill=1, n_decode=1) as s:
            c = s.client
            spec = FakeSpec("127.0.0.1", 0, "prefill", 0)
            await s.fleet.add(spec)
            body = {
                "url": spec.url,
                "worker_type": "prefill",
                "bootstrap_port": spec.bootstrap_port,
                "labels": {"zone": "a"},
                "model_id": "m1",
                "priority": 7,
                "cost": 2.0,
                "runtime": "sglang",
                "api_key": "ignored",
                "health": {"timeout_secs": 5},
            }
            head, raw = await c.request("POST", "/workers", msgspec.json.encode(body))
            out = dec(raw)
            assert head.status == 202 and out["status"] == "accepted"
            assert head.headers["location"] == out["location"] == f"/workers/{out['worker_id']}"
            entry = dec((await c.get(out["location"]))[1])
            assert entry["labels"] == {"zone": "a"} and entry["model_id"] == "m1"
            assert entry["priority"] == 7 and entry["cost"] == 2.0
            assert entry["bootstrap_port"] == spec.bootstrap_port
            # it is routable at once
            for k in range(10):
                assert (await c.post("/generate", {"text": f"{k}"}))[0] == 200
            assert s.log(spec)
            bad = [
                {"url": spec.url, "worker_type": "regular"},  # not in a PD router
                {"url": spec.url, "worker_type": "encode"},
                {"url": spec.url, "worker_type": "decode", "connection_mode": "grpc"},
                {"url": spec.url, "worker_type": "decode", "labels": {"a": 1}},
                {"url": spec.url, "worker_type": "prefill", "bootstrap_port": "x"},
                {"worker_type": "decode"},
            ]
            for b in bad:
                st, err = await c.post("/workers", b)
                assert st == 400 and dec(err)["code"] == "BAD_REQUEST", (b, err)
            # sglang-router's query-string form still works
            head, raw = await c.request("POST", f"/add_worker?url={spec.url}&worker_type=decode")
            assert head.status == 200 and dec(raw)["worker"]["worker_type"] == "decode"

    run(main())


def test_get_loads_health_and_readiness_in_smg_shape() -> None:
    async def main() -> None:
        async with pd_setup(n_prefill=1, n_decode=1) as s:
            c = s.client
            s.fleet.worker(s.decode[0].port).static_load = {"num_tokens": 777}
            st, body = await c.get("/get_loads")
            loads = {e["worker"]: e for e in dec(body)["workers"]}
            assert st == 200 and set(loads) == {s.prefill[0].url, s.decode[0].url}
            assert loads[s.decode[0].url]["load"] == 777
            assert loads[s.prefill[0].url]["load"] == 0
            assert all(e["in_flight_requests"] == 0 and "details" in e for e in loads.values())
            st, body = await c.get("/health")
            assert (st, body) == (200, b"OK")
            st, body = await c.get("/readiness")
            ready = dec(body)
            assert st == 200 and ready["status"] == "ready"
            assert ready["healthy_workers"] == ready["total_workers"] == 2
            head, _ = await c.request("DELETE", f"/workers?url={s.decode[0].url}")
            assert head.status == 200
            st, body = await c.get("/readiness")
            assert st == 503 and dec(body)["reason"] == "insufficient healthy workers"
            s.fleet.kill(s.decode[0].port)
            st, body = await c.get("/get_loads")
            (entry,) = dec(body)["workers"]
            assert entry["worker"] == s.prefill[0].url

    run(main())


def test_removed_worker_finishes_its_requests_and_comes_back_in_another_role() -> None:
    async def main() -> None:
        async with pd_setup(fake=FakeConfig(kv_wait_s=30.0)) as s:
            c = s.client
            c2, c3 = Client(s.router.bound_port), Client(s.router.bound_port)
            gates = {sp.port: asyncio.Event() for sp in s.prefill}
            for sp in s.prefill:
                s.fleet.worker(sp.port).gate = gates[sp.port]
            held = asyncio.ensure_future(c2.post("/generate", {"text": "h"}))
            fakes = [s.fleet.worker(sp.port) for sp in s.prefill]
            assert await eventually(lambda: sum(f.inflight for f in fakes) == 1)
            victim = next(sp for sp in s.prefill if s.fleet.worker(sp.port).inflight == 1)
            other = next(sp for sp in s.prefill if sp is not victim)
            gates[other.port].set()
            s.fleet.worker(other.port).gate = None
            entry = next(w for w in dec((await c.get("/workers"))[1])["workers"]
                         if w["url"] == victim.url)  # fmt: skip
            assert entry["load"] == 1 and entry["active_requests"] == 1
            # take it out of rotation: it drains, the held request keeps going
            head, raw = await c.request("DELETE", f"/workers/{entry['id']}")
            out = dec(raw)
            assert head.status == 202 and out["status"] == "accepted"
            assert out["workers"][0]["status"] == "draining" and out["workers"][0]["load"] == 1
            st, raw = await c.get(f"/workers/{entry['id']}")
            assert st == 200 and dec(raw)["status"] == "draining"
            n = len(s.log(victim))
            for k in range(10):
                assert (await c.post("/generate", {"text": f"n{k}"}))[0] == 200
            assert len(s.log(victim)) == n  # no new work while draining
            assert not held.done()
            # flip the fake to decode (as the live controller flips the SGLang server), re-add
            s.fleet.worker(victim.port).spec.role = "decode"
            st, raw = await c.post("/workers", {"url": victim.url, "worker_type": "decode"})
            assert st == 202
            new_id = dec(raw)["worker_id"]
            assert new_id != entry["id"]
            # the old registration still drains: a bounded wait runs out while it is held ...
            head, raw = await c.request("DELETE", f"/workers/{entry['id']}?wait_s=0.05")
            assert head.status == 202 and dec(raw)["workers"][0]["load"] == 1
            # ... and a longer one returns once the request is done
            delete = asyncio.ensure_future(
                c3.request("DELETE", f"/workers/{entry['id']}?wait_s=20")
            )
            busy = lambda: sum(cn.task is not None for cn in s.router._conns)  # noqa: E731
            assert await eventually(lambda: busy() == 2)  # the held request and the DELETE
            gates[victim.port].set()
            status, body = await held
            assert status == 200
            head, raw = await delete
            assert head.status == 200 and dec(raw)["status"] == "removed"
            assert (await c.get(f"/workers/{entry['id']}"))[0] == 404
            # the same URL now serves decode legs
            decode_urls = {w.url for w in s.router.decode}
            assert victim.url in decode_urls and victim.url not in {w.url for w in s.router.prefill}
            before = len(s.log(victim))
            for k in range(30):
                assert (await c.post("/generate", {"text": f"d{k}"}))[0] == 200
            served = [e for e in s.log(victim)[before:]]
            assert served and all(e["bootstrap_port"] == other.bootstrap_port for e in served)
            assert all(w.load.active_requests == 0 for w in s.router._all())
            c2.close()
            c3.close()

    run(main())


def test_single_worker_mode_workers_are_regular() -> None:
    async def main() -> None:
        async with single_setup() as s:
            body = dec((await s.client.get("/workers"))[1])
            assert body["stats"] == {"prefill_count": 0, "decode_count": 0, "regular_count": 2}
            assert {w["worker_type"] for w in body["workers"]} == {"regular"}
            spec = FakeSpec("127.0.0.1", 0, "regular")
            await s.fleet.add(spec)
            st, _ = await s.client.post("/workers", {"url": spec.url, "worker_type": "decode"})
            assert st == 400
            st, _ = await s.client.post("/workers", {"url": spec.url})
            assert st == 202
            assert (await s.client.get("/readiness"))[0] == 200
            # the same from Python (what an in-process controller calls)
            (gone,) = s.router.remove_worker(spec.url)
            assert gone.draining and gone not in s.router.colocated
            assert dec((await s.client.get("/workers"))[1])["total"] == 2

    run(main())


def test_a_stream_in_flight_on_a_removed_worker_runs_to_the_end() -> None:
    async def main() -> None:
        async with single_setup(fake=FakeConfig(decode_ms_per_token=50.0)) as s:
            c = s.client
            reader, writer = await asyncio.open_connection("127.0.0.1", s.router.bound_port)
            body = msgspec.json.encode(
                {"text": "s", "stream": True, "sampling_params": {"max_new_tokens": 30}}
            )
            writer.write(build_request("POST", "r", "/generate", body, "application/json"))
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            busy = next(sp for sp in s.regular if s.fleet.worker(sp.port).inflight == 1)
            entry = dec((await c.get("/workers/" + busy.url))[1])
            hd, raw = await c.request("DELETE", f"/workers/{entry['id']}")
            assert hd.status in (200, 202)
            n = len(s.log(busy))
            for k in range(5):
                req = {"text": f"{k}", "sampling_params": {"max_new_tokens": 1}}
                assert (await c.post("/generate", req))[0] == 200
            assert len(s.log(busy)) == n
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = (await reader.readexactly(size + 2))[:-2]
                if not data:
                    break
                chunks.append(data)
            events = [e for e in b"".join(chunks).split(b"\n\n") if e]
            assert len(events) == 31 and events[-1] == b"data: [DONE]"
            writer.close()
            assert await eventually(
                lambda: all(w.id != entry["id"] for w in s.router.registry.all())
            )
            assert (await c.get(f"/workers/{entry['id']}"))[0] == 404

    run(main())


def test_live_controllers_router_client_drains_and_re_adds() -> None:
    """The live controller's client of this router (banaserve_ext.live.clients.RouterClient):
    202 answers are successes, and a draining worker no longer counts as the instance's role."""
    from banaserve_ext.live.clients import RouterClient

    async def main() -> None:
        async with pd_setup(fake=FakeConfig(kv_wait_s=30.0)) as s:
            rc = RouterClient(f"http://127.0.0.1:{s.router.bound_port}")
            c2 = Client(s.router.bound_port)
            victim = s.prefill[0]
            for sp in s.prefill:  # hold one request on the victim
                s.fleet.worker(sp.port).gate = asyncio.Event()
            held = asyncio.ensure_future(c2.post("/generate", {"text": "h"}))
            fakes = {sp.port: s.fleet.worker(sp.port) for sp in s.prefill}
            assert await eventually(lambda: sum(f.inflight for f in fakes.values()) == 1)
            victim = next(sp for sp in s.prefill if fakes[sp.port].inflight == 1)
            for sp in s.prefill:
                if sp is not victim:
                    fakes[sp.port].gate.set()
            await asyncio.to_thread(rc.remove, victim.url, "prefill")  # 202: still draining
            listed = await asyncio.to_thread(rc.workers)
            assert victim.url not in {w["url"] for w in listed}
            out = await asyncio.to_thread(rc.add, victim.url, "decode")  # 202: routable
            assert out["worker"]["worker_type"] == "decode"
            listed = await asyncio.to_thread(rc.workers)
            assert {w["worker_type"] for w in listed if w["url"] == victim.url} == {"decode"}
            fakes[victim.port].gate.set()
            assert (await held)[0] == 200
            c2.close()

    run(main())
