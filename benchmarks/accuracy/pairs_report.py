"""Tables of ``pairs.py``: a summary per cell (the kind chosen on the pool per seed; selected minus tuned standard
fine-tuning, paired, with its 95% t-interval and the guarantee check; learned low-rank minus the best baseline); then
per pair and n, every method's validation-selected test result (mean ± std over seeds), the test-selected upper
bound, the selections with their N-aware prior share, std ratio and search status, the final training NLL and fit
status, and the paired differences with 95% t-intervals.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from ptyl.pipeline import markdown_table

BASELINES = ("standard", "l2sp")
LEARNED = ("lowrank", "diag", "lowrank-sgld", "lowrank-sgld@T1")
SELECTED = "selected"
# the Bayesian predictives (issue 23), each paired with the MAP under the same prior kind
BAYES = tuple(f"{kind}-{inference}" for kind in ("lowrank", "l2sp")
              for inference in ("laplace", "sgld", "csgld", "swag"))
SAME_PRIOR_MAP = "MAP under the same prior"
HEAD = "head"  # the variant (``method@head``) that also tunes the head prior's variance (pairs.HEAD_VARIANCES)
LABELS = {"standard": "standard FT", "l2sp": "L2-SP", "lowrank": "learned low-rank", "diag": "learned diag",
          "lowrank-sgld": "low-rank + SGLD (cold T)",
          "lowrank-sgld@T1": "low-rank + SGLD T=1 (exact-posterior ablation)",
          "lowrank-laplace": "low-rank + last-layer Laplace", "lowrank-csgld": "low-rank + cyclical SGLD",
          "lowrank-swag": "low-rank + SWAG", "l2sp-laplace": "L2-SP + last-layer Laplace", "l2sp-sgld": "L2-SP + SGLD",
          "l2sp-csgld": "L2-SP + cyclical SGLD", "l2sp-swag": "L2-SP + SWAG",
          SELECTED: "**selected on the pool** (kind and strength)"}
GUARANTEE = 0.005  # the selection may trail tuned standard fine-tuning by at most this mean test NLL (issue 21)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # pragma: no cover - scipy is optional
        return _T975.get(df, 1.96)


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the 95% t-interval of the mean over seeds (``nan`` bounds for fewer than 2 values)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def _ms(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _axis(record: dict[str, Any]) -> tuple[str, float | None]:
    for key in ("scale", "variance"):
        if key in (record.get("selected") or {}):
            return ("λ" if key == "scale" else "v"), float(record["selected"][key])
    return "", None


def _choice(record: dict[str, Any]) -> str:
    """``1e+03``, ``off`` (the off limit: no backbone prior); a selection's ``lowrank 1e+03`` / ``none (off)``."""
    symbol, value = _axis(record)
    text = "off" if value == math.inf else f"{value:.3g}" if value is not None else "—"
    if "head_variance" in (record.get("selected") or {}):
        text += f" (head v {float(record['selected']['head_variance']):.3g})"
    kind = record.get("selected_kind")
    if kind is None:
        return text
    return "none (off)" if kind == "none" else f"{kind} {symbol} {text}"


def _share(records: list[dict[str, Any]]) -> str:
    shares = [r["prior_share"] for r in records if r.get("prior_share") is not None]
    if not shares:
        return "—"
    off = sum(bool(r.get("prior_off")) for r in records)
    return f"{statistics.median(shares):.2g}" + (f" ({off} off)" if off else "")


def _status(records: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        for axis, state in (r.get("edge_status") or {}).items():
            if axis != "lr":
                counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def _fit(records: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        status = "sampled" if r.get("inference", "map") != "map" or "sgld" in r["method"] else r.get("fit_status", "?")
        counts[status] = counts.get(status, 0) + 1
    text = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    return text.replace("undertrained", "**UNDERTRAINED**")


def method_table(records: list[dict[str, Any]], score: str = "accuracy") -> str:
    """One row per method (records of one pair and one n); ``score``: the second metric column (segmentation:
    ``miou``)."""
    known = tuple(dict.fromkeys((*BASELINES, *LEARNED, *BAYES, SELECTED, *_head_variants())))
    order = [m for m in known if any(r["method"] == m for r in records)]
    order += [m for m in dict.fromkeys(r["method"] for r in records) if m not in known]
    rows = []
    for method in order:
        runs = sorted((r for r in records if r["method"] == method), key=lambda r: r["seed"])
        ok = [r for r in runs if "error" not in r]
        axis = next((_axis(r)[0] for r in ok if _axis(r)[0]), "")
        chosen = ", ".join(_choice(r) for r in ok)
        ratios = [r["std_ratio"] for r in ok if r.get("std_ratio") is not None]
        rows.append([
            label(method), _ms([r["nll"] for r in ok]), _ms([r[score] for r in ok]),
            _ms([r["ece"] for r in ok]), _ms([r["test_selected"]["nll"] for r in ok if r.get("test_selected")]),
            (f"{axis} = {chosen}" if method != SELECTED else chosen) if axis else "—", _share(ok),
            f"{statistics.median(ratios):.3g}" if ratios else "—",
            _status(ok), _ms([r.get("final_loss") for r in ok], 3), _fit(ok),
            f"{statistics.fmean(r['trials'] for r in ok):.1f}" if ok else "—",
            f"{len(ok)}" + (f" (+{len(runs) - len(ok)} failed)" if len(runs) > len(ok) else ""),
        ])
    header = ["method", "test NLL (val-selected)", f"test {'acc' if score == 'accuracy' else score}", "test ECE",
              "test NLL (test-selected, upper bound)",
              "selected per seed", "prior share (median, N-aware)", "std ratio (median)", "search status",
              "train NLL", "fit", "trials", "seeds"]
    return markdown_table(header, rows)


def _by_seed(records: list[dict[str, Any]], method: str) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in records if r["method"] == method and "error" not in r}


def best_baseline_by_validation(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per seed, the tuned baseline with the lower validation NLL (an honest 'best baseline')."""
    out = {}
    per = {b: _by_seed(records, b) for b in BASELINES}
    for seed in set.intersection(*(set(v) for v in per.values())) if all(per.values()) else ():
        out[seed] = min((per[b][seed] for b in BASELINES), key=lambda r: r["val_nll"])
    return out


def paired(records: list[dict[str, Any]], score: str = "accuracy") -> tuple[str, list[dict[str, Any]]]:
    """Paired differences (method minus reference, per seed) with 95% t-intervals, in NLL, ``score`` and ECE: the
    MAP methods minus the tuned baselines; a Bayesian predictive (:data:`BAYES`) minus the MAP under the same prior
    kind (``lowrank-sgld`` minus ``lowrank``, the selected job's per-kind record)."""
    rows, data = [], []
    refs = {**{b: _by_seed(records, b) for b in BASELINES}, "best baseline (val)": best_baseline_by_validation(records)}
    methods = dict.fromkeys((SELECTED, *LEARNED, *BAYES, *_head_variants()))
    for method in [m for m in methods if any(r["method"] == m for r in records)]:
        mine = _by_seed(records, method)
        base, _, variant = method.partition("@")
        kind = base.partition("-")[0]
        same_prior = f"{kind}@{HEAD}" if variant == HEAD else kind  # the MAP under the same (head) prior
        if variant == HEAD and base not in BAYES:  # a MAP @head: against the same kind with the default head prior
            mine_refs = {f"{LABELS.get(kind, kind)}, head prior N(0, 1)": _by_seed(records, kind)}
        else:
            mine_refs = {**(refs if base not in BAYES or method in LEARNED else {}),
                         **({f"{SAME_PRIOR_MAP} ({label(same_prior)})": _by_seed(records, same_prior)}
                            if base in BAYES else {})}
        for ref_name, ref in mine_refs.items():
            seeds = sorted(set(mine) & set(ref))
            if not seeds:
                continue
            d_nll = [mine[s]["nll"] - ref[s]["nll"] for s in seeds]
            d_acc = [mine[s][score] - ref[s][score] for s in seeds]
            d_ece = [mine[s].get("ece", math.nan) - ref[s].get("ece", math.nan) for s in seeds]
            nll, acc, ece = t_interval(d_nll), t_interval(d_acc), t_interval(d_ece)
            verdict = _verdict(nll)
            data.append({"method": method, "reference": ref_name, "seeds": seeds, "delta_nll": d_nll,
                         "delta_accuracy": d_acc, "delta_ece": d_ece, "nll_interval": nll, "accuracy_interval": acc,
                         "ece_interval": ece, "verdict": verdict})
            rows.append([label(method), ref_name if ref_name not in LABELS else LABELS[ref_name],
                         _ci(nll), _ci(acc), _ci(ece) if math.isfinite(ece[0]) else "—", verdict, len(seeds)])
    header = ["method", "minus", "Δ test NLL, mean [95% CI]",
              f"Δ test {'acc' if score == 'accuracy' else score}, mean [95% CI]", "Δ test ECE, mean [95% CI]",
              "verdict (NLL)", "seeds"]
    return markdown_table(header, rows), data


def _head_variants() -> tuple[str, ...]:
    """The ``@head`` variants of the learned MAP kinds and the Bayesian predictives, in table order."""
    return tuple(f"{m}@{HEAD}" for m in ("lowrank", "diag", "l2sp", *BAYES))


def label(method: str) -> str:
    """A method's table label (``@head``: the base label, head prior tuned)."""
    base, _, variant = method.partition("@")
    if variant == HEAD:
        return f"{LABELS.get(base, base)}, head prior tuned"
    return LABELS.get(method, method)


def _ci(interval: tuple[float, float, float]) -> str:
    mean, lo, hi = interval
    if not math.isfinite(lo):
        return f"{mean:+.4f}"
    return f"{mean:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _verdict(interval: tuple[float, float, float]) -> str:
    _, lo, hi = interval
    if not math.isfinite(lo):
        return "n/a (1 seed)"
    if max(abs(lo), abs(hi)) < 5e-5:  # e.g. a Laplace predictive that chose its MAP limit on every seed
        return "same (equal to 4 decimals)"
    if hi < 0:
        return "**better** (CI < 0)"
    if lo > 0:
        return "worse (CI > 0)"
    return "tie (CI contains 0)"


def summary_rows(records: list[dict[str, Any]], cfg: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """One row per cell: the kinds chosen, selected minus tuned standard fine-tuning (the guarantee), learned low-rank
    minus the best baseline. ``cfg["pairs"]``: cell names -> ``{"n": [labels]}``; records carry ``pair`` and
    ``n``."""
    rows, data = [], []
    for pair in cfg["pairs"]:
        for n in cfg["pairs"][pair]["n"]:
            group = [r for r in records if r["pair"] == pair and r["n"] == n]
            chosen = _by_seed(group, SELECTED)
            standard = _by_seed(group, "standard")
            seeds = sorted(set(chosen) & set(standard))
            if not seeds:
                continue
            kinds: dict[str, int] = {}
            for s in seeds:
                kinds[chosen[s].get("selected_kind")] = kinds.get(chosen[s].get("selected_kind"), 0) + 1
            d_std = t_interval([chosen[s]["nll"] - standard[s]["nll"] for s in seeds])
            best = best_baseline_by_validation(group)
            low = _by_seed(group, "lowrank")
            both = sorted(set(low) & set(best))
            d_low = t_interval([low[s]["nll"] - best[s]["nll"] for s in both])
            shares = [chosen[s] for s in seeds]
            holds = d_std[0] <= GUARANTEE and not (math.isfinite(d_std[1]) and d_std[1] > 0)
            rows.append([pair, n, ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])),
                         _ms([chosen[s]["nll"] for s in seeds]), _ms([standard[s]["nll"] for s in seeds]),
                         _ci(d_std), "yes" if holds else "**NO**", _share(shares), _ci(d_low), _verdict(d_low),
                         len(seeds)])
            data.append({"pair": pair, "n": n, "kinds": kinds, "selected_minus_standard": d_std,
                         "guarantee_holds": holds, "lowrank_minus_best_baseline": d_low, "seeds": seeds})
    header = ["pair", "n/class", "kind chosen (seeds)", "selected: test NLL", "standard FT: test NLL",
              "Δ selected − standard [95% CI]", f"no worse (mean ≤ +{GUARANTEE}, CI not above 0)",
              "prior share of the selection (median, N-aware)", "Δ low-rank − best baseline [95% CI]",
              "low-rank verdict", "seeds"]
    return markdown_table(header, rows), data


def report(records: list[dict[str, Any]], cfg: dict[str, Any], command: str, machine: str
           ) -> tuple[str, dict[str, Any]]:
    """The markdown report and the JSON payload."""
    lines = [f"# Transfer pairs: learned priors vs tuned baselines{' (quick smoke run)' if cfg['quick'] else ''}", "",
             f"Command: `{command}`", "", machine, "",
             "Protocol: see the docstring of `benchmarks/accuracy/pairs.py`. Test NLL/accuracy are those of the "
             "configuration selected by validation NLL on a held-out pool; the test-selected column peeks at the "
             "test set and is an upper bound, not a result. Paired differences are per seed (same subsample, pool "
             "and test set), with a 95% t-interval over seeds (Student t, n_seeds - 1 df). Every strength axis "
             "ends at its exact off limit ('off': plain fine-tuning from the same start, no backbone prior, one "
             "trial per training set shared by every kind), and the kind (standard, L2-SP, learned low-rank, "
             "learned diagonal, or none) is chosen on the pool ('selected'). 'prior share' is the N-aware strength "
             "diagnostic: the prior's largest share of one layer's curvature of the MAP objective at the trained "
             "model (prior precision against the data's GGN on the training set); a prior is 'off' only below 1% "
             "(ptyl.autotune.prior_share). 'std ratio' = median prior std / median |theta0| (descriptive: it "
             "ignores N). Search status per selection: interior / off limit / flat (no change beyond the strong "
             "edge) / at the documented hard bound / edge (unextended: should not happen). Fit: training NLL of the "
             "final model <= 0.05 ('fit'), above it under "
             "an active prior ('prior-limited'), or above it with the prior off ('UNDERTRAINED'); 'sampled' for SGLD "
             "(the "
             "model average of samples has no point to converge to).", ""]
    payload: dict[str, Any] = {"settings": {k: v for k, v in cfg.items() if k != "pairs"}, "pairs": cfg["pairs"],
                               "tables": {}, "records": records}
    summary, payload["summary"] = summary_rows(records, cfg)
    lines += ["## Summary: the selection against tuned standard fine-tuning", "", summary, ""]
    for pair in cfg["pairs"]:
        lines.append(f"## {pair}")
        lines.append("")
        for n in cfg["pairs"][pair]["n"]:
            group = [r for r in records if r["pair"] == pair and r["n"] == n]
            if not group:
                continue
            size = group[0]["n_per_class"]
            lines += [f"### n = {n}{f' ({size})' if n == 'full' else ''} per class "
                      f"({len({r['seed'] for r in group})} seeds)", "", method_table(group), ""]
            table, data = paired(group)
            if data:
                lines += [table, ""]
            payload["tables"][f"{pair} n={n}"] = data
    return "\n".join(lines), payload
