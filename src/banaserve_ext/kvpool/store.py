# SPDX-License-Identifier: Apache-2.0
"""``KVStore``: the contract every page store of banaserve_ext keeps.

:class:`~.pool.KVPool` (the shared segment on this host) and :class:`~.remote.RemoteKVPool` (a
pool on another host, through ``banaserve pool serve --listen``) both implement it, so a caller
such as the HiCache backend holds a ``KVStore`` and does not care which. The test suite
``python_tests/kvpool/test_kvpool_store.py`` runs the same semantic tests against both.

A store holds fixed-size pages under keys (``str`` or ``bytes``; a ``str`` is its UTF-8 bytes).
A stored page is immutable until it is removed or evicted; a second put of a stored key leaves
the first value. Every batch call takes a ``suffix`` appended to every key (a namespace such as
a TP rank) so callers need not build new strings per key.

Caller memory, in :meth:`~KVStore.batch_get` and :meth:`~KVStore.batch_set`, takes one of three
forms: ``buf``, one contiguous buffer of ``len(keys) * page_size`` bytes (numpy array, CPU torch
tensor, any buffer, or an int pointer with ``nbytes``) where page i is at offset
``i * page_size``; ``addrs``, one address per page; or ``addrs`` with ``seg_lens``, an (n, S)
table of piece addresses whose S lengths sum to the page size (e.g. one piece per layer).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

Keys = Sequence[str | bytes]
_S = TypeVar("_S", bound="KVStore")


class KVStore(abc.ABC):
    """A page store (see the module docstring). The constructor stores configuration;
    :meth:`start` (or ``with``) attaches or connects, :meth:`close` lets go."""

    #: the name of the pool behind the store
    name: str

    # -- lifecycle -----------------------------------------------------------------------------
    @abc.abstractmethod
    def start(self: _S) -> _S:
        """Attaches or connects; returns self. Idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Lets go of the store (a second close does nothing)."""

    def __enter__(self: _S) -> _S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pool behind the store -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def page_size(self) -> int:
        """Bytes per page."""

    @property
    @abc.abstractmethod
    def num_pages(self) -> int:
        """Pages the pool holds at most."""

    @property
    @abc.abstractmethod
    def max_key_len(self) -> int:
        """Longest key (suffix included) in bytes."""

    @property
    @abc.abstractmethod
    def segment_id(self) -> int:
        """Identity of the pool's current segment: a restarted pool of the same name has a
        new one."""

    # -- memory --------------------------------------------------------------------------------
    @abc.abstractmethod
    def register(self, buf: Any, nbytes: int | None = None) -> None:
        """Declares ``buf`` (a buffer, CPU tensor, or int pointer with ``nbytes``) as memory of
        many later calls, e.g. SGLang's host KV pool. Only a hint: memory never registered works
        too."""

    # -- data path -----------------------------------------------------------------------------
    @abc.abstractmethod
    def batch_exists(self, keys: Keys, *, suffix: str = "") -> int:
        """Number of leading keys that are stored (stops at the first miss)."""

    @abc.abstractmethod
    def exists_mask(self, keys: Keys, *, suffix: str = "") -> np.ndarray:
        """A bool per key: stored or not."""

    @abc.abstractmethod
    def batch_get(
        self,
        keys: Keys,
        dst: Any = None,
        *,
        nbytes: int | None = None,
        addrs: Any = None,
        seg_lens: Any = None,
        suffix: str = "",
    ) -> np.ndarray:
        """Copies each stored key's page into caller memory; returns a bool "found" per key.
        The memory of a key not found is left untouched."""

    @abc.abstractmethod
    def batch_set(
        self,
        keys: Keys,
        src: Any = None,
        *,
        nbytes: int | None = None,
        addrs: Any = None,
        seg_lens: Any = None,
        suffix: str = "",
        raise_on_full: bool = True,
    ) -> np.ndarray:
        """Stores each key's page from caller memory; returns a uint8
        :class:`~.pool.PutResult` per key. A key already stored is left untouched
        (``EXISTS``); a key another process is writing right now is ``IN_FLIGHT``. When no page
        can be freed (everything pinned or reserved) the key is ``NO_SPACE`` and, with
        ``raise_on_full``, :class:`~banaserve_ext.errors.ResourceExhaustedError` is raised after
        the others are stored."""

    @abc.abstractmethod
    def remove(self, keys: Keys) -> int:
        """Removes the stored keys that are not pinned; returns how many were removed."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int | bool]:
        """The pool's counters and gauges (a remote store adds the service's own)."""
