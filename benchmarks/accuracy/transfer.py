"""Paper-style transfer benchmark at CPU scale: learned priors vs tuned baselines, KMNIST -> MNIST.

Shwartz-Ziv et al. 2022 ("Pre-Train Your Loss", arXiv 2205.10279, Sec. 4) at CPU scale, with every method tuned by the
same protocol and budget (Harvey et al., TMLR 2024: tuned baselines are strong). Full run (the committed results)::

    python benchmarks/accuracy/transfer.py --seeds 0 1 2 --n 10 100 full --budget 6 --lrs 0.03 0.1 --steps 100

    python benchmarks/accuracy/transfer.py --quick --out /tmp/acc   # smoke test, seconds

Source (cached, re-used if the file exists): a SmallCNN of width 16 pretrained on the 8,000-image KMNIST train split,
then SWAG (rank 20) at a constant learning rate; the SWA mean (BatchNorm statistics recomputed) is the pretrained
backbone and the SWAG posterior is the learned prior (:func:`ptyl.pipeline.learn_source_prior`).

Target: MNIST (embedded t10k: train split 8,000 / test split 2,000). For every seed and n (examples per class),
``few_shot_subset(train, n, seed)`` draws the subsample, so every seed is a different subsample *and* a different
80/20 tuning split. ``full`` is the largest class-balanced subset of the train split: 714 per class (the rarest
class, '5', has 714 examples; n = 1000 per class is impossible with 8,000 images). Methods (see
:func:`ptyl.pipeline.parse_method`): ``standard`` (fine-tuning under N(0, v I)), ``l2sp`` (N(theta_0, v I)),
``diag`` / ``lowrank`` (learned prior N(mu, lam Sigma), MAP), ``lowrank-sgld`` / ``lowrank-csgld`` (learned low-rank
prior, SGLD / cyclical SGLD, Bayesian model averaging), ``swag`` (downstream SWAG under N(0, v I), BMA) and
``scratch`` (random init, N(0, v I): the source-free control). Each is tuned by
:func:`ptyl.pipeline.run_transfer` (validation NLL, ``--budget`` log-spaced values of lambda or v per learning rate)
and refit on all n*10 examples, then scored on the 2,000 test images: accuracy, NLL, ECE, Brier.

Outputs (``--out``, default ``benchmarks/results``): ``accuracy.json`` (every run, rewritten atomically after every
(method, n, seed); a re-run skips the entries already there, so an interrupted run resumes), ``accuracy.md``,
``accuracy_efficiency.png`` (accuracy and NLL vs n) and ``accuracy_lambda.png`` (selected lambda / v vs n).
``--quick`` writes ``accuracy_quick.*`` instead.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import DEFAULT_OUT, ROOT, machine_info, machine_line, set_threads, write_results  # noqa: E402

from ptyl.errors import ConfigError  # noqa: E402
from ptyl.pipeline import (  # noqa: E402
    group_results,
    learn_source_prior,
    mean_std,
    parse_method,
    plot_data_efficiency,
    run_transfer,
    summarize,
)
from ptyl.priors import PriorKind  # noqa: E402

NAME = "accuracy"
METHODS = ("standard", "l2sp", "diag", "lowrank", "lowrank-sgld", "lowrank-csgld", "swag", "scratch")
LABELS = {
    "standard": "standard FT (MAP)", "l2sp": "L2-SP (MAP)", "diag": "learned diag (MAP)",
    "lowrank": "learned low-rank (MAP)", "lowrank-sgld": "learned low-rank + SGLD BMA",
    "lowrank-csgld": "learned low-rank + cSGLD BMA", "swag": "downstream SWAG BMA", "scratch": "scratch (no source)",
}
BASELINES = ("standard", "l2sp")
LEARNED = ("diag", "lowrank", "lowrank-sgld", "lowrank-csgld")
SOURCE = dict(source="kmnist", model="smallcnn", width=16, pretrain_epochs=5, swag_epochs=3, rank=20, lr=0.05)
QUICK_SOURCE = dict(source="kmnist", model="smallcnn", width=4, pretrain_epochs=1, swag_epochs=1, rank=4, lr=0.05,
                    n_per_class=30)
TARGET = "mnist"


# ------------------------------------------------------------------------------------------------------------ helpers
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny prior, n=5, 1 seed, 200 test images (seconds)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="subsample seeds (default 0 1 2)")
    p.add_argument("--n", nargs="+", default=None, help="examples per class, ints or 'full' (default 10 100 full)")
    p.add_argument("--methods", nargs="+", default=None, help=f"default: {' '.join(METHODS)}")
    p.add_argument("--budget", type=int, default=None, help="tuning trials per method (default 5)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates in the grid (default 0.03 0.1)")
    p.add_argument("--lambda-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="log10 range of lambda for the learned priors (default 3 7)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per fit (default 100; >= 2 epochs)")
    p.add_argument("--num-samples", type=int, default=None, help="BMA samples of sgld/csgld/swag (default 10)")
    p.add_argument("--prior", default=None, help="cached prior file (learned if missing; default runs/accuracy/...)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder for accuracy.{md,json} and the plots")
    p.add_argument("--fresh", action="store_true", help="ignore (overwrite) results already in the JSON")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    p.add_argument("--progress", action="store_true", help="tqdm bars inside each run")
    p.add_argument("--temperatures", type=float, nargs="+", default=None,
                   help="add a posterior-temperature axis to the grid of sgld/csgld methods (default: T = 1 only)")
    p.add_argument("--name", default=NAME, help=f"result file stem (default {NAME})")
    p.add_argument("--report", action="store_true", help="only re-write the md/plots from the JSON (no runs)")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration; ``key`` holds the parts that must match for resumed entries to be comparable."""
    quick = args.quick
    source = dict(QUICK_SOURCE if quick else SOURCE)
    prior = Path(args.prior) if args.prior else (
        Path(args.out) / "accuracy_quick_prior.safetensors" if quick
        else ROOT / "runs" / "accuracy" / f"prior_{source['source']}_{source['model']}{source['width']}.safetensors")
    cfg = {
        "seeds": args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2]),
        "n": args.n if args.n is not None else (["5"] if quick else ["10", "100", "full"]),
        "methods": args.methods if args.methods is not None else list(METHODS),
        "prior": str(prior),
        "source": source,
        "key": {
            "budget": args.budget if args.budget is not None else (2 if quick else 6),
            "lrs": args.lrs if args.lrs is not None else ([0.1] if quick else [0.03, 0.1]),
            "lambda_log10_range": list(args.lambda_range) if args.lambda_range else [3.0, 7.0],
            "steps": args.steps if args.steps is not None else (8 if quick else 100),
            "num_samples": args.num_samples if args.num_samples is not None else (3 if quick else 10),
            "max_test": 200 if quick else None,
            "target": TARGET,
            "source": {k: v for k, v in source.items()},
        },
    }
    if args.temperatures:
        cfg["key"]["temperatures"] = list(args.temperatures)
    for m in cfg["methods"]:
        parse_method(m)  # raises ConfigError naming a bad method
    if any(s < 0 for s in cfg["seeds"]):
        raise ConfigError(f"seeds must be >= 0, got {cfg['seeds']}")
    return cfg


def resolve_n(labels: list[str], max_balanced: int) -> list[tuple[str, int]]:
    """``[(label, n_per_class)]``; ``full`` = the largest class-balanced subset of the train split."""
    out = []
    for label in labels:
        if str(label).lower() == "full":
            out.append(("full", max_balanced))
            continue
        try:
            n = int(label)
        except ValueError:
            raise ConfigError(f"--n takes positive integers or 'full', got {label!r}") from None
        if not 1 <= n <= max_balanced:
            raise ConfigError(f"n={n} per class is impossible: the {TARGET} train split has at most {max_balanced} "
                              "examples of its rarest class (use 'full' for all of them)")
        out.append((str(n), n))
    return out


def ensure_prior(cfg: dict[str, Any], log) -> tuple[Path, float]:
    """Learn the source prior unless the cached file exists; returns its path and the seconds spent learning it."""
    path = Path(cfg["prior"])
    if path.is_file():
        log(f"re-using cached prior {path}")
        return path, 0.0
    s = cfg["source"]
    log(f"learning the source prior on {s['source']} ({s['model']} width {s['width']}, rank {s['rank']}) -> {path}")
    start = time.perf_counter()
    learn_source_prior(s["source"], s["model"], pretrain_epochs=s["pretrain_epochs"], swag_epochs=s["swag_epochs"],
                       rank=s["rank"], lr=s["lr"], model_kwargs={"width": s["width"]},
                       n_per_class=s.get("n_per_class"), out=path, progress=False)
    return path, time.perf_counter() - start


def main_axis(record: dict[str, Any]) -> tuple[str, float | None]:
    """The prior-strength value a run selected: lambda (``scale``) for learned priors, else the variance ``v``."""
    sel = record.get("selected") or {}
    for key in ("scale", "variance"):
        if key in sel:
            return key, float(sel[key])
    return "", None


def _stats(values: list[float]) -> tuple[float, float]:
    return mean_std(values, finite_only=True)


# ------------------------------------------------------------------------------------------------------------ report
def comparison(results: list[dict[str, Any]], n_labels: dict[int, str]) -> tuple[str, list[str]]:
    """Learned-prior methods vs the best tuned baseline (standard or L2-SP, by mean test NLL) at every n.

    A difference counts only if it exceeds 1 std (the larger of the two methods' seed spreads); the paired
    per-seed difference (same subsample) is shown too."""
    groups = {key: {r["seed"]: r for r in runs} for key, runs in group_results(results).items()}
    lines = ["| n/class | method | vs | Δ accuracy (paired) | Δ NLL (paired) | verdict |",
             "|---|---|---|---|---|---|"]
    verdicts = []
    for n in sorted({r["n_per_class"] for r in results}):
        base = [b for b in BASELINES if (b, n) in groups]
        if not base:
            continue
        best = min(base, key=lambda b: _stats([r["nll"] for r in groups[(b, n)].values()])[0])
        for method in [m for m in LEARNED + ("swag", "scratch") if (m, n) in groups]:
            runs, ref = groups[(method, n)], groups[(best, n)]
            cells, calls = [], []
            for metric, better in (("accuracy", 1.0), ("nll", -1.0)):
                (m_mean, m_std), (b_mean, b_std) = (_stats([r[metric] for r in runs.values()]),
                                                    _stats([r[metric] for r in ref.values()]))
                paired = [runs[s][metric] - ref[s][metric] for s in runs if s in ref]
                p_mean, p_std = _stats(paired)
                diff = m_mean - b_mean
                spread = max(m_std, b_std)
                if len(runs) < 2 or len(ref) < 2 or not math.isfinite(diff):
                    calls.append("n/a (1 seed)")
                elif abs(diff) <= spread:
                    calls.append("tie")
                else:
                    calls.append("better" if better * diff > 0 else "worse")
                cells.append(f"{diff:+.4f} ({p_mean:+.4f} ± {p_std:.4f})")
            verdict = f"acc {calls[0]}, NLL {calls[1]}"
            verdicts.append((n, method, best, calls))
            lines.append(f"| {n_labels.get(n, n)} | {method} | {best} | {cells[0]} | {cells[1]} | {verdict} |")
    sentences = []
    for n in sorted({v[0] for v in verdicts}):
        rows = [v for v in verdicts if v[0] == n and v[1] in LEARNED]
        wins = [m for _, m, _, c in rows if "better" in c and "worse" not in c]
        losses = [m for _, m, _, c in rows if "worse" in c]
        single = [m for _, m, _, c in rows if all(x.startswith("n/a") for x in c)]
        ties = [m for _, m, _, c in rows if m not in wins and m not in losses and m not in single]
        best = rows[0][2] if rows else "baseline"
        parts = []
        if single:
            parts.append(f"{', '.join(single)}: a single seed, so no verdict (see Δ above)")
        if wins:
            parts.append(f"the learned prior helps ({', '.join(wins)} beat tuned {best} by more than 1 std)")
        if ties:
            parts.append(f"{', '.join(ties)} are within 1 std of tuned {best} (no win)")
        if losses:
            parts.append(f"{', '.join(losses)} are worse than tuned {best} by more than 1 std")
        if parts:
            sentences.append(f"- n = {n_labels.get(n, n)} per class: " + "; ".join(parts) + ".")
    return "\n".join(lines), sentences


def lambda_table(results: list[dict[str, Any]], n_labels: dict[int, str]) -> str:
    lines = ["| n/class | method | axis | selected per seed | lr per seed |", "|---|---|---|---|---|"]
    groups = group_results(results, ("method", "n_per_class"))
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in results))}
    for (method, n), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order[kv[0][0]])):
        runs = sorted(runs, key=lambda r: r["seed"])
        axis = next((main_axis(r)[0] for r in runs if main_axis(r)[0]), "")
        values = ", ".join("—" if main_axis(r)[1] is None else f"{main_axis(r)[1]:.3g}" for r in runs)
        lrs = ", ".join(f"{(r.get('selected') or {}).get('lr', float('nan')):.3g}" for r in runs)
        # lambda / v on the edge of its own grid (the lr axis has its own warnings, not counted here)
        edge = sum(any(w.startswith(f"best {axis}=") for w in r.get("edge_warnings", [])) for r in runs)
        axis_name = {"scale": "λ", "variance": "v"}.get(axis, axis)
        lines.append(f"| {n_labels.get(n, n)} | {method} | {axis_name} | {values}"
                     f"{f' ({edge} at grid edge)' if edge else ''} | {lrs} |")
    return "\n".join(lines)


def plot_lambda(results: list[dict[str, Any]], path: Path) -> Path:
    """Selected lambda (learned priors) and v (baselines) against n, one marker per seed, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ptyl.io import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    methods = list(dict.fromkeys(r["method"] for r in results))
    for ax, axis, title in ((axes[0], "scale", "learned priors: selected λ (prior N(μ, λΣ))"),
                            (axes[1], "variance", "N(0 or θ₀, v I) priors: selected v")):
        for i, method in enumerate(methods):
            pts = [(r["n_per_class"], main_axis(r)[1]) for r in results
                   if r["method"] == method and main_axis(r)[0] == axis]
            if not pts:
                continue
            jitter = 1.0 + 0.04 * (i - len(methods) / 2)  # spread overlapping markers
            ax.plot([n * jitter for n, _ in pts], [v for _, v in pts], marker="o", linestyle="none", alpha=0.75,
                    label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training examples per class (n)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def missing_runs(meta: dict[str, Any]) -> str:
    """``n=full seed=1 (8 methods); ...``: the missing runs, grouped by (n, seed)."""
    groups: dict[str, int] = {}
    for entry in meta.get("missing", []):
        n, seed, _ = entry.split(" ", 2)
        groups[f"{n} {seed}"] = groups.get(f"{n} {seed}", 0) + 1
    return "; ".join(f"{k} ({v} method{'s' if v > 1 else ''})" for k, v in groups.items()) or "none"


def weak_prior_sentences(results: list[dict[str, Any]]) -> list[str]:
    """How often tuning chose the weakest prior on offer (largest λ or v) — the regime where no prior can matter."""
    out = []
    for label, methods, axis in (("learned-prior MAP runs (diag, lowrank)", ("diag", "lowrank"), "scale"),
                                 ("baseline MAP runs (standard, l2sp)", ("standard", "l2sp"), "variance")):
        runs = [r for r in results if r["method"] in methods and main_axis(r)[0] == axis]
        if not runs:
            continue
        weakest = sum(any(w.startswith(f"best {axis}=") and "largest" in w for w in r.get("edge_warnings", []))
                      for r in runs)
        top_lr = sum(any(w.startswith("best lr=") and "largest" in w for w in r.get("edge_warnings", []))
                     for r in runs)
        out.append(f"- Tuning picked the weakest prior of the grid (largest {'λ' if axis == 'scale' else 'v'}) in "
                   f"{weakest} of {len(runs)} {label}, and the largest learning rate in {top_lr} of {len(runs)}.")
    return out


def seeds_per_n(results: list[dict[str, Any]], n_labels: dict[int, str]) -> str:
    per: dict[int, set] = {}
    for r in results:
        per.setdefault(r["n_per_class"], set()).add(r["seed"])
    return ", ".join(f"{n_labels.get(n, n)}: {sorted(v)}" for n, v in sorted(per.items()))


def render(cfg: dict[str, Any], meta: dict[str, Any], results: list[dict[str, Any]], n_labels: dict[int, str],
           complete: bool, name: str) -> str:
    key = cfg["key"]
    s = cfg["source"]
    seeds = sorted({r["seed"] for r in results})
    table = summarize(results) if results else "(no results yet)"
    comp, sentences = comparison(results, n_labels) if results else ("", [])
    total = sum(r["wall_time_s"] for r in results)
    full = [f"{v} = {k}" for k, v in n_labels.items() if v == "full"]
    out = [
        f"# Transfer accuracy benchmark: learned priors vs tuned baselines ({s['source']} -> {key['target']})",
        "",
        f"Command: `{meta['command']}`" + ("" if complete else "  \n**PARTIAL: these runs of the requested grid "
                                                                 f"are missing: {missing_runs(meta)}.**"),
        "",
        machine_line(meta["machine"]) + "." + (f" Run: {meta['run_started_utc']} to "
                                               f"{meta.get('run_finished_utc', '(still running)')}."
                                               if meta.get("run_started_utc") else ""),
        "",
        f"Source: {s['model']} (width {s['width']}) on {s['source']} train"
        f"{' (' + str(s['n_per_class']) + ' per class)' if s.get('n_per_class') else ''}, "
        f"{s['pretrain_epochs']} pretraining epochs + {s['swag_epochs']} SWAG epochs (rank {s['rank']}, lr {s['lr']}); "
        f"prior file `{Path(cfg['prior']).name}` (learned in {meta.get('prior_seconds', 0):.0f} s, 0 = cached). "
        f"Target: {key['target']} train split (8,000 images; n per class drawn by `few_shot_subset(seed)`), "
        f"evaluated on {'the first ' + str(key['max_test']) + ' balanced' if key['max_test'] else 'all 2,000'} test "
        f"images. {'; '.join(full) + ' per class (largest class-balanced subset; n = 1000 is impossible).' if full else ''}",  # noqa: E501
        "",
        f"Tuning (identical for every method, `ptyl.pipeline.run_transfer`): budget {key['budget']} trials = "
        f"{key['budget'] // len(key['lrs'])} log-spaced values of λ (learned: 10^{key['lambda_log10_range'][0]:g}.."
        f"10^{key['lambda_log10_range'][1]:g}) or v (standard / scratch / "
        f"SWAG: 10^-2..10^2; L2-SP: 10^-4..10^0) × lr {key['lrs']}, chosen by validation NLL on a class-balanced "
        f"80/20 split (a different split per seed), then refit on all n·10 examples; {key['steps']} optimiser steps "
        f"per fit (at least 2 epochs), batch 32; SGLD / cSGLD / SWAG average {key['num_samples']} samples"
        + (f"; SGLD / cSGLD also tune the posterior temperature T over {key['temperatures']} (so they get "
           f"{len(key['temperatures'])}x the trials)." if key.get("temperatures") else
           " (SGLD / cSGLD sample the T = 1 posterior)."),
        "",
        f"Seeds: {seeds} (each a different subsample and tuning split; per n: {seeds_per_n(results, n_labels)}). "
        "Table: mean ± std over seeds; 'selected' "
        f"lists each distinct choice, '(edge)' = on the edge of its grid; time = mean wall time of one tuned run "
        f"(all trials + refit + test). Total compute in this table: {total / 60:.1f} min.",
        "",
        "## Results",
        "",
        table,
        "",
        "## Where the learned prior helps (vs the better tuned baseline at each n)",
        "",
        "Δ = method − baseline (mean over seeds; in brackets the mean ± std of the per-seed paired differences). "
        "'better'/'worse' only when |Δ| exceeds the larger of the two seed standard deviations; otherwise 'tie'.",
        "",
        comp,
        "",
        *sentences,
        *weak_prior_sentences(results),
        "",
        "## Selected prior strength",
        "",
        "λ: scale of the learned covariance (larger = weaker prior); 'at grid edge' counts seeds whose λ / v is the "
        "smallest or largest value of its grid (in the results table '(edge)' also fires when only the learning rate "
        "is at an edge of its grid); v: variance of N(0, v I) (standard, scratch, "
        "SWAG) or N(θ₀, v I) (L2-SP).",
        "",
        lambda_table(results, n_labels) if results else "",
        "",
        f"Plots: `{name}_efficiency.png` (accuracy and NLL vs n), `{name}_lambda.png` (selected λ / v vs n).",
    ]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    cfg = settings(args)
    name = f"{args.name}_quick" if args.quick else args.name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    command = "python benchmarks/accuracy/transfer.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    meta = {"command": command.strip(), "machine": machine_info(), "threads": threads, "quick": args.quick}
    meta["run_started_utc"] = meta["machine"]["date_utc"]
    json_path = out / f"{name}.json"
    results: list[dict[str, Any]] = []
    if json_path.is_file() and not args.fresh:
        import json

        old = json.loads(json_path.read_text())
        if old.get("settings", {}).get("key") != cfg["key"]:
            raise ConfigError(f"{json_path} holds results of other settings ({old.get('settings', {}).get('key')}); "
                              "pass --fresh to overwrite it or --out to write elsewhere")
        results = old.get("results", [])
        if args.report:  # re-rendering: keep the command, machine and date of the run that produced the numbers
            meta.update({k: old[k] for k in ("command", "machine", "prior_seconds", "run_started_utc",
                                             "run_finished_utc", "note") if k in old})
        log(f"resuming: {len(results)} runs already in {json_path}")

    from ptyl.data import load_dataset
    from ptyl.data.subsets import class_counts

    max_balanced = min(class_counts(load_dataset(TARGET, "train")).values())
    ns = resolve_n(cfg["n"], max_balanced)  # before the (slow) prior, so a bad --n fails at once
    prior, prior_seconds = ensure_prior(cfg, log)
    meta["prior_seconds"] = prior_seconds
    n_labels = {n: label for label, n in ns}
    done = {(r["method"], r["n_per_class"], r["seed"]) for r in results}
    # n-major: every seed of the small n first, so a run cut short loses seeds of the slowest ("full") n only
    jobs = [(seed, label, n, m) for label, n in ns for seed in cfg["seeds"] for m in cfg["methods"]]
    todo = [j for j in jobs if (j[3], j[2], j[0]) not in done]
    log(f"{len(jobs)} runs ({len(jobs) - len(todo)} done), methods {cfg['methods']}, n {[l for l, _ in ns]}, "
        f"seeds {cfg['seeds']}")
    key = cfg["key"]
    start = time.perf_counter()

    def write(complete: bool) -> None:
        shown = [r for r in results if (r["method"], r["n_per_class"], r["seed"]) in
                 {(m, n, s) for s, _, n, m in jobs}]
        order = {(s, n, m): i for i, (s, _, n, m) in enumerate(jobs)}
        shown.sort(key=lambda r: order[(r["seed"], r["n_per_class"], r["method"])])
        meta["machine"]["date_utc"] = meta["machine"]["date_utc"]
        md = render(cfg, meta, shown, n_labels, complete, name)
        data = {"name": name, "quick": args.quick, "complete": complete, **meta, "settings": cfg,
                "n_labels": {str(k): v for k, v in n_labels.items()}, "results": results}
        write_results(out, name, md, data)
        if shown:
            plot_data_efficiency(shown, out / f"{name}_efficiency.png")
            plot_lambda(shown, out / f"{name}_lambda.png")
        return md

    if args.report:
        todo = []
    meta["missing"] = [f"n={label} seed={seed} {m}" for seed, label, n, m in todo]
    for i, (seed, label, n, method) in enumerate(todo, 1):
        lam = tuple(key["lambda_log10_range"])
        grids = None
        plan = parse_method(method)
        if key.get("temperatures") and plan.inference.strategy.uses_temperature:
            from ptyl.tuning import default_grid

            grid = default_grid(plan.prior, key["budget"], lrs=key["lrs"],
                                log10_range=lam if plan.needs_posterior else None)
            grids = {method: {**grid, "temperature": key["temperatures"]}}
        record = run_transfer(prior, TARGET, n_per_class=[n], seeds=[seed], methods=[method], budget=key["budget"],
                              lrs=key["lrs"], ranges={PriorKind.LOWRANK: lam, PriorKind.DIAG: lam}, grids=grids,
                              steps=key["steps"],
                              num_samples=key["num_samples"],
                              max_test=key["max_test"], progress=args.progress)[0]
        record.update({"n_label": label, "label": LABELS.get(method, method)})
        record.pop("validation_models", None)
        results.append(record)
        elapsed = time.perf_counter() - start
        sel = main_axis(record)
        log(f"[{i}/{len(todo)}] seed={seed} n={label:<4s} {method:<14s} acc={record['accuracy']:.4f} "
            f"nll={record['nll']:.4f} ece={record['ece']:.4f} {sel[0]}={sel[1]} lr={record['selected'].get('lr')} "
            f"{record['wall_time_s']:.1f}s (elapsed {elapsed / 60:.1f} min)")
        meta["missing"] = meta["missing"][1:]
        write(complete=False)
    if todo:
        from datetime import datetime, timezone

        meta["run_finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(write(complete=not meta["missing"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
