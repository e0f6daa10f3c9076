"""Argument checks in one place: every public function validates its inputs through these and raises a
:class:`ptyl.errors.PtylError` subclass naming the argument (torchmetrics-style, one function per kind of check).

>>> check_positive_number(0.5, "lr")
0.5
>>> check_choice("nll", ("nll", "ece"), "metric")
'nll'
>>> check_int(0, "epochs", minimum=1)
Traceback (most recent call last):
...
ptyl.errors.InvalidValueError: epochs must be an integer >= 1, got 0
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

import torch

from ptyl.errors import ConfigError, InvalidValueError

__all__ = [
    "check_choice",
    "check_finite",
    "check_fraction",
    "check_int",
    "check_nonnegative_number",
    "check_positive",
    "check_positive_number",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
]

T = TypeVar("T")


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`InvalidValueError` if ``tensor`` holds NaN or Inf.

    Args:
        tensor: any tensor.
        what: how the message names it, e.g. ``"mean of 'fc.weight'"``.
    """
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise InvalidValueError(f"{what} holds {bad} NaN/Inf value(s)")


def check_positive(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`InvalidValueError` unless every entry of ``tensor`` is finite and > 0 (a variance)."""
    check_finite(tensor, what)
    if (tensor <= 0).any():
        bad = int((tensor <= 0).sum())
        raise InvalidValueError(f"{what} holds {bad} non-positive variance value(s) (min {float(tensor.min()):.3g})")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_positive_number(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite number > 0, else :class:`InvalidValueError` naming ``name``."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise InvalidValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative_number(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite number >= 0, else :class:`InvalidValueError` naming ``name``."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise InvalidValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_fraction(value: Any, name: str, *, closed_right: bool = False) -> float:
    """``value`` as a float if it lies in ``[0, 1)`` (``[0, 1]`` with ``closed_right``)."""
    ok = _is_real(value) and 0 <= value and (value <= 1 if closed_right else value < 1)
    if not ok:
        raise InvalidValueError(f"{name} must be in [0, 1{']' if closed_right else ')'}, got {value!r}")
    return float(value)


def check_int(value: Any, name: str, *, minimum: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise InvalidValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_choice(value: T, choices: Iterable[Any], name: str) -> T:
    """``value`` if it is one of ``choices``, else :class:`ConfigError` listing them."""
    options = tuple(choices)
    if value not in options:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {tuple(str(c) for c in options)}")
    return value


# --- command-line value types (argparse ``type=``): the same checks as text ------------------------------------------
def positive_int(text: str) -> int:
    """An integer >= 1 (an ``argparse`` type)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (an ``argparse`` type)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (an ``argparse`` type)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    """A number >= 0 (an ``argparse`` type)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
