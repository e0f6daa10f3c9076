"""Value checks shared by priors, posteriors and prior files."""

from __future__ import annotations

import torch

from ptyl.errors import InvalidValueError


def check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise InvalidValueError(f"{what} holds {bad} NaN/Inf value(s)")


def check_positive(t: torch.Tensor, what: str) -> None:
    check_finite(t, what)
    if (t <= 0).any():
        bad = int((t <= 0).sum())
        raise InvalidValueError(f"{what} holds {bad} non-positive variance value(s) (min {float(t.min()):.3g})")
