# SPDX-License-Identifier: Apache-2.0
"""The trace slices shipped in the package, and how named traces find full or shipped data."""

from __future__ import annotations

from pathlib import Path

import pytest

from banaserve_ext import data
from banaserve_ext.errors import NotFoundError
from banaserve_ext.sim.cost import default_calibration_dir
from banaserve_ext.sim.traces import load_trace

SLICED = [t for t in data.NAMED_TRACES.values() if t.slice is not None]


@pytest.mark.parametrize("trace", SLICED, ids=lambda t: t.name)
def test_every_slice_holds_its_first_requests_and_a_license(trace: data.NamedTrace) -> None:
    path = data.EMBEDDED_TRACES_DIR / trace.slice
    lines = path.read_bytes().splitlines()
    header = 1 if trace.kind == "azure" else 0
    assert len(lines) == data.SLICE_REQUESTS + header
    assert list(path.parent.glob("LICENSE-*")), f"no license file beside {path}"
    reqs = load_trace(str(path))  # parses with the simulator's strict loaders
    assert len(reqs) == data.SLICE_REQUESTS and reqs[0].arrival_s == 0.0


def test_shipped_data_is_documented() -> None:
    readme = (data.EMBEDDED_TRACES_DIR / "README.md").read_text()
    for f in data.EMBEDDED_TRACES_DIR.rglob("*"):
        if f.is_file() and f.suffix in (".jsonl", ".csv"):
            assert f.name in readme, f"{f.name} is not described in the data README"
    assert (default_calibration_dir() / "derived" / "opsum_linear_fits.csv").is_file()


@pytest.mark.parametrize("trace", SLICED, ids=lambda t: t.name)
def test_slice_is_a_byte_prefix_of_the_full_trace(trace: data.NamedTrace, traces_dir: Path) -> None:
    shipped = (data.EMBEDDED_TRACES_DIR / trace.slice).read_bytes()
    assert (traces_dir / trace.full).read_bytes().startswith(shipped)


def test_shipped_cost_table_is_the_shared_one(traces_dir: Path) -> None:
    rel = Path("calibration/derived/opsum_linear_fits.csv")
    assert (data.EMBEDDED_TRACES_DIR / rel).read_bytes() == (traces_dir / rel).read_bytes()


def test_without_full_traces_named_traces_use_the_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "shared_traces_dir", lambda: None)
    kind, path = data.named_trace_path("azure-code", 300)
    assert kind == "azure"
    assert path == data.EMBEDDED_TRACES_DIR / data.NAMED_TRACES["azure-code"].slice
    assert len(load_trace("mooncake-conv", 50)) == 50
    with pytest.raises(NotFoundError, match=r"first 300 requests .* 301 were asked"):
        load_trace("azure-conv", 301)
    with pytest.raises(NotFoundError, match="all were asked for"):
        load_trace("mooncake-conv")
    with pytest.raises(NotFoundError, match="shared/data/traces"):
        load_trace("mooncake-synth", 10)  # nothing shipped for it
