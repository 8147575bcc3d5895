# SPDX-License-Identifier: Apache-2.0
"""The SGLang host layer (adapters/sglang/host): feature selection from a server's arguments,
probing internals, and the refusal when one is missing — against a fake SGLang module tree
written here (no SGLang needed)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from banaserve_ext.adapters.sglang import admin
from banaserve_ext.adapters.sglang.host import Feature, FeatureRefused, Host, selection
from banaserve_ext.adapters.sglang.host.probe import (
    MEMBER,
    SOURCE,
    TESTED_SGLANG,
    ContactError,
    Internal,
    probe,
    require_attr,
    sglang_version,
)
from banaserve_ext.errors import InvalidArgumentError

# -- selection -------------------------------------------------------------------------------


def select_argv(*argv: str, **kw: object) -> list[str]:
    return selection.select(selection.from_argv(argv), **kw)  # type: ignore[arg-type]


def test_a_plain_server_selects_nothing() -> None:
    assert select_argv("--model-path", "m", "--port", "30000") == []


def test_another_transfer_backend_selects_nothing() -> None:
    assert select_argv("--disaggregation-mode", "prefill",
                       "--disaggregation-transfer-backend", "mooncake") == []  # fmt: skip
    assert select_argv("--disaggregation-mode", "decode") == []  # mooncake is SGLang's default


def test_our_transfer_backend_selects_pd_and_on_prefill_layerwise() -> None:
    assert select_argv(
        "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend=banaserve"
    ) == ["pd", "layerwise"]
    assert select_argv("--disaggregation-mode", "prefill", "--disaggregation-transfer-backend",
                       "banaserve", layerwise=False) == ["pd"]  # fmt: skip
    assert select_argv("--disaggregation-transfer-backend", "banaserve",
                       "--disaggregation-mode", "decode") == ["pd"]  # fmt: skip
    # a decode server that SGLang may switch to prefill at runtime has it ready
    assert select_argv("--disaggregation-transfer-backend", "banaserve", "--disaggregation-mode",
                       "decode", "--enable-pd-role-switch") == ["pd", "layerwise"]  # fmt: skip


def test_hicache_is_selected_by_its_storage_config_only() -> None:
    ours = '{"backend_name": "banaserve", "module_path": "banaserve_ext.adapters.sglang.hicache"}'
    other = '{"backend_name": "x", "module_path": "someone.else"}'
    base = ("--enable-hierarchical-cache", "--hicache-storage-backend", "dynamic")
    assert select_argv(*base, "--hicache-storage-backend-extra-config", ours) == ["hicache"]
    assert select_argv(*base, "--hicache-storage-backend-extra-config", other) == []
    assert select_argv(*base, "--hicache-storage-backend-extra-config", other,
                       cpu_launcher=True) == ["cpu_launcher", "hicache_cpu"]  # fmt: skip


def test_migrations_need_the_explicit_opt_in() -> None:
    assert select_argv("--model-path", "m", opted=["kv_migration"]) == ["admin", "kv_migration"]
    assert select_argv(opted=["layer_migration", "kv_migration"]) == [
        "admin", "kv_migration", "layer_migration"]  # fmt: skip
    with pytest.raises(InvalidArgumentError, match="unknown feature"):
        select_argv(opted=["kv_migraton"])


def test_the_cpu_launcher_takes_the_opt_in_off_sglangs_command_line() -> None:
    argv = ["--model-path", "m", "--banaserve-features", "kv_migration", "--port", "1"]
    assert selection.take_features(argv) == (["--model-path", "m", "--port", "1"], "kv_migration")
    assert selection.take_features(["--banaserve-features=a,b"]) == ([], "a,b")
    assert selection.take_features(["--port", "1"]) == (["--port", "1"], None)


def test_arguments_from_a_server_args_object_or_engine_kwargs() -> None:
    class Args:
        disaggregation_mode = "prefill"
        disaggregation_transfer_backend = "banaserve"

    assert selection.select(selection.from_object(Args())) == ["pd", "layerwise"]
    kw = {"model_path": "m", "disaggregation_transfer_backend": "banaserve"}
    assert selection.select(selection.from_mapping(kw)) == ["pd"]


# -- a fake SGLang -------------------------------------------------------------------------------
FAKE_V1 = """
class Scheduler:
    def __init__(self):
        self.tp_worker = object()
        self.a, self.waiting_queue = 1, []

    def run_batch(self, batch):
        return ("ran", batch)


def get_kv_class(transfer_backend, class_type):
    return None
"""


@pytest.fixture
def fake_sglang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    pkg = tmp_path / "fakesg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sched.py").write_text(textwrap.dedent(FAKE_V1))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [m for m in sys.modules if m == "fakesg" or m.startswith("fakesg.")]:
        del sys.modules[name]


TABLE = {
    "plugin": {},
    "demo": {
        "Scheduler.run_batch": Internal(
            "fakesg.sched.Scheduler.run_batch", params=("batch",), hook=True
        ),  # fmt: skip
        "sched.tp_worker": Internal("fakesg.sched.Scheduler", MEMBER, attr="tp_worker"),
        "sched.waiting_queue": Internal("fakesg.sched.Scheduler", MEMBER, attr="waiting_queue"),
    },
    "needs_demo": {"get_kv_class": Internal("fakesg.sched.get_kv_class", hook=True)},
}
ACTIVATED: list[Host] = []


def activate_demo(host: Host) -> str:
    ACTIVATED.append(host)
    host.hook("demo", "Scheduler.run_batch", lambda original, *a, **kw: original(*a, **kw))
    return "demo-state"


def activate_needs_demo(host: Host) -> None:
    host.hook("needs_demo", "get_kv_class", lambda original, *a, **kw: original(*a, **kw))


def make_host(fatal: bool = False) -> tuple[Host, list]:
    registered: list = []
    features = {
        "demo": Feature("demo", "a demo feature", f"{__name__}:activate_demo", fatal=fatal),
        "needs_demo": Feature(
            "needs_demo", "needs demo", f"{__name__}:activate_needs_demo", requires=("demo",)
        ),  # fmt: skip
    }
    host = Host(
        features=features,
        table=TABLE,
        hook_register=lambda path, fn, kind: registered.append((path, kind)),
    )
    return host, registered


def rename(pkg: Path, old: str, new: str) -> None:
    (pkg / "sched.py").write_text(textwrap.dedent(FAKE_V1).replace(old, new))
    sys.modules.pop("fakesg.sched", None)


def test_a_selected_feature_is_probed_activated_and_hooked(fake_sglang: Path) -> None:
    host, registered = make_host()
    host.load(["demo", "needs_demo"], "test")
    assert host.refusals == {}
    assert host.state("demo") == "demo-state"
    assert registered == [("fakesg.sched.Scheduler.run_batch", "AROUND"),
                          ("fakesg.sched.get_kv_class", "AROUND")]  # fmt: skip
    assert "hooks: Scheduler.run_batch, sched.get_kv_class" in host.summary()
    assert host.ns("demo")["Scheduler.run_batch"].__name__ == "run_batch"


def test_an_unselected_feature_is_not_touched(fake_sglang: Path) -> None:
    host, registered = make_host()
    host.load([], "test")
    assert registered == [] and host.active == {} and "hooks: none" in host.summary()


def test_a_renamed_hook_target_refuses_the_feature_by_name(fake_sglang: Path) -> None:
    rename(fake_sglang, "def run_batch(", "def run_batch_v2(")
    host, registered = make_host()
    host.load(["demo", "needs_demo"], "test")
    msg = host.refusals["demo"]
    assert "banaserve feature 'demo' refuses to start" in msg
    assert "fakesg.sched.Scheduler.run_batch" in msg and "no attribute 'run_batch'" in msg
    assert f"Installed SGLang {sglang_version()}" in msg and TESTED_SGLANG in msg
    # never a silent skip, never a half-hooked feature: neither it nor what needs it is hooked
    assert registered == [] and "needs_demo" in host.refusals and host.active == {}


def test_a_renamed_instance_attribute_or_changed_signature_refuses(fake_sglang: Path) -> None:
    rename(fake_sglang, "self.a, self.waiting_queue = 1, []", "self.a, self.queue = 1, []")
    host, _ = make_host()
    host.load(["demo"], "test")
    assert "fakesg.sched.Scheduler.waiting_queue (no attribute 'waiting_queue' declared)" in \
        host.refusals["demo"]  # fmt: skip
    rename(fake_sglang, "def run_batch(self, batch)", "def run_batch(self, batches)")
    host, _ = make_host()
    host.load(["demo"], "test")
    assert "parameters ['batch'] not in the signature" in host.refusals["demo"]


def test_a_fatal_feature_stops_the_load(fake_sglang: Path) -> None:
    rename(fake_sglang, "def run_batch(", "def step(")
    host, _ = make_host(fatal=True)
    with pytest.raises(FeatureRefused, match="feature 'demo' refuses to start"):
        host.load(["demo"], "test")


def test_hooks_only_on_targets_the_table_marks(fake_sglang: Path) -> None:
    host, _ = make_host()
    with pytest.raises(KeyError, match="not a hook target"):
        host.hook("demo", "sched.tp_worker", lambda *a: None)
    with pytest.raises(KeyError, match="not an internal of feature"):
        host.ns("demo")["Scheduler.step"]


def test_source_probe_and_contact_check(fake_sglang: Path) -> None:
    assert probe(Internal("fakesg.sched.Scheduler", SOURCE, attr="run_batch")).found
    assert not probe(Internal("fakesg.sched", SOURCE, attr="transfer_kv_direct")).found
    with pytest.raises(ContactError, match="feature 'demo'.*Scheduler.queue"):
        require_attr(__import__("fakesg.sched").sched.Scheduler(), "queue", "demo")


def test_a_refused_features_admin_kinds_answer_501_with_the_reason() -> None:
    host = Host()
    host.refusals["kv_migration"] = "banaserve feature 'kv_migration' refuses to start: X"
    channel = admin.AdminChannel(host)
    status, reply = channel.run(object(), {"kind": "kv"})
    assert status == 501 and "refuses to start: X" in reply["error"]["message"]
    status, reply = channel.run(object(), {"kind": "nope"})
    assert status == 400 and "unknown migration kind" in reply["error"]["message"]
