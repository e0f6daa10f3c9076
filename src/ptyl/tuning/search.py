"""A grid search that does not stop on an edge silently, and whose strength axis always reaches the off limit.

The prior-strength axis (``scale`` = lambda of a learned prior, ``variance`` of an isotropic one; larger is weaker)
carries the **off limit** as its last value, ``inf`` (:data:`ptyl.tuning.trials.OFF`): plain fine-tuning from the
same start, no backbone prior. So a search can never select something worse on the validation data than switching
the prior off.

After the grid has run, the best trial is found; for every *extended* axis (the strength axis by default, with the
hard log10 bounds of its :class:`~ptyl.priors.PriorKind` recipe) one value ``decades`` further out is added while
the best value is on an edge of the finite values, and the new trials (the new value crossed with every value of the
other axes) run:

* the **weak edge** (the largest finite value, or the off limit being best): extended, in steps that double beyond
  the original grid (1, 2, 4... decades), until the trial at the edge is *off* by the N-aware diagnostic
  (:func:`ptyl.autotune.prior_share`: the prior adds < 1% to every layer's curvature;
  the curve has joined the off limit) or the hard bound is reached. A curve that is worse at 1e4 but better at the
  off limit is followed all the way (no flatness rule here: a flat stretch at a strong prior says nothing about the
  off limit). Without the diagnostic (no likelihood), the flatness rule below applies at this edge too;
* the **strong edge** (the smallest value): extended until interior, the curve has gone flat beyond the original grid
  (an extension made the edge value, and it beats its inner neighbour, the other axes held at their best values, by
  less than ``flat_rtol`` = 0.5 % of the metric: the prior is saturated, frozen at its mean), or the hard bound.

Once an axis' best value is settled, a gap wider than ``decades`` next to it (left by the doubling steps) is halved,
round after round, so the selection is resolved to ``decades`` like the original grid. This repeats until no axis
moves or ``max_rounds`` rounds were made. The path (grid and best of every round) is
kept, and every axis ends in one status:

``interior``      the best value has a tried neighbour on both sides;
``off limit``     the best is the off limit, or a value the diagnostic calls off at the weak edge;
``flat``          the best value is at the strong edge beyond which the metric no longer changes (see above);
``lower bound`` / ``upper bound``   the best value is at an edge that lies at the documented hard bound;
``edge``          the best value is at an edge that was not extended (an axis without bounds, or rounds ran out):
                  a warning, recorded in ``edge_warnings``.

>>> axes = {"scale": [1.0, 10.0], "lr": [0.1]}
>>> table = [{"scale": 1.0, "lr": 0.1, "val_nll": 0.2}, {"scale": 10.0, "lr": 0.1, "val_nll": 0.3}]
>>> next_values(axes, table[0], {"scale": (-3.0, 10.0)}, table, "val_nll")
({'scale': [0.1]}, {'scale': 'edge'})
>>> next_values(axes, table[0], {"scale": (0.0, 10.0)}, table, "val_nll")
({}, {'scale': 'lower bound'})
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["FLAT_RTOL", "MAX_ROUNDS", "METRICS", "STRENGTH_AXES", "axis_status", "is_number", "next_values",
           "select_best"]


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_TOL = 1e-6  # log10 units: values are stored with 6 significant digits
FLAT_RTOL = 0.005
MAX_ROUNDS = 10  # extension and refinement rounds of one search (the default of tune and the runners)
METRICS = {"nll": "min", "ece": "min", "brier": "min", "accuracy": "max"}  # selection criteria and their sense
STRENGTH_AXES = ("scale", "variance")  # larger is weaker; the off limit is at +inf


def select_best(table: Sequence[dict[str, Any]], key: str, sign: float) -> dict[str, Any] | None:
    """The first row with the smallest ``sign * row[key]`` among rows where it is finite (``None``: no such row)."""
    finite = [r for r in table if is_number(r.get(key)) and math.isfinite(r[key])]
    return min(finite, key=lambda r: sign * r[key]) if finite else None


def axis_status(values: Sequence[Any], best: Any, bounds: tuple[float, float] | None) -> str:
    """``interior``, ``off limit``, ``lower bound``, ``upper bound`` or ``edge`` of one axis from its values alone
    (see the module docstring; :func:`next_values` refines ``edge`` with the diagnostic and the flatness rule).

    Args:
        values: the axis' values tried (``inf``: the off limit).
        best: the selected value.
        bounds: the hard log10 bounds, or ``None`` (the axis is not extended).

    Returns:
        The status.
    """
    if best == math.inf:
        return "off limit"
    numbers = [v for v in values if is_number(v) and math.isfinite(v)]
    if len(numbers) < 2 or not is_number(best) or min(numbers) < best < max(numbers):
        return "interior"
    if bounds is not None and best > 0:
        if best == min(numbers) and math.log10(best) <= bounds[0] + _TOL:
            return "lower bound"
        if best == max(numbers) and math.log10(best) >= bounds[1] - _TOL:
            return "upper bound"
    return "edge"


def _row_at(table: Sequence[dict[str, Any]], best: Mapping[str, Any], axes: Sequence[str], axis: str,
            value: float) -> dict[str, Any] | None:
    """The trial with ``axis = value`` and every other axis at its best value."""
    others = {k: best[k] for k in axes if k != axis}
    return next((r for r in table if r.get(axis) == value and all(r.get(k) == v for k, v in others.items())), None)


def _score(row: dict[str, Any] | None, key: str) -> float | None:
    if row is None or not is_number(row.get(key)) or not math.isfinite(row[key]):
        return None
    return float(row[key])


def _is_flat(table: Sequence[dict[str, Any]], best: Mapping[str, Any], axes: Sequence[str], axis: str,
             values: Sequence[float], key: str, rtol: float) -> bool:
    """Whether the edge value ``best[axis]`` beats its inner neighbour by less than ``rtol`` (relative)."""
    inner = sorted(values)[1] if best[axis] == min(values) else sorted(values)[-2]
    edge = _score(_row_at(table, best, axes, axis, best[axis]), key)
    neighbour = _score(_row_at(table, best, axes, axis, inner), key)
    if edge is None or neighbour is None:
        return False
    return abs(neighbour - edge) <= rtol * max(abs(edge), 1e-12)


def next_values(axes: Mapping[str, Sequence[Any]], best: Mapping[str, Any],
                extend: Mapping[str, tuple[float, float]], table: Sequence[dict[str, Any]] = (), key: str = "val_nll",
                decades: float = 1.0, flat_rtol: float = FLAT_RTOL, initial: Mapping[str, Sequence[Any]] | None = None
                ) -> tuple[dict[str, list[float]], dict[str, str]]:
    """The values one extension round adds.

    Args:
        axes: the values tried per axis (a strength axis may hold ``inf``, the off limit).
        best: the selected row (its axis values).
        extend: hard log10 bounds of the axes that may be extended.
        table: the trials so far (for the diagnostic at the weak edge and the flatness test).
        key: the selection metric's column.
        decades: how far beyond the edge the new value lies (log10 units); the weak edge's steps double with every
            extension beyond the original grid (1, 2, 4... decades: the off limit can be many decades away), and
            once the best value is settled, the gaps next to it that are wider than ``decades`` are halved.
        flat_rtol: the flatness tolerance (0: never flat).
        initial: the grid before any extension: an edge of it is always extended at least once (flatness is judged
            only beyond the original grid).

    Returns:
        ``({axis: [new values]}, {axis: status now})`` for the extended axes; a new value is never past its bound
        (the last step is shortened to land on it).
    """
    moves, status = {}, {}
    names = list(axes)
    for axis, (lo, hi) in extend.items():
        values = [v for v in axes.get(axis, ()) if is_number(v) and math.isfinite(v)]
        chosen = best.get(axis)
        if not values or not is_number(chosen):
            status[axis] = "interior"
            continue
        weak = axis in STRENGTH_AXES and (chosen == math.inf or chosen == max(values))
        if weak:
            state, edge_value = _weak_edge_state(table, best, names, axis, values, hi, key, flat_rtol, initial)
        else:
            state, edge_value = axis_status(values, chosen, (lo, hi)), chosen
            extended = initial is None or chosen not in initial.get(axis, ())
            if state == "edge" and flat_rtol > 0 and extended and \
                    _is_flat(table, best, names, axis, values, key, flat_rtol):
                state = "flat"
        status[axis] = state
        if state != "edge" or edge_value <= 0:
            gaps = _refinements(values, chosen, decades)
            if gaps:
                moves[axis] = gaps
            continue
        edge = math.log10(edge_value)
        if weak:
            start = [v for v in (initial or {}).get(axis, values) if is_number(v) and math.isfinite(v)] or values
            beyond = sum(v > max(start) for v in values)
            target = min(hi, edge + decades * 2 ** beyond)
        else:
            target = max(lo, edge - decades) if edge_value == min(values) else min(hi, edge + decades)
        moves[axis] = [float(f"{10.0 ** target:.6g}")]
    return moves, status


def _refinements(values: Sequence[float], chosen: Any, decades: float) -> list[float]:
    """Log-midpoints (whole multiples of ``decades``) of the gaps wider than ``decades`` next to the chosen value."""
    if not is_number(chosen) or not math.isfinite(chosen) or chosen <= 0:
        return []
    ordered = sorted(v for v in values if v > 0)
    i = ordered.index(chosen)
    out = []
    for neighbour in ordered[max(i - 1, 0):i] + ordered[i + 1:i + 2]:
        a, b = math.log10(chosen), math.log10(neighbour)
        if abs(a - b) > decades + _TOL:
            middle = (a + b) / 2
            middle = a + decades * round((middle - a) / decades) if decades > 0 else middle
            if abs(middle - a) > _TOL and abs(middle - b) > _TOL:
                out.append(float(f"{10.0 ** middle:.6g}"))
    return out


def _weak_edge_state(table, best, names, axis, values, hi, key, flat_rtol, initial) -> tuple[str, float]:
    """The status at the weak end of a strength axis, and the edge value an extension starts from."""
    top = max(values)
    row = _row_at(table, best, names, axis, top)
    off = row.get("prior_off") if row is not None else None
    if off:
        return "off limit", top
    if math.log10(top) >= hi - _TOL:
        return ("off limit" if best.get(axis) == math.inf else "upper bound"), top
    if off is None and best.get(axis) != math.inf:  # no diagnostic: the flatness rule decides, as at the strong end
        extended = initial is None or top not in initial.get(axis, ())
        if flat_rtol > 0 and extended and _is_flat(table, best, names, axis, values, key, flat_rtol):
            return "flat", top
    return "edge", top
