"""Value checks shared by priors, posteriors and prior files (the per-tensor ones are defined once, in
:mod:`ptyl.validation`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ptyl.validation import check_finite, check_positive

__all__ = ["check_finite", "check_flat", "check_positive"]


def check_flat(
    flat: torch.Tensor,
    what: str,
    names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    positive: bool = False,
) -> None:
    """Check a flat buffer [..., P] laid out in ``names`` order with one reduction; on failure, re-check tensor by
    tensor so the error names the parameter (``what`` of ``name``)."""
    ok = torch.isfinite(flat).all() & ((flat > 0).all() if positive else True)
    if bool(ok):
        return
    check = check_positive if positive else check_finite
    start = 0
    for name, shape in zip(names, shapes, strict=False):
        size = math.prod(shape)
        check(flat[..., start:start + size], f"{what} of {name!r}")
        start += size
