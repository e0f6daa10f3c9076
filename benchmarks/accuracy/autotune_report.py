"""The issue-11 / issue-22 table of ``pairs.py``: the automatic strategies next to the grid, cell by cell.

For every pair, n and method, the records of each tuning strategy over the same seeds (the same subsample, the same test
set): test accuracy, NLL and ECE (mean ± std over seeds), the selected strength (median), the effective-strength ratio,
the fit status, the pool NLL (the grid and the pool strategies select on it; DE-ELBO and marglik never see it) and the
wall time per cell. Then the verdict per automatic strategy: the paired differences to the grid (auto - grid, mean over
seeds), whether each is no worse than one seed standard deviation of the grid's metric (a better result counts as a
match: lower NLL, higher accuracy), and the wall-time ratio auto / grid (median over seeds of the per-seed ratios; its
floor is 1 / the grid's number of trials, since one automatic run trains once with the same budget as one trial). Side
by side: each automatic job also times one grid trial (same training set, budget and evaluations) in its own process
just before its run, so load and machine are shared; the grid's time is then that trial's time times the number of
trials the grid ran on that seed, and this ratio decides the match ("wall / grid" keeps the ratio to the grid run's
recorded time, measured at another time and load; since issue 21 that is the whole kind-selection job, every kind's
trials, so it understates the kind's own search). A strategy that chose the learning rate among k values (``--lrs``, "lr
x k") is compared with the lambda x lr grid: k times the grid's trials at one lr. The targets: 1/5 of the grid's time
for issue 11's strategies (DE-ELBO, marglik), 1/2 for issue 22's pool strategies, 1/4 with the learning rate chosen too.
The pool strategies' pool NLL is their selection's score on the same pool as the grid's; "off" counts the seeds whose
selection was the off limit (no backbone prior), "share" is the median N-aware prior share of the selection
(``prior_share``; off below 1%). DE-ELBO's wall time includes the evaluation of its Bayesian model average over q (10
extra passes over the test set and the pool), which a grid trial does not have; ``search_cost_s`` in its records is the
training run alone.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ptyl.pipeline import markdown_table

METRICS = ("accuracy", "nll", "ece")
TARGET_RATIO = 0.2  # issue 11's "<= 1/5 of the grid's wall time" (the strategies without a pool)
POOL_RATIO, LR_RATIO = 0.5, 0.25  # issue 22: <= 1/2 of the grid's time; <= 1/4 of the lambda x lr grid


def label(record: dict[str, Any]) -> str:
    """A strategy's row label: its name, and ``lr x k`` when it chose among k learning rates."""
    lrs = record.get("lrs") or []
    return record["tuning"] + (f" (lr x{len(lrs)})" if len(lrs) > 1 else "")


def target(record: dict[str, Any]) -> float:
    """The wall-time ratio a strategy's record must meet (see the module docstring)."""
    from ptyl.tuning import TuningStrategy

    if len(record.get("lrs") or []) > 1:
        return LR_RATIO
    return POOL_RATIO if TuningStrategy.parse(record["tuning"]).tuner.uses_validation else TARGET_RATIO


def _lr_factor(record: dict[str, Any]) -> int:
    return max(1, len(record.get("lrs") or []))


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


def _rows(name: str, records: list[dict[str, Any]], grid: dict[int, dict[str, Any]], prefix: str = "") -> list:
    """One table row for a strategy's records (``prefix``: read the metrics from a nested dict, e.g. ``bma``)."""
    get = (lambda r: r.get(prefix) or {}) if prefix else (lambda r: r)
    metric = {m: [float(get(r)[m]) for r in records if m in get(r)] for m in METRICS}
    strengths = [s for s in (_strength(r) for r in records) if s is not None]
    ratios = [r["wall_time_s"] / grid[r["seed"]]["wall_time_s"] for r in records if r["seed"] in grid]
    pool = _values(records, "val_nll") or _values(records, "pool_nll")
    status = {}
    for r in records:
        status[r.get("fit_status")] = status.get(r.get("fit_status"), 0) + 1
    shares = _values(records, "prior_share")
    offs = sum(bool(r.get("off_limit")) or _strength(r) == math.inf for r in records)
    return [name, len(records), *(_ms(metric[m]) for m in METRICS),
            f"{statistics.median(strengths):.3g}" if strengths else "-",
            f"{statistics.median(shares):.2g}" if shares else "-", str(offs),
            f"{statistics.median(_values(records, 'std_ratio')):.3g}" if _values(records, "std_ratio") else "-",
            ", ".join(f"{k}: {v}" for k, v in sorted(status.items(), key=str)) or "-",
            _ms(pool, 3) if pool else "-", f"{statistics.fmean(r['wall_time_s'] for r in records):.0f}",
            f"{statistics.median(ratios):.2f}" if ratios else "-"]


def within_one_sd(metric: str, values: list[float], reference: list[float]) -> tuple[float, float, bool]:
    """The match rule for one metric over paired seeds: (mean of value - reference, the reference's seed std, whether
    the values are no worse than that std; a higher accuracy or a lower NLL counts as a match)."""
    diffs = [float(v) - float(g) for v, g in zip(values, reference, strict=False)]
    sd = statistics.stdev(float(g) for g in reference) if len(reference) > 1 else math.nan
    delta = statistics.fmean(diffs) if diffs else math.nan
    worse = -delta if metric == "accuracy" else delta  # > 0: worse than the reference
    return delta, sd, bool(diffs) and worse <= sd


def _same_process_ratio(paired: list[dict[str, Any]], grid: dict[int, dict[str, Any]]) -> float:
    """Median over seeds of auto wall / (the same process's trial wall x the grid's trials); NaN without timings."""
    ratios = [r["wall_time_s"] / (r["trial_wall_s"] * grid[r["seed"]]["trials"] * _lr_factor(r)) for r in paired
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
    ratios = [r["wall_time_s"] / (grid[r["seed"]]["wall_time_s"] * _lr_factor(r)) for r in paired]
    trials = [(grid[r["seed"]].get("trials") or math.nan) * _lr_factor(r) for r in paired]
    ratio = statistics.median(ratios) if ratios else math.nan
    same = _same_process_ratio(paired, grid)
    decisive = same if math.isfinite(same) else ratio
    goal = target(records[0]) if records else TARGET_RATIO
    out.update({"wall_ratio": ratio, "wall_ratio_same_process": same, "target_ratio": goal,
                "grid_trials": statistics.fmean(trials) if trials else math.nan,
                "match": bool(out["within_accuracy"] and out["within_nll"] and decisive <= goal)})
    row = [out["strategy"], len(paired), *cells, f"{ratio:.2f}", "-" if math.isnan(same) else f"{same:.2f}",
           f"{out['grid_trials']:.1f}", f"{goal:g}", "yes" if out["match"] else "no"]
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
    automatic = sorted({label(r) for r in records if r.get("tuning", "grid") != "grid"})
    commands = sorted({r["command"] for r in records if r.get("command") and r.get("tuning") != "grid"})
    lines = ["# Automatic strength selection vs the validation grid (issues 11, 22)", "",
             "Automatic rows: " + "; ".join(f"`{c}`" for c in commands) + ". Grid rows: the same store's records of "
             "`python benchmarks/accuracy/pairs.py` (the grid run, `pairs.md`), same cells: same subsample per seed, "
             "same step budget, same test set.", "", machine, "",
             __doc__.split("\n\n")[1].replace("\n", " "), ""]
    data: dict[str, Any] = {"cells": [], "commands": commands}
    header = ["tuning", "seeds", "test accuracy", "test NLL", "test ECE", "strength (median)", "share (median)",
              "off", "std ratio", "fit status", "pool NLL", "wall s", "wall / grid"]
    verdict_header = ["strategy", "paired seeds", "Δ accuracy (grid sd) ok", "Δ NLL (grid sd) ok",
                      "wall / grid (recorded)", "wall / grid (side by side)", "grid trials", "target",
                      "match (both ok, ratio <= target)"]
    summary: dict[str, list[bool]] = {}
    for pair in cfg["pairs"]:
        for n in cfg["pairs"][pair]["n"]:
            cell = [r for r in records if r["pair"] == pair and r["n"] == n]
            for method in sorted({r["method"] for r in cell if r.get("tuning", "grid") != "grid"}):
                grid_records = [r for r in cell if r["method"] == method and r.get("tuning", "grid") == "grid"
                                and "error" not in r]
                grid = {r["seed"]: r for r in grid_records}
                rows, verdicts, entries = [], [], []
                if grid_records:
                    rows.append(_rows("grid (pool-selected)", grid_records, grid))
                for strategy in automatic:
                    mine = [r for r in cell if r["method"] == method and r.get("tuning", "grid") != "grid"
                            and label(r) == strategy]
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
    lines += ["## Summary", "", markdown_table(["strategy", "cells", "cells matching the grid within its target"],
                                               [[k, len(v), sum(v)] for k, v in summary.items()]), ""]
    data["summary"] = {k: {"cells": len(v), "matches": sum(v)} for k, v in summary.items()}
    return "\n".join(lines), data
