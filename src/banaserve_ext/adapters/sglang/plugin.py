# SPDX-License-Identifier: Apache-2.0
"""The ``sglang.srt.plugins`` entry point and the ``pd`` feature's registration.

SGLang loads every installed plug-in in every process (launcher, schedulers, detokenizer).
:func:`register` hands over to the host layer (:mod:`.host`), which reads the server's own
arguments and starts only the features that server asked for: a server without
``--disaggregation-transfer-backend banaserve``, HiCache with our storage backend or an explicit
opt-in runs untouched (no hook, no socket of ours).

The ``pd`` feature (:func:`activate_pd`) makes ``--disaggregation-transfer-backend banaserve``
work although SGLang has no switch for out-of-tree transfer backends (``TransferBackend`` is a
closed enum and ``get_kv_class`` an if/elif chain):

1. adds ``banaserve`` to the CLI choices of ``--disaggregation-transfer-backend``;
2. adds a ``TransferBackend.BANASERVE`` member, so ``TransferBackend("banaserve")`` resolves;
3. wraps ``get_kv_class`` (an AROUND hook) so that for that member it returns our classes from
   :mod:`.conn` and otherwise defers to SGLang.

Nothing here starts threads or opens sockets; the conn classes do, when SGLang creates them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

BACKEND_NAME = "banaserve"
ENUM_MEMBER = "BANASERVE"


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


class KVClassRouter:
    """The ``get_kv_class`` AROUND hook: our classes for ``banaserve``, SGLang's otherwise."""

    def __init__(self, pd: Any) -> None:
        self.pd = pd  # the host namespace of the pd feature

    def mapping(self) -> dict[Any, type]:
        from . import conn

        k = self.pd.KVClassType
        return {
            k.MANAGER: conn.manager_class(),
            k.SENDER: conn.sender_class(),
            k.RECEIVER: conn.receiver_class(),
            k.BOOTSTRAP_SERVER: conn.bootstrap_server_class(),
        }

    def around_get_kv_class(self, original: Callable[..., Any], transfer_backend: Any,
                            class_type: Any, *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        is_ours = getattr(transfer_backend, "value", transfer_backend) == BACKEND_NAME
        if not is_ours or class_type == self.pd.KVClassType.KVARGS:
            return original(transfer_backend, class_type, *args, **kwargs)
        return self.mapping()[class_type]


def activate_pd(host: Any) -> KVClassRouter:
    """Activation of the ``pd`` feature (called by the host once its internals are probed)."""
    pd = host.ns("pd")
    if BACKEND_NAME not in pd.choices:
        pd.add_choices([BACKEND_NAME])
    add_enum_member(pd.TransferBackend, ENUM_MEMBER, BACKEND_NAME)
    router = KVClassRouter(pd)
    host.hook("pd", "get_kv_class", router.around_get_kv_class)
    host.hook("pd", "Scheduler.process_decode_queue", drive_hicache_after_flip, "BEFORE")
    return router


def drive_hicache_after_flip(scheduler: Any, *a: Any, **kw: Any) -> None:
    """BEFORE ``process_decode_queue``: a server started as prefill with HiCache and switched to
    decode at runtime (``--enable-pd-role-switch``) keeps its HiCache tree, but SGLang's decode
    loop drives the HiCache events (write-through and storage backup completions) only for a
    server started as a HiCache decode server (``enable_decode_hicache``). Without this, the
    flipped server's finished writes are never collected, it never reports itself fully idle,
    and SGLang refuses to switch it back."""
    if scheduler.enable_hierarchical_cache and not scheduler.enable_decode_hicache:
        scheduler.tree_cache.check_hicache_events()


def register() -> None:
    """Entry point of the ``banaserve`` plug-in (group ``sglang.srt.plugins``)."""
    from . import host

    host.load()
