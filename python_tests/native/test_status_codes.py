# SPDX-License-Identifier: Apache-2.0
"""The C++ status codes and banaserve_ext.errors agree, driven from what _core exports: every
non-OK StatusCode has exactly one exception class with its name and value, every class of
banaserve_ext.errors has its code in the core, and the bindings' one translation point raises
that class. A code added on either side alone fails here."""

from __future__ import annotations

import inspect

import pytest

from banaserve_ext import _core, errors
from banaserve_ext.errors import BanaserveError, InternalError, InvalidArgumentError


def _cpp_codes() -> dict[str, int]:
    codes = dict(_core.status_codes())
    assert codes.pop("Ok") == 0
    return codes


def _python_classes() -> list[type[BanaserveError]]:
    """Every exception class banaserve_ext.errors defines, the base excepted."""
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, BanaserveError)
        and cls is not BanaserveError
        and cls.__module__ == errors.__name__
    ]


def test_core_codes_are_unique_and_contiguous() -> None:
    codes = _cpp_codes()
    assert codes, "the core reports no status codes"
    assert sorted(codes.values()) == list(range(1, len(codes) + 1))


def test_every_core_code_has_exactly_one_class_with_its_name_and_value() -> None:
    classes = _python_classes()
    for name, value in _cpp_codes().items():
        matches = [c for c in classes if c.code == value]
        assert len(matches) == 1, f"StatusCode {name}={value}: classes {matches}"
        (cls,) = matches
        assert cls.status_name == name, f"{cls.__name__} names {cls.status_name}, core {name}"
        assert errors.STATUS_CODE_TO_ERROR[value] is cls


def test_every_class_maps_back_to_a_core_code() -> None:
    codes = _cpp_codes()
    for cls in _python_classes():
        assert cls.status_name in codes, f"{cls.__name__}: no StatusCode {cls.status_name}"
        assert codes[cls.status_name] == cls.code, cls.__name__
    assert set(errors.STATUS_CODE_TO_ERROR) == set(codes.values())
    assert set(errors.STATUS_CODE_TO_ERROR.values()) == set(_python_classes())
    assert all(name in errors.__all__ for name in (c.__name__ for c in _python_classes()))


def test_the_bindings_raise_the_class_of_each_code() -> None:
    for name, value in _cpp_codes().items():
        with pytest.raises(BanaserveError) as info:
            _core.raise_status(value, f"a {name}")
        assert type(info.value) is errors.STATUS_CODE_TO_ERROR[value]
        assert str(info.value) == f"raise_status: a {name}"
    assert _core.raise_status(0, "fine") is None
    # a code the table lacks still surfaces, as InternalError (never a bare RuntimeError)
    with pytest.raises(InternalError, match="from the future"):
        _core.raise_status(max(_cpp_codes().values()) + 1, "from the future")
    with pytest.raises(InvalidArgumentError, match="uint8"):
        _core.raise_status(256, "too big")
