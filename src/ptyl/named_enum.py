"""The base of ptyl's registries (prior kinds, inferences, tuning strategies, starts): string enums whose members
compare equal to their names and are looked up from user input by one :meth:`NamedEnum.parse`."""

from __future__ import annotations

import re
from enum import Enum
from typing import TypeVar

from ptyl.errors import ConfigError

__all__ = ["NamedEnum"]

E = TypeVar("E", bound="NamedEnum")


class NamedEnum(str, Enum):
    """A ``str`` enum: ``str(member)`` and ``f"{member}"`` give its name, ``member == "name"`` holds."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)

    @classmethod
    def parse(cls: type[E], value: str | E, what: str | None = None) -> E:
        """The member named ``value``.

        Args:
            value: a member or its name (case-insensitive, surrounding blanks ignored).
            what: how an error message names the value (default: the class name in words, ``"prior kind"``).

        Returns:
            The member.

        Raises:
            ConfigError: an unknown name, listing the choices.
        """
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            label = what or re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__).lower()
            raise ConfigError(f"unknown {label} {value!r}; choose one of {tuple(str(m) for m in cls)}") from None
