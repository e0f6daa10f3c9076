"""What tuning returns -- a grid search (the table of trials, the choice, edge warnings, the refit) or an automatic
strategy (the per-epoch path of the learned values, the trained model) -- with JSON and a plot."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ptyl.errors import ConfigError
from ptyl.io.atomic import atomic_write
from ptyl.metrics.results import save_json, to_jsonable
from ptyl.training.result import FitResult
from ptyl.tuning.registry import TuningStrategy
from ptyl.tuning.search import is_number, select_best

__all__ = ["TuneResult", "edge_warnings"]


def edge_warnings(grid: dict[str, list[Any]], best: dict[str, Any]) -> list[str]:
    """One message per numeric axis (2+ finite values) whose chosen value is its smallest or largest finite one (the
    off limit, ``inf``, is not an edge)."""
    messages = []
    for key, values in grid.items():
        if not all(is_number(v) for v in values):
            continue
        values = [v for v in values if math.isfinite(v)]
        if len(values) < 2:
            continue
        lo, hi = min(values), max(values)
        if best[key] in (lo, hi):
            side = "smallest" if best[key] == lo else "largest"
            messages.append(f"best {key}={best[key]:g} is the {side} value of its grid [{lo:g}, {hi:g}]: "
                            "the optimum may lie outside it, extend the grid")
    return messages


@dataclass
class TuneResult:
    """Outcome of :func:`ptyl.tuning.tune`.

    Attributes:
        best: the chosen value of every grid axis; automatic strategies: the learned values as keyword arguments of
            :func:`ptyl.priors.make_prior` (``scale`` / ``variance``, ``eps``, ``head_variance``; block: ``scale``
            per block).
        table: one row per trial: the axis values, ``val_nll``, ``val_accuracy``, ``val_ece``, ``val_brier``
            (``inf``/``nan`` and an ``error`` message if training diverged); automatic strategies: one row per
            epoch (loss, the hyper-parameters, the strategy's objective: ``log_evidence``, ``deelbo``, ``val_nll``).
        edge_warnings: one message per numeric axis whose best value lies at an edge of its grid.
        final: the model of the chosen values trained on all n examples: the selected trial itself with a
            validation pool, else the refit (``None`` with ``refit=False``); automatic: the trained model.
        metric: the selection criterion (automatic: the strategy's objective, e.g. ``log_evidence``).
        grid: the axes searched (extensions included).
        split: sizes of the fit / validation parts and of the whole set.
        path: one entry per round of the search: the grid, the best values, the best validation score and the
            status of every extended axis; automatic strategies: their own record of their updates (the
            hypergradient: one entry per hyper step).
        edge_status: per axis: ``interior``, ``lower bound`` / ``upper bound`` (at the documented hard bound) or
            ``edge`` (left on an edge: a warning).
        validation: ``"pool"``, ``"cv"`` or ``"split"`` (automatic strategies: ``"pool"`` if they learn from one,
            else ``"none"``).
        strategy: the :class:`~ptyl.tuning.registry.TuningStrategy` name.
        search_cost_s: seconds spent choosing (grid: every trial, not the refit; automatic: the run and any
            confirmation trials).
        objective: automatic: the strategy's objective at the end (e.g. the selected log evidence).
        settings: automatic: the strategy's settings (its :class:`~ptyl.tuning.automatic.AutomaticSettings`).
        spec: the :class:`~ptyl.tuning.PriorSpec` searched (its kind; not in :meth:`to_dict`).
        kind: with ``tune(..., kinds=...)``: the selected kind, ``"none"`` when the off limit (plain fine-tuning)
            won; else ``None``.
        kinds: with ``kinds``: every compared kind's search (kind -> :class:`TuneResult`).
    """

    best: dict[str, Any]
    table: list[dict[str, Any]]
    edge_warnings: list[str] = field(default_factory=list)
    final: FitResult | None = None
    metric: str = "nll"
    grid: dict[str, list[Any]] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)
    path: list[dict[str, Any]] = field(default_factory=list)
    edge_status: dict[str, str] = field(default_factory=dict)
    validation: str = "split"
    strategy: str = TuningStrategy.GRID.value
    search_cost_s: float = math.nan
    objective: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    spec: Any = field(default=None, repr=False)
    kind: str | None = None
    kinds: dict[str, TuneResult] = field(default_factory=dict, repr=False)

    @property
    def selected(self) -> dict[str, Any]:
        """The table row of the chosen values (validation and, with a pool and a test set, test metrics); automatic
        strategies: the last epoch's row."""
        if self.automatic:
            return self.table[-1]
        return next(r for r in self.table if all(r.get(k) == v for k, v in self.best.items()))

    @property
    def test_selected(self) -> dict[str, Any] | None:
        """The row a search that peeked at the test set would choose (by test ``metric``): an upper bound, not a
        result; ``None`` without test scores."""
        key = f"test_{self.metric}"
        if not any(key in r for r in self.table):
            return None
        sign = -1.0 if self.metric == "accuracy" else 1.0
        return select_best(self.table, key, sign)

    @property
    def automatic(self) -> bool:
        """Whether an automatic strategy chose (one run; ``table`` is its per-epoch path), not the grid."""
        return TuningStrategy.parse(self.strategy).automatic

    @property
    def at_edge(self) -> bool:
        """Whether some chosen value lies on an edge of its grid."""
        return bool(self.edge_warnings)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the trained model.

        Returns:
            A JSON-ready dict (``strategy``, ``best``, ``metric``, ``grid``, ``split``, ``validation``, ``table``,
            ``path``, ``edge_status``, ``edge_warnings``, ``search_cost_s``, ``final``; automatic: ``objective``,
            ``settings``).
        """
        final = None
        if self.final is not None:
            final = {"history": self.final.history, "config": asdict(self.final.config)}
        out = {"strategy": self.strategy, "best": self.best, "metric": self.metric, "grid": self.grid,
               "split": self.split, "validation": self.validation, "table": self.table, "path": self.path,
               "edge_status": self.edge_status, "edge_warnings": self.edge_warnings,
               "search_cost_s": self.search_cost_s, "final": final}
        if self.automatic:
            out.update({"objective": self.objective, "settings": self.settings})
        if self.kinds:
            out["kind"] = self.kind
            out["kinds"] = {k: r.summary() for k, r in self.kinds.items()}
        return out

    def summary(self) -> dict[str, Any]:
        """The selection in brief: the best values, its validation score, its diagnostics, the trials, the status.

        Returns:
            A JSON-ready dict (``best``, ``val_<metric>``, ``prior_share``, ``prior_off``, ``std_ratio``,
            ``off_limit``, ``trials``, ``edge_status``).
        """
        row = self.selected if self.table else {}
        keys = (f"val_{self.metric}", "prior_share", "prior_off", "std_ratio", "off_limit")
        return {"best": self.best, **{k: row.get(k) for k in keys}, "trials": len(self.table),
                "edge_status": self.edge_status}

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON.

        Args:
            path: also write it there atomically.

        Returns:
            The JSON text.
        """
        if path is not None:
            save_json(path, self.to_dict())
        return json.dumps(to_jsonable(self.to_dict()), indent=2)

    def plot(self, path: str | Path, x: str | None = None) -> Path:
        """Plot validation NLL against one axis (log scale), one line per combination of the other axes, the
        selected point starred; for an automatic strategy, the learned values against the epoch. Draws on its own
        figure (no pyplot state: the caller's matplotlib backend is left alone).

        Args:
            path: the PNG file to write (atomically).
            x: the axis (default ``scale``, else ``variance``, else the first numeric axis).

        Returns:
            ``path``.
        """
        # matplotlib loads (~0.5 s) only when a plot is drawn
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if self.automatic:
            return atomic_write(path, lambda tmp: self._path_figure().savefig(tmp, format="png", dpi=120))
        x = x or next((k for k in ("scale", "variance") if k in self.grid), None) or next(
            (k for k, v in self.grid.items() if all(is_number(a) for a in v)), None)
        if x is None or x not in self.grid:
            raise ConfigError(f"no numeric grid axis to plot against (axes: {list(self.grid)})")
        others = [k for k in self.grid if k != x]
        figure = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        for combo in itertools.product(*(self.grid[k] for k in others)):
            rows = [r for r in self.table if all(r[k] == v for k, v in zip(others, combo, strict=False))]
            rows = sorted((r for r in rows if math.isfinite(r["val_nll"])), key=lambda r: r[x])
            label = ", ".join(f"{k}={v:g}" if is_number(v) else f"{k}={v}" for k, v in zip(others, combo, strict=False))
            ax.plot([r[x] for r in rows], [r["val_nll"] for r in rows], marker="o", label=label or None)
        best_row = next(r for r in self.table if all(r[k] == v for k, v in self.best.items()))
        ax.plot([best_row[x]], [best_row["val_nll"]], marker="*", markersize=16, color="k", linestyle="none",
                label="selected")
        ax.set_xscale("log")
        ax.set_xlabel("lambda (prior scale)" if x == "scale" else x)
        ax.set_ylabel("validation NLL")
        ax.legend(fontsize=7)
        return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))

    def _path_figure(self):
        """The learned hyper-parameters (log scale) against the epoch of an automatic strategy's run."""
        # matplotlib loads (~0.5 s) only when a plot is drawn
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(figure)
        ax = figure.subplots()
        names = [k for k in self.table[0] if k.startswith(("scale", "variance", "head_variance", "eps"))
                 and all(is_number(r.get(k)) and r[k] > 0 for r in self.table)] if self.table else []
        for name in names:
            ax.plot([r["epoch"] for r in self.table], [r[name] for r in self.table], marker=".", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"learned value ({self.strategy})")
        if names:
            ax.legend(fontsize=7)
        return figure
