# SPDX-License-Identifier: Apache-2.0
"""The transfer engine: move pages of memory between processes and hosts.

Prepare once, post many::

    with TransferEngine() as eng:                      # start(): backends, listener, watchdog
        reg = eng.register(kv_buffer)                  # or eng.allocate(n): the fastest shm path
        peer = eng.add_peer(other_metadata_bytes)      # never blocks; returns the peer id
        local = eng.prepare(np.array([[addr, len], ...], np.uint64))
        remote = eng.prepare(remote_table, peer=peer)  # checked against the peer's regions
        with eng.submit(Op.WRITE, local, idx, remote, idx) as h:
            h.wait(timeout_s=5)

Backends are chosen per peer from their capabilities: ``cuda`` (CUDA IPC) for a same-host peer
that publishes GPU memory, ``shm`` for a peer on the same host, ``ucx`` (RDMA) across hosts when
both engines run it, ``tcp`` otherwise (``local`` within one engine). The choice is logged and
reported by :meth:`TransferEngine.backend_for` / :meth:`TransferEngine.route_for`. Errors are
:mod:`banaserve_ext.errors` classes, converted from the C++ ``Status`` in one place. See
docs/design.md for the cancellation contract.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from .. import _env
from .._buffers import array_at, as_buffer_view
from ..errors import InvalidArgumentError, UnavailableError

__all__ = [
    "Op",
    "TransferState",
    "TransferEngine",
    "TransferHandle",
    "SendStream",
    "RecvStream",
    "Registration",
    "PreparedList",
    "FaultSpec",
    "EngineMetadata",
    "available_backends",
    "backend_names",
    "HostFence",
]

_log = logging.getLogger("banaserve_ext.transfer")


class Op(enum.IntEnum):
    WRITE = 0  #: local → remote
    READ = 1  #: remote → local


class TransferState(enum.IntEnum):
    PENDING = 0
    RUNNING = 1
    DONE = 2  #: terminal: every byte in place
    FAILED = 3  #: terminal
    CANCELLED = 4  #: terminal

    @property
    def terminal(self) -> bool:
        return self >= TransferState.DONE


class RegionMetadata(msgspec.Struct, array_like=True):
    id: int
    addr: int
    nbytes: int
    device_kind: int
    device_id: int
    shm_fd: int
    shm_offset: int
    ipc_handle: bytes = b""  # cudaIpcMemHandle_t of the allocation (cuda backend)
    ipc_offset: int = 0
    rkey: bytes = b""  # packed UCX rkey (ucx backend)


class EngineMetadata(msgspec.Struct):
    """What an engine publishes about itself; exchanged out of band as msgpack bytes."""

    engine_id: str
    host_id: str
    pid: int
    tcp_host: str
    tcp_port: int
    control_fd: int
    regions: list[RegionMetadata]
    ucx_address: bytes = b""  # packed UCP worker address (ucx backend)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(EngineMetadata)


class FaultSpec(msgspec.Struct, frozen=True):
    """Fault injection for tests: every backend of the engine is wrapped in a decorator that
    fails posts after ``fail_after_posts``, delays each post by ``delay_ms``, or drops posts."""

    fail_after_posts: int = 0
    delay_ms: int = 0
    drop: bool = False


def _core() -> Any:
    from .. import _core as core  # the compiled module; imported on first use

    return core


def available_backends() -> list[str]:
    """Backends compiled into this build, e.g. ``['local', 'shm', 'tcp']``."""
    return list(_core().available_backends())


def backend_names() -> list[str]:
    """Every backend this library knows, compiled into this build or not (the one list, in
    ``cpp/transfer/include/banaserve/transfer/backend_names.h``)."""
    return list(_core().backend_names())


def _timeout_ms(timeout_s: float | None) -> int:
    if timeout_s is None:
        return -1
    if timeout_s < 0:
        raise InvalidArgumentError(f"timeout_s must be >= 0 or None, got {timeout_s}")
    return int(timeout_s * 1000)


def _device_args(device: tuple[str, int] | None) -> tuple[int, int]:
    """``None``/``("cpu", 0)`` → host memory; ``("cuda", n)`` → GPU n (the ranges of a prepared
    list are checked against registrations on that device)."""
    if device is None:
        return 0, 0
    kind, ordinal = device
    if kind not in ("cpu", "cuda") or int(ordinal) < 0:
        raise InvalidArgumentError(f"device must be ('cpu', 0) or ('cuda', n), got {device!r}")
    return (0 if kind == "cpu" else 1), int(ordinal)


def _index_array(idx: Any, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(idx, dtype=np.int64)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


class Registration:
    """A registered memory region. Holds a reference to the registered object so its memory
    stays alive until :meth:`release` (or engine stop). For :meth:`TransferEngine.allocate`d
    memory, :attr:`array` is a numpy view that is valid until release."""

    def __init__(self, engine: TransferEngine, info: dict, owner: Any, allocated: bool) -> None:
        self._engine = engine
        self.region_id: int = info["id"]
        self.addr: int = info["addr"]
        self.nbytes: int = info["nbytes"]
        self.shared: bool = info["shm_fd"] >= 0
        self._owner = owner
        self._allocated = allocated
        self._released = False
        self.array: np.ndarray | None = array_at(self.addr, self.nbytes) if allocated else None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.array = None
        if self._engine._core_engine is not None and self._engine.started:
            self._engine._core_engine.unregister(self.region_id)
        self._owner = None

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Registration(id={self.region_id}, addr={self.addr:#x}, nbytes={self.nbytes})"


class PreparedList:
    """A validated descriptor list or layout; reuse it for many submits."""

    def __init__(self, core_list: Any) -> None:
        self._core = core_list

    @property
    def peer(self) -> str | None:
        """The peer whose registrations validated this list, or None for this engine."""
        return self._core.peer or None

    @property
    def num_entries(self) -> int:
        return int(self._core.num_entries)

    @property
    def num_buffers(self) -> int:
        return int(self._core.num_buffers)

    @property
    def is_layout(self) -> bool:
        return bool(self._core.is_layout)


class TransferHandle:
    """One submitted batch. A context manager: leaving the block before the batch is terminal
    cancels it and waits until the engine no longer touches its memory."""

    def __init__(self, batch: Any) -> None:
        self._batch = batch

    @property
    def state(self) -> TransferState:
        return TransferState(self._batch.state)

    @property
    def nbytes(self) -> int:
        return int(self._batch.nbytes)

    def wait(self, timeout_s: float | None = None) -> bool:
        """True once DONE; False if still running at the timeout (the batch keeps running);
        raises the failure (e.g. :class:`UnavailableError`, :class:`TransferTimeoutError` for a
        missed deadline, :class:`CancelledError`)."""
        return bool(self._batch.wait(_timeout_ms(timeout_s)))

    def cancel(self) -> None:
        """Requests cancellation; keep waiting until the state is terminal (see the contract)."""
        self._batch.cancel()

    def __enter__(self) -> TransferHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.state.terminal:
            self.cancel()
            try:
                self._batch.wait(-1)
            except Exception:  # noqa: BLE001 - the batch ends cancelled/failed; nothing to add
                pass

    def __repr__(self) -> str:
        return f"TransferHandle(id={self._batch.id}, state={self.state.name}, nbytes={self.nbytes})"


class SendStream:
    """Sender side of a layer-wise transfer: ``mark_layer_ready(i)`` ships layer i at once."""

    def __init__(self, core_stream: Any) -> None:
        self._s = core_stream

    @property
    def transfer_id(self) -> int:
        return int(self._s.transfer_id)

    @property
    def num_layers(self) -> int:
        return int(self._s.num_layers)

    @property
    def state(self) -> TransferState:
        return TransferState(self._s.state)

    @property
    def layers_posted(self) -> int:
        """Layers handed to the backend so far (fenced layers count once their fence fired)."""
        return int(self._s.layers_posted)

    def mark_layer_ready(self, layer: int) -> None:
        self._s.mark_layer_ready(layer)

    def mark_layer_ready_after(self, layer: int, fence: Any) -> None:
        """Posts layer ``layer`` once ``fence`` is ready, from a helper thread, in call order;
        returns at once. ``fence``: a :class:`HostFence`, or a fence from
        :meth:`mark_layer_ready_after_event`'s event. A failed fence fails the stream."""
        core_fence = fence._f if isinstance(fence, HostFence) else fence
        self._s.mark_layer_ready_after(layer, core_fence)

    def mark_layer_ready_after_event(self, layer: int, event: Any) -> None:
        """Layer-wise streaming driven by the producing GPU stream: record a CUDA event on that
        stream after layer ``layer`` (``torch.cuda.Event``, or its raw ``cudaEvent_t`` as int)
        and hand it here; the layer is posted once the event completed, and the caller's thread
        never blocks on the GPU. Needs the cuda backend (NotSupportedError otherwise)."""
        handle = int(getattr(event, "cuda_event", event))
        self._s.mark_layer_ready_after(layer, _core().cuda_event_fence(handle))

    def wait(self, timeout_s: float | None = None) -> bool:
        return bool(self._s.wait(_timeout_ms(timeout_s)))

    def cancel(self) -> None:
        self._s.cancel()

    def __enter__(self) -> SendStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.state.terminal:
            self.cancel()


class HostFence:
    """A fence signalled from the host: a CPU producer (or a test) calls :meth:`signal` when a
    layer's bytes are final, or :meth:`fail` when they never will be."""

    def __init__(self) -> None:
        self._f = _core().HostFence()

    def signal(self) -> None:
        self._f.signal()

    def fail(self, why: str) -> None:
        self._f.fail(why)

    @property
    def ready(self) -> bool:
        return bool(self._f.query())


class RecvStream:
    """Receiver side of a notified transfer: wait for one layer or for all."""

    def __init__(self, engine: TransferEngine, core_stream: Any) -> None:
        self._engine = engine
        self._s = core_stream

    @property
    def transfer_id(self) -> int:
        return int(self._s.transfer_id)

    @property
    def state(self) -> TransferState:
        return TransferState(self._s.state)

    @property
    def layers_done(self) -> int:
        return int(self._s.layers_done)

    def layer_done(self, layer: int) -> bool:
        return bool(self._s.layer_done(layer))

    def wait_layer(self, layer: int, timeout_s: float | None = None) -> bool:
        return bool(self._s.wait_layer(layer, _timeout_ms(timeout_s)))

    def wait_all(self, timeout_s: float | None = None) -> bool:
        return bool(self._s.wait_all(_timeout_ms(timeout_s)))

    def cancel(self) -> None:
        """Stops accepting bytes for this transfer; later bytes are discarded, never written."""
        self._s.cancel()

    def release(self) -> None:
        if self._engine._core_engine is not None:
            self._engine._core_engine.release_stream(self.transfer_id)

    def __enter__(self) -> RecvStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.state.terminal:
            self.cancel()
        self.release()


class TransferEngine:
    """The engine. The constructor only stores configuration; :meth:`start` (or ``with``)
    creates the backends, binds the TCP listener and starts the watchdog.

    Defaults come from ``BANASERVE_*`` variables (see CONTRIBUTING.md)."""

    def __init__(
        self,
        *,
        engine_id: str | None = None,
        tcp_host: str = "127.0.0.1",
        tcp_port: int = 0,
        backends: Sequence[str] | None = None,
        force_backend: str | None = None,
        tcp_lanes: int | None = None,
        copy_threads: int | None = None,
        default_timeout_s: float | None = None,
        peer_check_interval_ms: int = 100,
        fault: FaultSpec | None = None,
    ) -> None:
        self.engine_id_hint = engine_id or ""
        self.tcp_host = tcp_host
        self.tcp_port = tcp_port
        env_backend = _env.get(_env.TRANSFER_BACKEND)
        self.force_backend = force_backend or ("" if env_backend == "auto" else env_backend)
        #: the backends to start besides local; None: the core's defaults (resolved at start)
        self.backends = tuple(backends) if backends is not None else None
        self._with_ucx = bool(_env.get(_env.TRANSFER_UCX))
        self.tcp_lanes = tcp_lanes if tcp_lanes is not None else _env.get(_env.TRANSFER_TCP_LANES)
        self.copy_threads = (
            copy_threads if copy_threads is not None else _env.get(_env.TRANSFER_THREADS)
        )
        self.default_timeout_s = (
            default_timeout_s
            if default_timeout_s is not None
            else _env.get(_env.TRANSFER_TIMEOUT_S)
        )
        self.peer_check_interval_ms = peer_check_interval_ms
        self.fault = fault
        self._core_engine: Any = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def _chosen_backends(self, core: Any) -> tuple[str, ...]:
        if self.backends is not None:
            return self.backends
        chosen = tuple(core.default_backends())
        if self._with_ucx:  # BANASERVE_TRANSFER_UCX opts in to the ucx backend
            chosen += ("ucx",)
        if self.force_backend and self.force_backend not in chosen:
            chosen += (self.force_backend,)  # an unknown name is refused with the others
        return chosen

    def start(self) -> TransferEngine:
        if self._core_engine is not None:
            return self
        core = _core()
        known = list(core.backend_names())
        backends = self._chosen_backends(core)
        unknown = sorted(set(backends) - set(known))
        if unknown:
            raise InvalidArgumentError(
                f"unknown backends {unknown}; choose from {', '.join(known)}"
            )
        cfg = core.EngineConfig()
        cfg.engine_id = self.engine_id_hint
        cfg.tcp_host = self.tcp_host
        cfg.tcp_port = self.tcp_port
        cfg.backends = list(backends)
        cfg.tcp_lanes = self.tcp_lanes
        cfg.copy_threads = self.copy_threads
        cfg.default_timeout_ms = int(self.default_timeout_s * 1000)
        cfg.force_backend = self.force_backend
        cfg.peer_check_interval_ms = self.peer_check_interval_ms
        fault = core.FaultSpec()
        if self.fault is not None:
            fault.fail_after_posts = self.fault.fail_after_posts
            fault.delay_ms = self.fault.delay_ms
            fault.drop = self.fault.drop
        eng = core.Engine(cfg, fault)
        eng.start()
        self._core_engine = eng
        return self

    def stop(self) -> None:
        """Fails every transfer in flight (UnavailableError), stops the backends, unmaps
        allocated memory. Idempotent."""
        if self._core_engine is not None:
            self._core_engine.stop()
            self._core_engine = None

    @property
    def started(self) -> bool:
        return self._core_engine is not None

    def __enter__(self) -> TransferEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _eng(self) -> Any:
        if self._core_engine is None:
            raise UnavailableError("transfer engine not started: call start() or use `with`")
        return self._core_engine

    @property
    def engine_id(self) -> str:
        return str(self._eng().engine_id)

    # ---- identity and peers ------------------------------------------------------------------
    def metadata(self) -> bytes:
        """This engine's metadata (identity, endpoints, registrations) as msgpack bytes.
        Publish it again after registering memory that peers must reach."""
        md = self._eng().metadata()
        md["regions"] = [RegionMetadata(**r) for r in md["regions"]]
        return _encoder.encode(EngineMetadata(**md))

    @staticmethod
    def decode_metadata(data: bytes) -> EngineMetadata:
        try:
            return _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise InvalidArgumentError(f"malformed engine metadata: {exc}") from None

    def add_peer(self, metadata: bytes) -> str:
        """Adds (or updates) a peer from its :meth:`metadata` bytes; never blocks on the network.
        Returns the peer id."""
        md = self.decode_metadata(metadata)
        as_dict = msgspec.structs.asdict(md)
        as_dict["regions"] = [msgspec.structs.asdict(r) for r in md.regions]
        backend = self._eng().add_peer(as_dict)
        route = self._eng().peer_route(md.engine_id)
        _log.info(
            "transfer peer %s (pid %d): backend %s%s",
            md.engine_id, md.pid, backend, f" via {route}" if route else "",
        )  # fmt: skip
        return md.engine_id

    def remove_peer(self, peer: str) -> None:
        self._eng().remove_peer(peer)

    def backend_for(self, peer: str) -> str:
        """The backend serving ``peer``: 'cuda', 'shm', 'ucx', 'tcp' or 'local'."""
        return str(self._eng().peer_backend(peer))

    def route_for(self, peer: str) -> str:
        """What the backend of ``peer`` reports about its route, e.g. the UCX transports and
        devices it picked (``'tcp/lo(rma_bw,am_bw,am)'``); '' when there is nothing to add."""
        return str(self._eng().peer_route(peer))

    def peers(self) -> list[str]:
        return list(self._eng().peers())

    # ---- memory ------------------------------------------------------------------------------
    def register(self, obj: Any, nbytes: int | None = None) -> Registration:
        """Registers memory: a buffer-protocol object (numpy, bytearray), a DLPack object
        (torch CPU tensor), or an int address with ``nbytes``. The returned Registration keeps
        ``obj`` alive until released."""
        view = as_buffer_view(obj, nbytes)
        info = self._eng().register_memory(view.addr, view.nbytes, view.device_kind, view.device_id)
        return Registration(self, info, view.owner, allocated=False)

    def allocate(self, nbytes: int) -> Registration:
        """Allocates pre-faulted shared memory that same-host peers map directly (the fastest
        path). ``reg.array`` is a uint8 numpy view of it, valid until ``reg.release()``."""
        info = self._eng().allocate(int(nbytes))
        return Registration(self, info, None, allocated=True)

    # ---- prepare -----------------------------------------------------------------------------
    def prepare(
        self, descs: Any, *, peer: str | None = None, device: tuple[str, int] | None = None
    ) -> PreparedList:
        """Validates an (N, 2) table of (addr, nbytes) once, against this engine's registrations
        or, with ``peer``, against that peer's."""
        table = np.ascontiguousarray(descs, dtype=np.uint64)
        if table.ndim != 2 or table.shape[1] != 2:
            raise InvalidArgumentError(
                f"descriptor table must have shape (N, 2), got {table.shape}"
            )
        kind, ordinal = _device_args(device)
        return PreparedList(self._eng().prepare_descs(peer or "", table, kind, ordinal))

    def prepare_layout(
        self,
        bases: Any,
        item_nbytes: int,
        num_items: int,
        *,
        peer: str | None = None,
        device: tuple[str, int] | None = None,
    ) -> PreparedList:
        """Validates a layout once: buffers ``bases[b]`` each holding ``num_items`` items of
        ``item_nbytes`` (e.g. one buffer per (layer, K/V)); index i then means item i of every
        buffer, and the C++ side does the address arithmetic and coalescing."""
        arr = np.ascontiguousarray(bases, dtype=np.uint64)
        if arr.ndim != 1:
            raise InvalidArgumentError(f"layout bases must be 1-D, got shape {arr.shape}")
        kind, ordinal = _device_args(device)
        return PreparedList(
            self._eng().prepare_layout(
                peer or "", arr, int(item_nbytes), int(num_items), kind, ordinal
            )
        )

    # ---- post --------------------------------------------------------------------------------
    def submit(
        self,
        op: Op,
        local: PreparedList,
        local_idx: Any,
        remote: PreparedList,
        remote_idx: Any,
        *,
        buffers: tuple[int, int] | None = None,
        notify: tuple[int, int, int] | None = None,
        timeout_s: float | None = None,
    ) -> TransferHandle:
        """Posts one batch: entry ``local_idx[k]`` of ``local`` ↔ entry ``remote_idx[k]`` of
        ``remote`` (the peer is the one ``remote`` was prepared for). For layouts, ``buffers``
        restricts the batch to buffers [begin, end). ``notify=(transfer_id, layer, num_layers)``
        tells the receiver once every byte is in place. Every validation error is raised before
        a byte moves."""
        li = _index_array(local_idx, "local_idx")
        ri = _index_array(remote_idx, "remote_idx")
        begin, end = buffers if buffers is not None else (0, 0xFFFFFFFF)
        tid, layer, nl = notify if notify is not None else (0, 0, 0)
        batch = self._eng().submit(
            int(op), remote._core.peer, local._core, li, remote._core, ri,
            begin, end, tid, layer, nl, _timeout_ms(timeout_s),
        )  # fmt: skip
        return TransferHandle(batch)

    def open_stream(
        self,
        transfer_id: int,
        num_layers: int,
        local: PreparedList,
        local_idx: Any,
        remote: PreparedList,
        remote_idx: Any,
        *,
        buffers_per_layer: int,
        timeout_s: float | None = None,
    ) -> SendStream:
        """Layer-wise sending to the peer ``remote`` was prepared for: layer i covers buffers
        [i * buffers_per_layer, (i + 1) * buffers_per_layer) of both layouts."""
        s = self._eng().open_stream(
            remote._core.peer, int(transfer_id), int(num_layers), local._core,
            _index_array(local_idx, "local_idx"), remote._core,
            _index_array(remote_idx, "remote_idx"), int(buffers_per_layer), _timeout_ms(timeout_s),
        )  # fmt: skip
        return SendStream(s)

    def expect(
        self,
        transfer_id: int,
        num_layers: int,
        *,
        peer: str | None = None,
        timeout_s: float | None = None,
    ) -> RecvStream:
        """Receiving side of a notified transfer. With ``peer``, the stream fails as soon as that
        peer is found dead; in any case it fails at its deadline."""
        s = self._eng().expect(
            int(transfer_id), int(num_layers), peer or "", _timeout_ms(timeout_s)
        )
        return RecvStream(self, s)

    def stats(self) -> dict[str, int]:
        return dict(self._eng().stats())
