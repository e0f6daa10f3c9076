"""The issue-11 table of ``pairs.py``: the automatic strategies next to the grid, cell by cell.

For every pair, n and method, the records of each tuning strategy over the same seeds (the same subsample, the same
test set): test accuracy, NLL and ECE (mean ± std over seeds), the selected strength (median), the effective-strength
ratio, the fit status, the pool NLL (the grid selects on it; the automatic strategies never see it) and the wall time
per cell. Then the verdict per automatic strategy: the paired differences to the grid (auto - grid, mean over
seeds), whether each is no worse than one seed standard deviation of the grid's metric (a better result counts as a
match: lower NLL, higher accuracy), and the wall-time ratio auto /
grid (median over seeds of the per-seed ratios; its floor is 1 / the grid's number of trials, since one automatic run
trains once with the same budget as one trial). Side by side: each automatic job also times one grid trial (same
training set, budget and evaluations) in its own process just before its run, so load and machine are shared; the
grid's time is then that trial's time times the number of trials the grid ran on that seed, and this ratio decides
the match ("wall / grid" keeps the ratio to the grid run's recorded time, measured at another time and load).
DE-ELBO's wall time includes the evaluation of its Bayesian model average over q (10 extra passes over the test set
and the pool), which a grid trial does not have; ``search_cost_s`` in its records is the training run alone.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ptyl.pipeline import markdown_table

METRICS = ("accuracy", "nll", "ece")
TARGET_RATIO = 0.2  # the "<= 1/5 of the grid's wall time"


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def _strength(record: dict[str, Any]) -> float | None:
    selected = record.get("selected") or {}
    value = selected.get("scale", selected.get("variance"))
    if isinstance(value, dict):  # block: one lambda per block
        value = statistics.median(value.values())
    return float(value) if isinstance(value, (int, float)) else None


def _rows(label: str, records: list[dict[str, Any]], grid: dict[int, dict[str, Any]], prefix: str = "") -> list:
    """One table row for a strategy's records (``prefix``: read the metrics from a nested dict, e.g. ``bma``)."""
    get = (lambda r: r.get(prefix) or {}) if prefix else (lambda r: r)
    metric = {m: [float(get(r)[m]) for r in records if m in get(r)] for m in METRICS}
    strengths = [s for s in (_strength(r) for r in records) if s is not None]
    ratios = [r["wall_time_s"] / grid[r["seed"]]["wall_time_s"] for r in records if r["seed"] in grid]
    pool = _values(records, "val_nll") or _values(records, "pool_nll")
    status = {}
    for r in records:
        status[r.get("fit_status")] = status.get(r.get("fit_status"), 0) + 1
    return [label, len(records), *(_ms(metric[m]) for m in METRICS),
            f"{statistics.median(strengths):.3g}" if strengths else "-",
            f"{statistics.median(_values(records, 'std_ratio')):.3g}" if _values(records, "std_ratio") else "-",
            ", ".join(f"{k}: {v}" for k, v in sorted(status.items(), key=str)) or "-",
            _ms(pool, 3) if pool else "-", f"{statistics.fmean(r['wall_time_s'] for r in records):.0f}",
            f"{statistics.median(ratios):.2f}" if ratios else "-"]


def within_one_sd(metric: str, values: list[float], reference: list[float]) -> tuple[float, float, bool]:
    """The match rule for one metric over paired seeds: (mean of value - reference, the reference's seed std, whether
    the values are no worse than that std; a higher accuracy or a lower NLL counts as a match)."""
    diffs = [float(v) - float(g) for v, g in zip(values, reference)]
    sd = statistics.stdev(float(g) for g in reference) if len(reference) > 1 else math.nan
    delta = statistics.fmean(diffs) if diffs else math.nan
    worse = -delta if metric == "accuracy" else delta  # > 0: worse than the reference
    return delta, sd, bool(diffs) and worse <= sd


def _same_process_ratio(paired: list[dict[str, Any]], grid: dict[int, dict[str, Any]]) -> float:
    """Median over seeds of auto wall / (the same process's trial wall x the grid's trials); NaN without timings."""
    ratios = [r["wall_time_s"] / (r["trial_wall_s"] * grid[r["seed"]]["trials"]) for r in paired
              if r.get("trial_wall_s") and grid[r["seed"]].get("trials")]
    return statistics.median(ratios) if ratios else math.nan


def _verdict(strategy: str, records: list[dict[str, Any]], grid: dict[int, dict[str, Any]],
             prefix: str = "") -> tuple[list, dict[str, Any]]:
    get = (lambda r: r.get(prefix) or {}) if prefix else (lambda r: r)
    paired = [r for r in records if r["seed"] in grid and all(m in get(r) for m in METRICS)]
    out: dict[str, Any] = {"strategy": strategy + (f" ({prefix})" if prefix else ""), "seeds": len(paired)}
    cells = []
    for m in ("accuracy", "nll"):
        delta, sd, within = within_one_sd(m, [get(r)[m] for r in paired], [grid[r["seed"]][m] for r in paired])
        out.update({f"delta_{m}": delta, f"grid_sd_{m}": sd, f"within_{m}": within})
        cells.append(f"{delta:+.4f} (sd {sd:.4f}) {'yes' if within else 'no'}")
    ratios = [r["wall_time_s"] / grid[r["seed"]]["wall_time_s"] for r in paired]
    trials = [grid[r["seed"]].get("trials") or math.nan for r in paired]
    ratio = statistics.median(ratios) if ratios else math.nan
    same = _same_process_ratio(paired, grid)
    decisive = same if math.isfinite(same) else ratio
    out.update({"wall_ratio": ratio, "wall_ratio_same_process": same,
                "grid_trials": statistics.fmean(trials) if trials else math.nan,
                "match": bool(out["within_accuracy"] and out["within_nll"] and decisive <= TARGET_RATIO)})
    row = [out["strategy"], len(paired), *cells, f"{ratio:.2f}", "-" if math.isnan(same) else f"{same:.2f}",
           f"{out['grid_trials']:.1f}", "yes" if out["match"] else "no"]
    return row, out


def autotune_report(records: list[dict[str, Any]], cfg: dict[str, Any], machine: str) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON of the side-by-side comparison (see the module docstring).

    Args:
        records: the run records of every tuning strategy (grid included) with current settings.
        cfg: the benchmark settings (``pairs``).
        machine: the machine line.

    Returns:
        ``(markdown, data)``.
    """
    automatic = sorted({r["tuning"] for r in records if r.get("tuning", "grid") != "grid"})
    commands = sorted({r["command"] for r in records if r.get("command") and r.get("tuning") != "grid"})
    lines = ["# Automatic strength selection vs the validation grid (issue 11)", "",
             "Automatic rows: " + "; ".join(f"`{c}`" for c in commands) + ". Grid rows: the same store's records of "
             "`python benchmarks/accuracy/pairs.py` (the grid run, `pairs.md`), same cells: same subsample per seed, "
             "same step budget, same test set.", "", machine, "",
             __doc__.split("\n\n")[1].replace("\n", " "), ""]
    data: dict[str, Any] = {"cells": [], "commands": commands}
    header = ["tuning", "seeds", "test accuracy", "test NLL", "test ECE", "strength (median)", "std ratio",
              "fit status", "pool NLL", "wall s", "wall / grid"]
    verdict_header = ["strategy", "paired seeds", "Δ accuracy (grid sd) ok", "Δ NLL (grid sd) ok",
                      "wall / grid (recorded)", "wall / grid (side by side)", "grid trials",
                      f"match (both ok, ratio <= {TARGET_RATIO:g})"]
    summary: dict[str, list[bool]] = {}
    for pair in cfg["pairs"]:
        for n in cfg["pairs"][pair]["n"]:
            cell = [r for r in records if r["pair"] == pair and r["n"] == n]
            for method in sorted({r["method"] for r in cell if r.get("tuning") in automatic}):
                grid_records = [r for r in cell if r["method"] == method and r.get("tuning", "grid") == "grid"
                                and "error" not in r]
                grid = {r["seed"]: r for r in grid_records}
                rows, verdicts, entries = [], [], []
                if grid_records:
                    rows.append(_rows("grid (pool-selected)", grid_records, grid))
                for strategy in automatic:
                    mine = [r for r in cell if r["method"] == method and r.get("tuning") == strategy]
                    if not mine:
                        continue
                    rows.append(_rows(strategy, mine, grid))
                    variants = [""] + (["bma"] if any("bma" in r for r in mine) else [])
                    for prefix in variants:
                        if prefix:
                            rows.append(_rows(f"{strategy} + BMA over q", mine, grid, prefix))
                        if grid:
                            row, entry = _verdict(strategy, mine, grid, prefix)
                            verdicts.append(row)
                            entries.append(entry)
                            summary.setdefault(entry["strategy"], []).append(entry["match"])
                if not rows:
                    continue
                lines += [f"## {pair}, n = {n} per class, {method}", "", markdown_table(header, rows), ""]
                if verdicts:
                    lines += [markdown_table(verdict_header, verdicts), ""]
                data["cells"].append({"pair": pair, "n": n, "method": method, "verdicts": entries})
    lines += ["## Summary", "", markdown_table(["strategy", "cells", "cells matching the grid at <= 1/5 of its time"],
                                               [[k, len(v), sum(v)] for k, v in summary.items()]), ""]
    data["summary"] = {k: {"cells": len(v), "matches": sum(v)} for k, v in summary.items()}
    return "\n".join(lines), data
