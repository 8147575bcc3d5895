# SPDX-License-Identifier: Apache-2.0
"""The ``sglang.srt.plugins`` entry point: adds ``--disaggregation-transfer-backend banaserve``.

SGLang has no switch for out-of-tree transfer backends: ``TransferBackend`` is a closed enum and
``get_kv_class`` an if/elif chain. Its general plug-in system is enough though. :func:`register`
runs in every SGLang process (launcher, schedulers, detokenizer) and

1. adds ``banaserve`` to the CLI choices of ``--disaggregation-transfer-backend``;
2. adds a ``TransferBackend.BANASERVE`` member, so ``TransferBackend("banaserve")`` resolves;
3. wraps ``get_kv_class`` (an AROUND hook) so that for that member it returns our classes from
   :mod:`.conn` and otherwise defers to SGLang;
4. wraps ``Scheduler.run_batch`` (an AROUND hook, :mod:`.layerwise`) so that prefill batches
   of ``banaserve`` requests stream their KV layer by layer while the model computes;
5. applies :mod:`.cpu_compat`'s SGLang patches, only in processes started through the CPU
   launcher;
6. adds ``POST /banaserve/migrate`` (:mod:`.admin`) and the migration kinds
   (:mod:`.kv_migration`).

Nothing here starts threads or opens sockets; the conn classes do, when SGLang creates them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

BACKEND_NAME = "banaserve"
ENUM_MEMBER = "BANASERVE"
GET_KV_CLASS = "sglang.srt.disaggregation.utils.get_kv_class"


def add_enum_member(enum_cls: type[enum.Enum], name: str, value: object) -> enum.Enum:
    """Adds ``name = value`` to an existing Enum class (idempotent); returns the member.

    Enum classes are closed by design; this fills the same tables the Enum metaclass fills
    (by-name map, by-value map, member order) so lookups by name, by value and iteration all
    see the new member.
    """
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        if existing.name != name:
            raise ValueError(f"{enum_cls.__name__} already maps {value!r} to {existing.name}")
        return existing
    if name in enum_cls._member_map_:
        raise ValueError(f"{enum_cls.__name__}.{name} already exists with another value")
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls  # type: ignore[attr-defined]
    member._sort_order_ = len(enum_cls._member_names_)  # type: ignore[attr-defined]
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)  # type: ignore[attr-defined]
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses member names
    return member


def _class_mapping() -> dict[Any, type]:
    from sglang.srt.disaggregation.utils import KVClassType

    from . import conn

    return {
        KVClassType.MANAGER: conn.BanaserveKVManager,
        KVClassType.SENDER: conn.BanaserveKVSender,
        KVClassType.RECEIVER: conn.BanaserveKVReceiver,
        KVClassType.BOOTSTRAP_SERVER: conn.BanaserveKVBootstrapServer,
    }


def around_get_kv_class(original: Callable[..., Any], transfer_backend: Any, class_type: Any,
                        *args: Any, **kwargs: Any) -> Any:
    """AROUND hook of ``get_kv_class``: our classes for ``banaserve``, SGLang's otherwise."""
    from sglang.srt.disaggregation.utils import KVClassType

    is_ours = getattr(transfer_backend, "value", transfer_backend) == BACKEND_NAME
    if not is_ours or class_type == KVClassType.KVARGS:
        return original(transfer_backend, class_type, *args, **kwargs)
    return _class_mapping()[class_type]


def register() -> None:
    """Entry point of the ``banaserve`` plug-in (group ``sglang.srt.plugins``)."""
    from sglang.srt.arg_groups import choices
    from sglang.srt.disaggregation.utils import TransferBackend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in choices.DISAGG_TRANSFER_BACKEND_CHOICES:
        choices.add_disagg_transfer_backend_choices([BACKEND_NAME])
    add_enum_member(TransferBackend, ENUM_MEMBER, BACKEND_NAME)
    HookRegistry.register(GET_KV_CLASS, around_get_kv_class, HookType.AROUND)

    from . import admin, cpu_compat, kv_migration, layerwise, signals

    layerwise.register()
    admin.register()
    kv_migration.register()
    signals.register()

    if cpu_compat.active():
        cpu_compat.apply_sglang_patches()
