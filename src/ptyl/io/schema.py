"""A small declarative schema for the JSON headers of ptyl files (prior, weights, samples, checkpoint files).

A header read from disk is untrusted: it may be valid JSON of the wrong shape. :func:`validate_header` checks every
field's type and range against a schema built from the specs below and raises one ptyl error naming the file and the
field (``parameters[1].shape[0]``), so no ``KeyError`` / ``TypeError`` / ``AttributeError`` can escape later::

    PARAMETER = Object(required={"name": String(nonempty=True), "shape": ListOf(Integer(minimum=0))})
    HEADER = Object(required={"rank": Integer(minimum=0), "parameters": ListOf(PARAMETER, min_length=1,
                                                                               unique_key="name")},
                    optional={"source": String()})
    meta = validate_header(read_json_header(path, "ptyl"), HEADER, path)

Booleans are never integers or numbers here (JSON ``true`` is not ``1``); numbers must be finite; integers are
bounded to int64 so they fit a tensor shape. Unknown fields are allowed unless ``Object(extra=False)``: files carry
free-form user metadata.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ptyl.errors import PriorFileError, PtylError

__all__ = [
    "Anything", "Boolean", "Integer", "ListOf", "MapOf", "Nullable", "Number", "Object", "SchemaError", "Spec",
    "String", "validate_header",
]

INT64_MAX = 2**63 - 1


class SchemaError(Exception):
    """A value does not match its spec; ``where`` is the field path (``""`` for the header itself)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}" if where else message)
        self.where, self.message = where, message


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: Any) -> str:
    """A JSON value for an error message: ``null``, ``a boolean (true)``, ``a string '2'``, ``a list [1, 2]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return f"{names.get(type(value), type(value).__name__)} {_show(value)}"


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


class Spec:
    """Base class: ``check(value, where)`` raises :class:`SchemaError` or returns ``None``."""

    description = "a value"

    def check(self, value: Any, where: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def fail(self, value: Any, where: str) -> None:
        raise SchemaError(where, f"must be {self.description}, got {describe(value)}")


@dataclass(frozen=True)
class Anything(Spec):
    description = "any JSON value"

    def check(self, value: Any, where: str) -> None:
        pass


@dataclass(frozen=True)
class Boolean(Spec):
    description = "true or false"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, bool):
            self.fail(value, where)


@dataclass(frozen=True)
class Integer(Spec):
    """An integer (not a boolean, not ``2.0``) in ``[minimum, maximum]``."""

    minimum: int | None = None
    maximum: int = INT64_MAX
    choices: tuple[int, ...] | None = None

    @property
    def description(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        low = "" if self.minimum is None else f" >= {self.minimum}"
        high = "" if self.maximum == INT64_MAX else f" <= {self.maximum}"
        return f"an integer{low}{' and' if low and high else ''}{high}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(value, where)
        if self.choices is not None and value not in self.choices:
            self.fail(value, where)
        if (self.minimum is not None and value < self.minimum) or value > self.maximum:
            self.fail(value, where)


@dataclass(frozen=True)
class Number(Spec):
    """A finite number (integers accepted, booleans not), ``> minimum`` when ``exclusive`` else ``>= minimum``."""

    minimum: float | None = None
    exclusive: bool = False

    @property
    def description(self) -> str:
        bound = "" if self.minimum is None else f" {'>' if self.exclusive else '>='} {self.minimum:g}"
        return f"a finite number{bound}"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.fail(value, where)
        if self.minimum is not None and (value <= self.minimum if self.exclusive else value < self.minimum):
            self.fail(value, where)


@dataclass(frozen=True)
class String(Spec):
    choices: tuple[str, ...] | None = None
    nonempty: bool = False
    pattern: str | None = None  # a full-match regular expression

    @property
    def description(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(map(repr, self.choices))
        if self.pattern is not None:
            return f"a string matching {self.pattern!r}"
        return "a non-empty string" if self.nonempty else "a string"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, str):
            self.fail(value, where)
        if self.choices is not None and value not in self.choices:
            self.fail(value, where)
        if self.nonempty and not value:
            self.fail(value, where)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            self.fail(value, where)


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    @property
    def description(self) -> str:
        return f"null or {self.inner.description}"

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.inner.check(value, where)


@dataclass(frozen=True)
class ListOf(Spec):
    """A list whose items match ``item``; ``unique_key`` names an item field that must not repeat."""

    item: Spec
    min_length: int = 0
    unique_key: str | None = None

    @property
    def description(self) -> str:
        return "a list" if self.min_length == 0 else f"a list of at least {self.min_length} item(s)"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) < self.min_length:
            self.fail(value, where)
        seen: dict[Any, int] = {}
        for i, item in enumerate(value):
            self.item.check(item, _join(where, i))
            if self.unique_key is not None:
                key = item[self.unique_key]
                if key in seen:
                    raise SchemaError(_join(_join(where, i), self.unique_key),
                                      f"{_show(key)} repeats {_join(_join(where, seen[key]), self.unique_key)}")
                seen[key] = i


@dataclass(frozen=True)
class MapOf(Spec):
    """An object with arbitrary string keys whose values match ``value``."""

    value: Spec
    description = "an object"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, where)
        for key, item in value.items():
            self.value.check(item, _join(where, key))


@dataclass(frozen=True)
class Object(Spec):
    """A JSON object with ``required`` and ``optional`` fields; ``checks`` are cross-field rules
    ``fn(obj) -> None | (field, message)`` run after every field passed."""

    required: Mapping[str, Spec] = field(default_factory=dict)
    optional: Mapping[str, Spec] = field(default_factory=dict)
    extra: bool = True
    checks: Sequence[Callable[[dict], tuple[str, str] | None]] = ()
    description = "an object"

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.fail(value, where)
        for key, spec in self.required.items():
            if key not in value:
                raise SchemaError(_join(where, key), "is missing")
            spec.check(value[key], _join(where, key))
        for key, spec in self.optional.items():
            if key in value:
                spec.check(value[key], _join(where, key))
        if not self.extra:
            unknown = sorted(set(value) - set(self.required) - set(self.optional))
            if unknown:
                raise SchemaError(_join(where, unknown[0]), f"is not a known field (known: "
                                                           f"{', '.join(sorted({**self.required, **self.optional}))})")
        for rule in self.checks:
            problem = rule(value)
            if problem is not None:
                raise SchemaError(_join(where, problem[0]), problem[1])

    def extended(self, *, required: Mapping[str, Spec] | None = None, optional: Mapping[str, Spec] | None = None,
                 checks: Sequence[Callable[[dict], tuple[str, str] | None]] = ()) -> Object:
        """A copy with more fields and rules (e.g. version 2 of a header = version 1 plus checksums)."""
        return replace(self, required={**self.required, **(required or {})},
                       optional={**self.optional, **(optional or {})}, checks=(*self.checks, *checks))


def validate_header(meta: Any, schema: Spec, path: str | Path, *, entry: str = "ptyl",
                    error: type[PtylError] = PriorFileError) -> Any:
    """Check a header read from ``path`` against ``schema``; returns it unchanged or raises ``error`` naming the file
    and the field, e.g. ``p.safetensors: metadata field 'rank' must be an integer >= 0, got a string '2'``."""
    try:
        schema.check(meta, "")
    except SchemaError as err:
        if err.where:
            raise error(f"{path}: metadata field {err.where!r} {err.message}") from None
        raise error(f"{path}: the {entry!r} metadata entry {err.message}") from None
    return meta
