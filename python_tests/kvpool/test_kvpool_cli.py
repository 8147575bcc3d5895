# SPDX-License-Identifier: Apache-2.0
"""``banaserve pool serve|stats|rm`` as real processes: metrics over HTTP on 127.0.0.1, a
service restart gives clients a clear error and they reconnect."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from kvpool_testlib import unique_name

from banaserve_ext.errors import NotFoundError, UnavailableError
from banaserve_ext.kvpool import KVPool

PAGE = 4096


@contextmanager
def serve(name: str, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    cmd = [
        sys.executable,
        "-m",
        "banaserve_ext",
        "pool",
        "serve",
        "--name",
        name,
        "--size",
        "1MiB",
        "--page-size",
        "4KiB",
        "--metrics-port",
        "0",
        "--no-populate",
        "--reap-interval",
        "0.1",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        match = re.search(r"metrics=(http://127\.0\.0\.1:\d+/metrics)", line)
        assert match, (
            f"unexpected first line {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        )
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "banaserve_ext", "pool", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_exports_metrics_and_stops_cleanly() -> None:
    name = unique_name("cli")
    with serve(name) as (proc, url):
        client = KVPool.attach(name)
        assert client.page_size == PAGE
        assert client.num_pages == 256
        client.batch_set(["a", "b"], np.ones((2, PAGE), np.uint8))
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        assert f'banaserve_kvpool_committed_pages{{pool="{name}"}} 2' in body
        assert "# TYPE banaserve_kvpool_evictions_total counter" in body
        stats = json.loads(_cli("stats", "--name", name, "--format", "json").stdout)
        assert stats["committed_pages"] == 2
        assert stats["num_pages"] == 256
        dup = _cli("serve", "--name", name, "--size", "1MiB")
        assert dup.returncode == 1
        assert "AlreadyExistsError" in dup.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        with pytest.raises(UnavailableError, match="closed"):
            client.batch_exists(["a"])
    with pytest.raises(NotFoundError):
        KVPool.attach(name)
    missing = _cli("stats", "--name", name)
    assert missing.returncode == 1 and "NotFoundError" in missing.stderr


def test_service_restart_clients_reconnect() -> None:
    name = unique_name("restart")
    with serve(name) as (proc, _):
        client = KVPool.attach(name)
        client.batch_set(["x"], np.ones((1, PAGE), np.uint8))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    with serve(name):
        assert client.batch_exists(["x"]) == 0  # new, empty pool; no error
        client.batch_set(["y"], np.ones((1, PAGE), np.uint8))
        assert KVPool.attach(name).batch_exists(["y"]) == 1


def test_rm_removes_a_leftover_segment() -> None:
    name = unique_name("rm")
    KVPool(name, create=True, capacity_bytes=PAGE, page_size=PAGE, populate=False).start()
    assert _cli("rm", "--name", name).returncode == 0
    with pytest.raises(NotFoundError):
        KVPool.attach(name)
