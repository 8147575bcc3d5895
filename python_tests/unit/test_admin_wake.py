# SPDX-License-Identifier: Apache-2.0
"""The admin channel wakes a scheduler that sleeps when idle (``--sleep-on-idle``): a queued
job makes the listener's pipe readable in the sleeper's ZMQ poll, and draining the jobs clears
it. Real listener, real Unix socket, a real ``zmq.Poller``; the scheduler is a stand-in (the
real one runs in python_tests/sglang, whose CPU servers all sleep on idle)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from banaserve_ext.adapters.sglang import admin
from banaserve_ext.launch.servers import free_port

zmq = pytest.importorskip("zmq")


def test_a_queued_job_wakes_the_idle_poll_and_draining_clears_it() -> None:
    listener = admin.AdminListener(free_port(), lambda sched, body: (200, {"echo": body})).start()
    poller = zmq.Poller()
    scheduler = SimpleNamespace(idle_sleeper=SimpleNamespace(poller=poller))
    assert admin.wake_on_jobs(scheduler, listener)
    assert poller.poll(0) == []  # no job: the sleeper would sleep
    replies: list = []
    caller = threading.Thread(
        target=lambda: replies.append(admin.call_scheduler(listener.port, {"kind": "x"}, 60.0))
    )
    caller.start()
    ready = dict(poller.poll(30_000))  # returns as soon as the job is queued
    assert listener.wake_fd in ready
    listener.drain(scheduler)
    caller.join(60)
    assert replies == [(200, {"echo": {"kind": "x"}})]
    assert poller.poll(0) == []  # drained: asleep again until the next job


def test_without_a_sleeper_nothing_is_registered() -> None:
    listener = admin.AdminListener(free_port(), lambda sched, body: (200, {})).start()
    assert not admin.wake_on_jobs(SimpleNamespace(), listener)
    assert not admin.wake_on_jobs(SimpleNamespace(idle_sleeper=object()), listener)
