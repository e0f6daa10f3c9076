"""A grid search that does not stop on an edge silently.

After the grid has run, the best trial is found; for every *extended* axis (the prior-strength axis by default,
with the hard log10 bounds of its :class:`~ptyl.priors.PriorKind` recipe) whose best value is the smallest or the
largest of the axis, one value ``decades`` further out in that direction is added and the new trials (the new value
crossed with every value of the other axes) run. This repeats until the best value of every extended axis is
interior, or the curve has gone flat beyond the original grid (an extension made the edge value, and it beats its
inner neighbour, the other axes held at their best values, by less than ``flat_rtol`` = 0.5 % of the metric: the
prior is saturated -- frozen at its mean, or off -- and further values cannot change the selection materially), or
the next value would pass the axis' hard bound, or ``max_rounds`` extensions were made. The path (grid and best of
every round) is kept, and every axis ends in one status:

``interior``      the best value has a tried neighbour on both sides;
``flat``          the best value is at an edge beyond which the metric no longer changes (see above);
``lower bound`` / ``upper bound``   the best value is at an edge that lies at the documented hard bound;
``edge``          the best value is at an edge that was not extended (an axis without bounds, or rounds ran out):
                  a warning, recorded in ``edge_warnings``.

>>> axes = {"scale": [1.0, 10.0], "lr": [0.1]}
>>> table = [{"scale": 1.0, "lr": 0.1, "val_nll": 0.2}, {"scale": 10.0, "lr": 0.1, "val_nll": 0.3}]
>>> next_values(axes, table[0], {"scale": (-3.0, 10.0)}, table, "val_nll")
({'scale': 0.1}, {'scale': 'edge'})
>>> next_values(axes, table[0], {"scale": (0.0, 10.0)}, table, "val_nll")
({}, {'scale': 'lower bound'})
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ptyl.tuning.result import is_number

__all__ = ["FLAT_RTOL", "axis_status", "next_values", "select_best"]

_TOL = 1e-6  # log10 units: values are stored with 6 significant digits
FLAT_RTOL = 0.005


def select_best(table: Sequence[dict[str, Any]], key: str, sign: float) -> dict[str, Any] | None:
    """The first row with the smallest ``sign * row[key]`` among rows where it is finite (``None``: no such row)."""
    finite = [r for r in table if is_number(r.get(key)) and math.isfinite(r[key])]
    return min(finite, key=lambda r: sign * r[key]) if finite else None


def axis_status(values: Sequence[Any], best: Any, bounds: tuple[float, float] | None) -> str:
    """``interior``, ``lower bound``, ``upper bound`` or ``edge`` (see the module docstring) for one axis.

    Args:
        values: the axis' values tried.
        best: the selected value.
        bounds: the hard log10 bounds, or ``None`` (the axis is not extended).

    Returns:
        The status.
    """
    numbers = [v for v in values if is_number(v)]
    if len(numbers) < 2 or not is_number(best) or min(numbers) < best < max(numbers):
        return "interior"
    if bounds is not None and best > 0:
        if best == min(numbers) and math.log10(best) <= bounds[0] + _TOL:
            return "lower bound"
        if best == max(numbers) and math.log10(best) >= bounds[1] - _TOL:
            return "upper bound"
    return "edge"


def _is_flat(table: Sequence[dict[str, Any]], best: Mapping[str, Any], axes: Sequence[str], axis: str,
             values: Sequence[float], key: str, rtol: float) -> bool:
    """Whether the edge value ``best[axis]`` beats its inner neighbour by less than ``rtol`` (relative)."""
    inner = sorted(values)[1] if best[axis] == min(values) else sorted(values)[-2]
    others = {k: best[k] for k in axes if k != axis}

    def score(value: float) -> float | None:
        rows = [r for r in table if r.get(axis) == value and all(r.get(k) == v for k, v in others.items())]
        scores = [r[key] for r in rows if is_number(r.get(key)) and math.isfinite(r[key])]
        return scores[0] if scores else None

    edge, neighbour = score(best[axis]), score(inner)
    if edge is None or neighbour is None:
        return False
    return abs(neighbour - edge) <= rtol * max(abs(edge), 1e-12)


def next_values(axes: Mapping[str, Sequence[Any]], best: Mapping[str, Any],
                extend: Mapping[str, tuple[float, float]], table: Sequence[dict[str, Any]] = (), key: str = "val_nll",
                decades: float = 1.0, flat_rtol: float = FLAT_RTOL, initial: Mapping[str, Sequence[Any]] | None = None
                ) -> tuple[dict[str, float], dict[str, str]]:
    """The values one extension round adds.

    Args:
        axes: the values tried per axis.
        best: the selected row (its axis values).
        extend: hard log10 bounds of the axes that may be extended.
        table: the trials so far (for the flatness test).
        key: the selection metric's column.
        decades: how far beyond the edge the new value lies (log10 units).
        flat_rtol: the flatness tolerance (0: never flat).
        initial: the grid before any extension: an edge of it is always extended at least once (flatness is judged
            only beyond the original grid).

    Returns:
        ``({axis: new value}, {axis: status now})`` for the extended axes; a new value is never past its bound
        (the last step is shortened to land on it).
    """
    moves, status = {}, {}
    for axis, (lo, hi) in extend.items():
        values = [v for v in axes.get(axis, ()) if is_number(v)]
        state = axis_status(values, best.get(axis), (lo, hi))
        extended = initial is None or best.get(axis) not in initial.get(axis, ())
        if state == "edge" and flat_rtol > 0 and extended and \
                _is_flat(table, best, list(axes), axis, values, key, flat_rtol):
            state = "flat"
        status[axis] = state
        if state != "edge" or best[axis] <= 0:
            continue
        edge = math.log10(best[axis])
        target = max(lo, edge - decades) if best[axis] == min(values) else min(hi, edge + decades)
        moves[axis] = float(f"{10.0 ** target:.6g}")
    return moves, status
