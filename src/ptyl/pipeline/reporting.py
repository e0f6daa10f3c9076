"""Results of many runs as tables and plots: grouping, mean ± std over seeds, markdown tables, data-efficiency plots.
Shared by the demo, the command line and ``benchmarks/``.

>>> runs = [{"method": "l2sp", "n_per_class": 10, "seed": s, "accuracy": a} for s, a in enumerate([0.5, 0.7])]
>>> fmt_mean_std([r["accuracy"] for r in runs])
'0.6000 ± 0.1414'
>>> list(group_results(runs))
[('l2sp', 10)]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ptyl.io.atomic import atomic_write
from ptyl.priors.registry import PriorKind

__all__ = ["fmt_mean_std", "group_results", "markdown_table", "mean_std", "mean_std_fields",
           "plot_data_efficiency", "summarize"]


def group_results(results: Iterable[dict[str, Any]], keys: Sequence[str] = ("method", "n_per_class")
                  ) -> dict[tuple, list[dict[str, Any]]]:
    """Group run records.

    Args:
        results: the records (dicts).
        keys: the record keys to group by.

    Returns:
        ``{(value of each key): [records]}``, groups and records in first-appearance order.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in results:
        groups.setdefault(tuple(record[k] for k in keys), []).append(record)
    return groups


def mean_std(values: Sequence[float], finite_only: bool = False) -> tuple[float, float]:
    """Mean and sample standard deviation.

    Args:
        values: the numbers (``None`` entries are dropped).
        finite_only: drop NaN/Inf too.

    Returns:
        ``(mean, std)``; std 0 for one value, ``(nan, nan)`` for none.
    """
    values = [v for v in values if v is not None and (not finite_only or math.isfinite(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt_mean_std(values: Sequence[float], digits: int = 4) -> str:
    """Format numbers over seeds.

    Args:
        values: the numbers.
        digits: decimals.

    Returns:
        ``"mean ± std"``, or the value alone for one value.
    """
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def mean_std_fields(stats: dict[str, Sequence[float]]) -> dict[str, float]:
    """Summarise ``stats`` (metric -> values over seeds) for JSON files.

    Returns:
        ``{"<k>_mean": ..., "<k>_std": ...}`` for every metric ``k`` (std 0 for a single value).
    """
    pairs = {k: mean_std(v) for k, v in stats.items()}
    return {**{f"{k}_mean": m for k, (m, _) in pairs.items()}, **{f"{k}_std": s for k, (_, s) in pairs.items()}}


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table.

    Args:
        headers: the column titles.
        rows: the cells (anything ``str`` can format).

    Returns:
        The table's text.
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _fmt_selected(runs: list[dict[str, Any]]) -> str:
    parts = []
    for r in runs:
        if "error" in r:
            parts.append("failed (every trial diverged)")
            continue
        items = ", ".join(f"{k}={_fmt_value(v)}" for k, v in r["selected"].items()
                          if k != "lr" or len(r["selected"]) == 1)
        if r.get("selected_kind"):
            kind = r["selected_kind"]
            items = f"{kind} (prior off)" if kind == PriorKind.NONE else f"{kind}: {items}"
        status = [v for k, v in (r.get("edge_status") or {}).items() if v not in ("interior", "flat", "off limit")]
        parts.append(items + (f" ({', '.join(status)})" if status else "")
                     + (" (edge)" if r.get("edge_warnings") and not status else ""))
    return "; ".join(dict.fromkeys(parts))


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return "off" if value == math.inf else f"{value:.3g}"
    return str(value)


def _fmt_strength(runs: list[dict[str, Any]]) -> str:
    """Median std ratio (descriptive only: it ignores N)."""
    ratios = [r["std_ratio"] for r in runs if r.get("std_ratio") is not None]
    return f"{statistics.median(ratios):.2g}" if ratios else "—"


def _fmt_share(runs: list[dict[str, Any]]) -> str:
    """Median N-aware prior share, and how many selections it calls off (< 1% of every layer's curvature)."""
    shares = [r["prior_share"] for r in runs if r.get("prior_share") is not None]
    if not shares:
        return "—"
    off = sum(bool(r.get("prior_off")) for r in runs)
    return f"{statistics.median(shares):.2g}" + (" (off)" if off == len(runs) else f" ({off} off)" if off else "")


def _fmt_fit(runs: list[dict[str, Any]]) -> str:
    losses = [r["final_loss"] for r in runs if r.get("final_loss") is not None]
    if not losses:
        return "—"
    flag = " UNDERTRAINED" if any(r.get("fit_status") == "undertrained" for r in runs) else ""
    return f"{statistics.fmean(losses):.3f}{flag}"


def summarize(results: Sequence[dict[str, Any]], metrics: Sequence[str] = ("accuracy", "nll", "ece", "brier"),
              size_key: str = "n_per_class", size_label: str = "n/class", wall_time: bool = True) -> str:
    """A markdown table of :func:`ptyl.pipeline.run_transfer` results.

    One row per (training-set size, method) in run order: ``mean ± std`` over seeds of each metric, the selected
    hyper-parameters (the kind first for a kind selection; ``off``: the off limit, no backbone prior; with the search
    status when it ended at a hard bound or an unextended "edge"), the N-aware prior share of the selection (median
    over seeds of the prior's largest share of a layer's curvature, "off" below 1%: :func:`ptyl.autotune.prior_share`),
    its std ratio (median prior std / median |theta0|, descriptive), the final training NLL (flagged UNDERTRAINED
    when the budget, not the prior, stopped it) and the mean wall time.

    Args:
        results: the run records.
        metrics: columns.
        size_key, size_label: the record key of the training-set size and its column header.
        wall_time: add the mean wall time column (``False``: every cell is deterministic, e.g. ``ptyl demo``'s
            ``summary.md``, which the README embeds and a test compares).

    Returns:
        The table's text, then a line naming the seeds.
    """
    header = [size_label, "method", *metrics, "selected", "prior share", "std ratio", "train NLL",
              *(["time (s)"] if wall_time else [])]
    groups = group_results(results, ("method", size_key))
    order = {key: i for i, key in enumerate(groups)}  # run order within one size
    rows = [[str(n), method, *(fmt_mean_std([r[m] for r in runs]) for m in metrics), _fmt_selected(runs),
             _fmt_share(runs), _fmt_strength(runs), _fmt_fit(runs),
             *([f"{statistics.fmean(r['wall_time_s'] for r in runs):.1f}"] if wall_time else [])]
            for (method, n), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order[kv[0]]))]
    seeds = sorted({r["seed"] for r in results})
    return markdown_table(header, rows) + f"\n\n{len(seeds)} seed(s) {seeds}; mean ± std over seeds where there are " \
                                          "several."


def plot_data_efficiency(results: Sequence[dict[str, Any]], path: str | Path,
                         metrics: Sequence[str] = ("accuracy", "nll"), size_key: str = "n_per_class",
                         size_label: str = "training examples per class (n)") -> Path:
    """Plot each metric against the training-set size (log x), one line per method, error bars = std over seeds.
    Draws on its own figure (the caller's matplotlib state is left alone).

    Args:
        results: :func:`ptyl.pipeline.run_transfer` records.
        path: the PNG file to write (atomically).
        metrics: one panel each.
        size_key, size_label: the record key of the training-set size and the x-axis label.

    Returns:
        ``path``.
    """
    # matplotlib loads (~0.5 s) only when a plot is drawn
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_results(results, ("method", size_key))
    methods = list(dict.fromkeys(m for m, _ in groups))
    figure = Figure(figsize=(5.0 * len(metrics), 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    labels = {"accuracy": "test accuracy", "nll": "test NLL", "ece": "test ECE", "brier": "test Brier",
              "miou": "test mIoU"}
    for ax, metric in zip(axes, metrics, strict=False):
        for method in methods:
            ns = sorted(n for m, n in groups if m == method)
            stats = [mean_std([r[metric] for r in groups[(method, n)]]) for n in ns]
            ax.errorbar(ns, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel(size_label)
        ax.set_ylabel(labels.get(metric, metric))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    source = next((r.get("source") for r in results), None)
    target = next((r.get("target") for r in results), None)
    figure.suptitle(f"Data efficiency: {source} -> {target}" if source else "Data efficiency")
    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
