# SPDX-License-Identifier: Apache-2.0
"""A layer server (``python -m banaserve_ext.migration.layer_server``) as a child process of a
test: started at construction (it writes its port to a ready file), SIGKILLed by :meth:`kill`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class LayerServerProc:
    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        ready = tmp / "port"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "banaserve_ext.migration.layer_server",
             "--ready-file", str(ready)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text()):
            assert self.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        self.port = int(ready.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
