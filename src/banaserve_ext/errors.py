# SPDX-License-Identifier: Apache-2.0
"""The one exception hierarchy of banaserve_ext.

The C++ core returns ``Status`` codes; ``cpp/bindings/errors.cc`` is the only place that turns a
non-OK ``Status`` into one of these classes (looked up by code in :data:`STATUS_CODE_TO_ERROR`).
Each class names its C++ ``StatusCode`` (``status_name``, as ``_core.status_codes()`` reports it)
and its value (``code``); python_tests/native/test_status_codes.py checks both against the core.
Pure-Python components raise the same classes.
"""

from __future__ import annotations


class BanaserveError(Exception):
    """Base of every error raised by banaserve_ext."""

    #: numeric StatusCode of the C++ core (see cpp/common/include/banaserve/common/status.h)
    code: int = 11
    #: the name of that StatusCode in the core
    status_name: str = "Internal"


class InvalidArgumentError(BanaserveError, ValueError):
    """Malformed input: bad sizes, unregistered or out-of-range memory, bad dtype/shape."""

    code = 1
    status_name = "InvalidArgument"


class NotFoundError(BanaserveError, KeyError):
    """Unknown peer, key or handle."""

    code = 2
    status_name = "NotFound"

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(BanaserveError):
    """Duplicate registration, or a key already committed by another writer."""

    code = 3
    status_name = "AlreadyExists"


class OutOfRangeError(BanaserveError, IndexError):
    """An index outside a prepared descriptor list."""

    code = 4
    status_name = "OutOfRange"


class ResourceExhaustedError(BanaserveError):
    """A pool or queue is full."""

    code = 5
    status_name = "ResourceExhausted"


class UnavailableError(BanaserveError, ConnectionError):
    """A peer is unreachable or dead, or the engine is not started."""

    code = 6
    status_name = "Unavailable"


class TransferTimeoutError(BanaserveError, TimeoutError):
    """A deadline passed."""

    code = 7
    status_name = "Timeout"


class CancelledError(BanaserveError):
    """The operation was cancelled by the caller."""

    code = 8
    status_name = "Cancelled"


class ProtocolError(BanaserveError):
    """A malformed or truncated frame arrived from a peer."""

    code = 9
    status_name = "ProtocolError"


class NotSupportedError(BanaserveError, NotImplementedError):
    """The chosen backend does not provide this capability."""

    code = 10
    status_name = "NotImplemented"


class InternalError(BanaserveError):
    """A bug, or an OS error with no better mapping."""

    code = 11
    status_name = "Internal"


class CudaError(BanaserveError):
    """A CUDA runtime call failed."""

    code = 12
    status_name = "CudaError"


STATUS_CODE_TO_ERROR: dict[int, type[BanaserveError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        OutOfRangeError,
        ResourceExhaustedError,
        UnavailableError,
        TransferTimeoutError,
        CancelledError,
        ProtocolError,
        NotSupportedError,
        InternalError,
        CudaError,
    )
}

__all__ = [
    "BanaserveError",
    "InvalidArgumentError",
    "NotFoundError",
    "AlreadyExistsError",
    "OutOfRangeError",
    "ResourceExhaustedError",
    "UnavailableError",
    "TransferTimeoutError",
    "CancelledError",
    "ProtocolError",
    "NotSupportedError",
    "InternalError",
    "CudaError",
    "STATUS_CODE_TO_ERROR",
]
