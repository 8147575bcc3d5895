# SPDX-License-Identifier: Apache-2.0
"""Probing the running SGLang for the internals a feature needs (see :mod:`.table`).

An :class:`Internal` names one SGLang module, object (class, function, constant, method) or
instance attribute. :func:`probe` checks it against the installed SGLang without running any of
it: objects are imported and looked up (and, where it matters, their parameters compared);
instance attributes, which do not exist on the class, are looked up as a field or annotation of
the class or a base, or as an assignment ``self.NAME =`` in the source file of the class or of a
base. A few can only be
checked on the live object (``contact``); the probe table shows them as such and the feature
checks them with :func:`require_attr` at first contact.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

#: the SGLang release these adapters were written and tested against
TESTED_SGLANG = "0.5.23"

MODULE, OBJECT, MEMBER, CONTACT, SOURCE = "module", "object", "member", "contact", "source"


@dataclass(frozen=True)
class Internal:
    """One SGLang internal a feature depends on.

    ``path`` is dotted: a module (``MODULE``), a module-level name or a class attribute
    (``OBJECT``: ``pkg.mod.Class.method``), for ``MEMBER``/``CONTACT`` the class whose
    instances carry ``attr``, for ``SOURCE`` a module or class whose code calls or reads the
    name ``attr`` that we provide (a method of our subclass SGLang calls, a module global we
    set). ``params``: parameter names the object's signature must have.
    ``hook``: the feature wraps this target through SGLang's ``HookRegistry``. ``optional``:
    absence is reported but does not refuse the feature (e.g. a backend SGLang ships only
    with an extra package).
    """

    path: str
    kind: str = OBJECT
    attr: str = ""
    params: tuple[str, ...] = ()
    hook: bool = False
    optional: bool = False
    use: str = ""  # what the feature does with it (read, write, subclass, call...)
    #: "launcher": used (and probed at load) only in the launcher process (the HTTP server)
    where: str = "any"

    @property
    def name(self) -> str:
        return f"{self.path}.{self.attr}" if self.attr else self.path


@dataclass(frozen=True)
class Result:
    internal: Internal
    found: bool
    detail: str = ""  # why not found, or how it was checked

    @property
    def status(self) -> str:
        if self.found:
            return "found" if self.internal.kind != CONTACT else "at first contact"
        return "absent (optional)" if self.internal.optional else "MISSING"


def sglang_version() -> str:
    try:
        from importlib.metadata import version

        return version("sglang")
    except Exception:  # noqa: BLE001 - not installed, or a source tree
        return "not installed"


def resolve(path: str) -> Any:
    """Imports the longest module prefix of ``path`` and walks the rest as attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        mod_name = ".".join(parts[:i])
        try:
            obj: Any = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and not mod_name.startswith(exc.name) and exc.name != mod_name:
                raise  # the module exists but imports something missing
            continue
        for attr in parts[i:]:
            try:
                obj = (
                    inspect.getattr_static(obj, attr)
                    if isinstance(obj, type)
                    else getattr(obj, attr)
                )
            except AttributeError:
                raise AttributeError(f"{'.'.join(parts[:i])}: no attribute {attr!r}") from None
            if isinstance(obj, (staticmethod, classmethod)):
                obj = obj.__func__
        return obj
    raise ModuleNotFoundError(f"no module named {parts[0]!r}")


@functools.cache
def _assignment_pattern(attr: str) -> re.Pattern[str]:
    """An assignment to ``self.<attr>`` in source: ``self.x = ``, ``self.x: T = ``,
    ``self.a, self.x = `` and ``(self.a,\n self.x,\n) = ``."""
    n = re.escape(attr)
    lhs = r"[\w \t,.]*"  # more targets of the same statement, on one line
    return re.compile(
        rf"(self\.{n}\s*(:[^=\n]+)?=(?!=))"
        rf"|(self\.{n}\s*,{lhs}=(?!=))"
        rf"|(self\.\w+\s*,{lhs}\bself\.{n}\s*(,{lhs})?=(?!=))"
        rf"|(\(\s*([\w.]+\s*,\s*)*self\.{n}\s*(,\s*[\w.]+\s*)*,?\s*\)\s*=(?!=))"
    )


@functools.cache
def _file_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _class_source(cls: type) -> str:
    """The source of the module defining ``cls`` (the whole file: ``inspect.getsource`` of a
    class parses its module, seconds for SGLang's scheduler; an assignment elsewhere in the same
    file is rare enough to accept)."""
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:
        return ""
    return _file_text(path) if path else ""


def _declares(cls: type, attr: str) -> str | None:
    """Where ``attr`` is declared for instances of ``cls`` (class, base or source), or None."""
    pat = _assignment_pattern(attr)
    for klass in inspect.getmro(cls):
        if klass is object:
            continue
        if attr in vars(klass) or attr in getattr(klass, "__annotations__", {}):
            return f"{klass.__name__} (class)"
        if attr in getattr(klass, "__struct_fields__", ()) or attr in getattr(
            klass, "__dataclass_fields__", {}
        ):
            return f"{klass.__name__} (field)"
        if pat.search(_class_source(klass)):
            return f"{klass.__name__} (source)"
    return None


def probe(internal: Internal) -> Result:
    try:
        if internal.kind == MODULE:
            importlib.import_module(internal.path)
            return Result(internal, True, "imported")
        if internal.kind == SOURCE:
            owner = resolve(internal.path)
            if hasattr(owner, internal.attr):
                return Result(internal, True, "defined")
            text = inspect.getsource(owner)
            if re.search(rf"\b{re.escape(internal.attr)}\b", text):
                return Result(internal, True, "named in its source")
            return Result(internal, False, f"{internal.attr!r} not used by {internal.path}")
        obj = resolve(internal.path)
        if internal.kind == OBJECT:
            if internal.params:
                target = obj.__init__ if isinstance(obj, type) else obj
                try:
                    names = set(inspect.signature(target).parameters)
                except (TypeError, ValueError):
                    return Result(internal, False, "signature cannot be read")
                lacking = [p for p in internal.params if p not in names]
                if lacking:
                    return Result(internal, False, f"parameters {lacking} not in the signature")
            return Result(internal, True)
        if not isinstance(obj, type):
            return Result(internal, False, f"{internal.path} is not a class")
        if internal.kind == CONTACT:
            return Result(internal, True, "class found; attribute checked on the live object")
        where = _declares(obj, internal.attr)
        if where is None:
            return Result(internal, False, f"no attribute {internal.attr!r} declared")
        return Result(internal, True, where)
    except Exception as exc:  # noqa: BLE001 - any failure to import/resolve is a finding
        return Result(internal, False, f"{type(exc).__name__}: {exc}")


def refusal(feature: str, results: list[Result]) -> str | None:
    """The message a feature refuses to start with, or None when nothing it needs is missing."""
    missing = [r for r in results if not r.found and not r.internal.optional]
    if not missing:
        return None
    names = "; ".join(f"{r.internal.name} ({r.detail})" for r in missing)
    return (
        f"banaserve feature {feature!r} refuses to start: SGLang internal(s) missing or changed: "
        f"{names}. Installed SGLang {sglang_version()}; banaserve was tested with SGLang "
        f"{TESTED_SGLANG}."
    )


class ContactError(RuntimeError):
    """An internal checked on the live object is not there (raised by :func:`require_attr`)."""


def require_attr(obj: Any, attr: str, feature: str) -> Any:
    """``getattr(obj, attr)`` for an internal that can only be checked on the live object; a
    missing attribute raises :class:`ContactError` naming it, the feature and the versions."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise ContactError(
            f"banaserve feature {feature!r}: SGLang internal {type(obj).__name__}.{attr} is "
            f"missing. Installed SGLang {sglang_version()}; tested with {TESTED_SGLANG}."
        ) from None
