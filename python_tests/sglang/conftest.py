# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from sglang_testbed.fixtures import *  # noqa: F403
