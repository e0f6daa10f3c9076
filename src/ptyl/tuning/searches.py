"""The grid searches of one :func:`ptyl.tuning.tune` call: one per prior kind, the trials they share (the off limit
runs once per setting of the training axes and head variance), the extension rounds of :mod:`ptyl.tuning.search`,
and the winner across kinds."""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from ptyl.errors import DivergenceError
from ptyl.priors.registry import PriorKind
from ptyl.training.config import TrainConfig
from ptyl.training.result import FitResult
from ptyl.tuning.result import TuneResult, edge_warnings
from ptyl.tuning.search import METRICS, axis_status, is_number, next_values, select_best
from ptyl.tuning.trials import BACKBONE_KEYS, OFF, TrialRunner, is_off_limit

if TYPE_CHECKING:
    from ptyl.tuning.grid import PriorSpec

__all__ = ["GridSearch", "winner"]


def winner(results: Mapping[str, TuneResult], key: str, sign: float) -> str:
    """The kind whose selected trial scores best (the first one listed on a tie)."""
    scored = [(k, r.selected.get(key)) for k, r in results.items()]
    finite = [(k, v) for k, v in scored if is_number(v) and math.isfinite(v)]
    if not finite:
        first = next(iter(results.values()))
        raise DivergenceError(f"every one of the {sum(len(r.table) for r in results.values())} trials diverged; "
                              f"lower the learning rates (first error: {first.table[0].get('error')})")
    return min(finite, key=lambda kv: sign * kv[1])[0]


class GridSearch:
    """The grid searches of one :func:`tune` call: trials, extension rounds, and the trials kinds share (the off
    limit runs once per setting of the training axes and head variance)."""

    def __init__(self, model_fn, validation, base: TrainConfig, *, metric: str, decades: float, flat_rtol: float,
                 max_rounds: int, objective, likelihood, collate_fn, evaluate, cache, tag_kind: bool,
                 progress: bool) -> None:
        self.model_fn, self.validation, self.base = model_fn, validation, base
        self.metric, self.decades, self.flat_rtol, self.max_rounds = metric, decades, flat_rtol, max_rounds
        self.options = dict(objective=objective, collate_fn=collate_fn, evaluate=evaluate, likelihood=likelihood)
        self.cache, self.tag_kind = cache, tag_kind
        self.key, self.sign = f"val_{metric}", 1.0 if METRICS[metric] == "min" else -1.0
        self.shared: dict[str, tuple[dict, FitResult | None]] = {}  # off-limit trials by their setting
        self.fits: dict[str, FitResult] = {}  # the best fit so far (one model kept: they can be large)
        self.best_kind: str | None = None
        self.best_score = math.inf
        self.bar = tqdm(desc="tune", disable=not progress)

    def close(self) -> None:
        self.bar.close()

    def run(self, spec: PriorSpec, axes: dict[str, list[Any]], bounds: dict[str, tuple[float, float]]) -> TuneResult:
        """The search of one kind (see :mod:`ptyl.tuning.search`)."""
        kind = str(spec.kind)
        self.bar.set_description(f"tune[{kind}]")
        runner = TrialRunner(self.model_fn, spec, self.base, self.validation, **self.options)
        initial = {k: list(v) for k, v in axes.items()}
        table: list[dict[str, Any]] = []
        path: list[dict[str, Any]] = []
        self._run_new(kind, runner, axes, table, 0)
        status: dict[str, str] = {}
        for round_ in range(1, self.max_rounds + 2):
            best_row = select_best(table, self.key, self.sign)
            if best_row is None:
                break
            moves, status = next_values(axes, best_row, bounds, table, self.key, self.decades, self.flat_rtol,
                                        initial)
            path.append({"round": round_ - 1, "grid": {k: list(v) for k, v in axes.items()},
                         "best": {k: best_row[k] for k in axes}, self.key: best_row[self.key],
                         "status": dict(status)})
            if not moves or round_ > self.max_rounds:
                break
            for axis, new in moves.items():
                finite = sorted({*[v for v in axes[axis] if v != OFF], *new})
                axes[axis] = finite + ([OFF] if OFF in axes[axis] else [])
            self._run_new(kind, runner, axes, table, round_)
        best_row = select_best(table, self.key, self.sign)
        if best_row is None:
            return TuneResult({k: v[0] for k, v in axes.items()}, table, [], None, self.metric, axes,
                              self.validation.sizes, path=path, edge_status={}, validation=self.validation.mode,
                              spec=spec)
        best = {k: best_row[k] for k in axes}
        final_status = {k: status.get(k) or axis_status(axes[k], best[k], bounds.get(k)) for k in axes}
        edges = edge_warnings({k: v for k, v in axes.items() if final_status[k] == "edge"}, best)
        for message in edges:
            warnings.warn(f"{kind}: {message}", stacklevel=4)
        return TuneResult(best, table, edges, None, self.metric, axes, self.validation.sizes, path=path,
                          edge_status=final_status, validation=self.validation.mode, spec=spec)

    def _run_new(self, kind: str, runner: TrialRunner, axes: dict[str, list[Any]], table: list[dict[str, Any]],
                 round_: int) -> None:
        done = {tuple(r[k] for k in axes) for r in table}
        for combo in itertools.product(*axes.values()):
            if combo in done:
                continue
            values = dict(zip(axes, combo, strict=True))
            if is_off_limit(values):
                row, result = self._off_limit(runner, values)
            else:
                row, result = self._trial(runner, values, {"kind": kind, **values} if self.tag_kind else values)
            self._keep_best(kind, row, result)
            table.append({**row, **values, "round": round_})
            done.add(combo)

    def _trial(self, runner: TrialRunner, values: dict[str, Any], stored_as: dict[str, Any]):
        """A trial's row (from the cache, where ``stored_as`` names it, or run) and its fit (``None`` if cached)."""
        row = self.cache.get(stored_as) if self.cache is not None else None
        result = None
        if row is None:
            row, result = runner(values)
            if self.cache is not None:
                self.cache.put(stored_as, row)
        self.bar.update(1)
        return row, result

    def _off_limit(self, runner: TrialRunner, values: dict[str, Any]):
        """The off-limit trial of these training values and head variance: run once, shared by every kind."""
        setting = {k: v for k, v in values.items() if k not in BACKBONE_KEYS}
        name = json.dumps(setting, sort_keys=True, default=str)
        if name not in self.shared:
            off = {**setting, **{k: v for k, v in values.items() if v == OFF}}
            self.shared[name] = self._trial(runner, off, {"kind": str(PriorKind.NONE), **setting} if self.tag_kind
                                            else off)
        row, result = self.shared[name]
        return {k: v for k, v in row.items() if k not in BACKBONE_KEYS}, result

    def _keep_best(self, kind: str, row: dict[str, Any], result: FitResult | None) -> None:
        """Hold only the fit of the best trial so far, over every kind (models can be large)."""
        score = row.get(self.key)
        if result is None or not is_number(score) or not math.isfinite(score):
            return
        if self.sign * score < self.best_score:
            self.best_score, self.best_kind = self.sign * score, kind
            self.fits = {kind: result}


