# SPDX-License-Identifier: Apache-2.0
"""The controller's link-cost calibration against real targets (a layer server in this process,
an attention peer process), through the transfer engine; a target that is not there is
skipped, not fatal."""

from __future__ import annotations

import socket

from banaserve_ext.control import LinkCost
from banaserve_ext.live.calibrate import SIZES, calibrate
from banaserve_ext.migration.attn_peer import AttnPeerProcess
from banaserve_ext.migration.layer_server import LayerServer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_calibration_fits_both_links_and_skips_a_missing_target() -> None:
    with LayerServer() as srv, AttnPeerProcess() as peer:
        links, report = calibrate(f"127.0.0.1:{srv.port}", peer.address)
        assert set(links) == {"layer_link", "attention_link"}
        for name, link in links.items():
            assert isinstance(link, LinkCost) and link.bandwidth_Bps > 0
            pts = report[name]["points"]
            assert [n for n, _ in pts][0] == SIZES[0] and len(pts) == len(SIZES)
            assert all(s > 0 for _, s in pts)
        # the layer server is free again (it serves one connection at a time) and gave the
        # calibration arena back
        again, _ = calibrate(f"127.0.0.1:{srv.port}", None)
        assert "layer_link" in again
    links, report = calibrate(f"127.0.0.1:{_closed_port()}", None)
    assert links == {} and "skipped" in report["layer_link"]
    assert report["attention_link"] == {"skipped": "no target"}
