"""``ptyl demo``: the whole story in one command -- learn a prior on two sources, transfer both to MNIST, compare
methods where the prior can help and where it should not.

Two sources, one target (MNIST, 10 images per class, two few-shot draws): MNIST-5k, other images of the same
digits, where a learned prior helps, and KMNIST (Japanese hiragana), the control, where it should tie. Standard
fine-tuning, L2-SP and the learned low-rank prior are each tuned the same way (validation NLL on a 500-image pool
never trained on, the prior-strength grid extended past any edge optimum), trained to convergence and scored on
MNIST's test split (`--methods ... lowrank-sgld diag` adds sampling or the learned diagonal prior).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ptyl.cli._common import add_common, info, positive_int, progress
from ptyl.io.atomic import atomic_write_text
from ptyl.metrics import save_json
from ptyl.pipeline import SELECTED, learn_source_prior, parse_method, plot_data_efficiency, run_transfer, summarize
from ptyl.pipeline.methods import Method
from ptyl.priors.registry import PriorKind

METHODS = [Method.of(PriorKind.STANDARD).name, Method.of(PriorKind.L2SP).name, Method.of(PriorKind.LOWRANK).name]
# Sized for about 5 minutes on 2 shared CPU cores (README: "make demo took"). The grids are those of the benchmark
# (benchmarks/accuracy/pairs.py) with one value fewer; every grid extends past an edge optimum. 500 SGD steps at
# n = 10 per class are converged (doubling them changes test NLL by < 0.01 in the benchmark's budget check).
FULL = dict(sources=["mnist5k", "kmnist"], target="mnist", model="smallcnn", width=16, pretrain_epochs=5,
            swag_epochs=3, rank=20, source_lr=0.05, source_batch_size=128, source_per_class=None, n_per_class=[10],
            seeds=[0, 1], methods=METHODS, lr=0.1, grad_clip=5.0, steps=500, num_samples=10, val_pool=500,
            max_test=None, max_rounds=6,
            grids={PriorKind.STANDARD: [10.0, 100.0, 1000.0], PriorKind.L2SP: [1e-5, 1e-4, 1e-3],
                   PriorKind.LOWRANK: [10.0, 100.0, 1000.0], PriorKind.DIAG: [10.0, 100.0, 1000.0]})
# Seconds: a handful of source images, a tiny network, two grid values. Exercises every stage, proves nothing.
QUICK = dict(FULL, sources=["mnist5k", "kmnist"], width=4, pretrain_epochs=1, swag_epochs=1, rank=4,
             source_batch_size=32, source_per_class=20, n_per_class=[2], seeds=[0], steps=6, num_samples=2,
             val_pool=100, max_test=100, max_rounds=1,
             grids={PriorKind.STANDARD: [10.0, 100.0], PriorKind.L2SP: [1e-4, 1e-3], PriorKind.LOWRANK: [10.0, 100.0],
                    PriorKind.DIAG: [10.0, 100.0]})
BASELINES = (PriorKind.STANDARD, PriorKind.L2SP)
SUMMARY_FILE = "summary.md"  # the deterministic part of the output (scripts/readme_demo.py puts it in the README)
ROLES = {"mnist5k": "same domain: the prior should help", "kmnist": "control: a different script, expect a tie"}


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("demo", help="learn priors on MNIST-5k and KMNIST, transfer to MNIST, compare methods",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="a seconds-long miniature (smoke test; numbers meaningless)")
    p.add_argument("--out", default="ptyl-demo", help="output directory [ptyl-demo]")
    p.add_argument("--methods", nargs="+",
                   help=f"methods to compare [{' '.join(FULL['methods'])}]; also diag, lowrank-sgld, swag, scratch")
    p.add_argument("--sources", nargs="+", choices=list(ROLES), help="source data sets [mnist5k kmnist]")
    p.add_argument("--n-per-class", nargs="+", type=positive_int, help="examples per class [10]")
    p.add_argument("--seeds", nargs="+", type=int, help="few-shot subset seeds [0 1]")
    p.add_argument("--steps", type=positive_int, help=f"SGD steps per fit [{FULL['steps']}]")
    p.add_argument("--jobs", type=positive_int, default=2,
                   help="worker processes, one source -> target pair each, one thread each [2]")
    p.epilog = "Each worker runs on one CPU thread (small batches gain little from threads)."
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "threads", None) is None:
        torch.set_num_threads(1)  # batches of 32 small images gain little from threads; shared cores lose a lot
    s = dict(QUICK if args.quick else FULL)
    for key in ("methods", "sources", "n_per_class", "seeds", "steps"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    for method in s["methods"]:
        parse_method(method)  # a typo fails now, not after the source stage
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, tables, source_times = [], [], {}
    jobs = [(args, s, source, out, i) for i, source in enumerate(s["sources"], 1)]
    if args.jobs > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch thread pools
        with ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=context, initializer=_one_thread) as pool:
            done = list(pool.map(_pair, jobs))
    else:
        done = [_pair(job) for job in jobs]
    for source, (records, table, seconds) in zip(s["sources"], done, strict=False):
        results += records
        tables.append(table)
        source_times[source] = seconds
    wall = time.perf_counter() - start
    save_json(out / "results.json", {"settings": {k: v for k, v in s.items() if k != "grids"}, "wall_time_s": wall,
                                     "source_time_s": source_times, "results": results})
    plot = plot_data_efficiency([{**r, "method": f"{r['pair']}: {r['method']}"} for r in results],
                                out / "data_efficiency.png")
    summary = _summary(args.quick, s, tables)
    atomic_write_text(out / SUMMARY_FILE, summary)
    print(summary)
    print(f"wrote {out / 'results.json'}, {plot}, {out / SUMMARY_FILE}")
    print(f"wall time: {wall:.0f}s (sources {sum(source_times.values()):.0f}s; per fit: results.json)")
    sys.stdout.flush()
    return 0


def _summary(quick: bool, s: dict, tables: list[str]) -> str:
    """What the README shows (``scripts/readme_demo.py`` embeds it): the setting, the protocol and each pair's table
    and paired difference. Every character is deterministic (no wall times), so a test can compare it."""
    header = (f"ptyl demo{' --quick' if quick else ''}: priors learned on {' and '.join(s['sources'])}, "
              f"transferred to {s['target']} ({s['model']}, width {s['width']})")
    if quick:
        header += ("\nSMOKE TEST: every stage runs on a miniature (a handful of images, a width-4 network, a few "
                   "steps); the numbers below mean nothing. Run 'ptyl demo' for the real comparison.")
    protocol = (f"Each method: its prior-strength grid, extended past edge optima and always ending at its off limit "
                f"(plain fine-tuning, shared by every method); selected by validation NLL on {s['val_pool']} "
                f"held-out images, and 'selected' chooses the method (prior kind) on the same pool; SGD lr "
                f"{s['lr']}, {s['steps']} steps (cosine), gradient clipping {s['grad_clip']}; test on "
                f"{s['target']}'s test split.")
    return "\n\n".join([header, protocol, *tables]) + "\n"


def _one_thread() -> None:
    torch.set_num_threads(1)


def _pair(job) -> tuple[list[dict], str, float]:
    """One source -> target pair: learn the prior, compare the methods (in a worker process or here)."""
    args, s, source, out, i = job
    prior, seconds = _source(args, s, source, out, i)
    records = _transfer(args, s, prior, source)
    for r in records:
        r["pair"] = f"{source}->{s['target']}"
    return records, _pair_table(source, s, records), seconds


def _source(args, s, source: str, out: Path, i: int) -> tuple[Path, float]:
    start = time.perf_counter()
    info(args, f"[{i}/{len(s['sources'])}] source {source} ({ROLES.get(source, '')}): {s['model']} width {s['width']}, "
               f"{s['pretrain_epochs']} epochs, then SWAG (rank {s['rank']}) for {s['swag_epochs']} epochs")
    prior = learn_source_prior(source, s["model"], pretrain_epochs=s["pretrain_epochs"], swag_epochs=s["swag_epochs"],
                               rank=s["rank"], lr=s["source_lr"], batch_size=s["source_batch_size"],
                               n_per_class=s["source_per_class"], model_kwargs={"width": s["width"]},
                               out=out / f"prior_{source}.safetensors", progress=progress(args))
    info(args, f"      [{source}] target {s['target']}, n per class {s['n_per_class']}, seeds {s['seeds']}: "
               f"{', '.join(s['methods'])}, each tuned on a {s['val_pool']}-image validation pool")
    return prior, time.perf_counter() - start


def _transfer(args, s, prior: Path, source: str) -> list[dict]:
    grids = {}
    for method in s["methods"]:
        kind = parse_method(method).prior
        grids[method] = {kind.recipe.axis: s["grids"].get(kind, s["grids"][PriorKind.LOWRANK]), "lr": [s["lr"]]}
    return run_transfer(prior, s["target"], n_per_class=s["n_per_class"], seeds=s["seeds"], methods=s["methods"],
                        grids=grids, steps=s["steps"], num_samples=s["num_samples"], val_pool=s["val_pool"],
                        max_test=s["max_test"], train_overrides={"grad_clip": s["grad_clip"]},
                        max_rounds=s["max_rounds"], progress=False, log=(lambda line: info(args, f"[{source}]{line}")))


def _pair_table(source: str, s, records: list[dict]) -> str:
    """The pair's summary table and, per n, the learned prior minus the better baseline (chosen per seed by
    validation NLL), seed by seed."""
    lines = [f"**{source} -> {s['target']}** ({ROLES.get(source, 'source')})", "",
             summarize(records, metrics=("accuracy", "nll", "ece"), wall_time=False)]
    standard = Method.of(PriorKind.STANDARD).name
    for n in s["n_per_class"]:
        by_seed = {seed: {r["method"]: r for r in records if r["seed"] == seed and r["n_per_class"] == n
                          and "error" not in r} for seed in s["seeds"]}
        picks = [(seed, by[SELECTED]["selected_kind"], by[SELECTED]["nll"] - by[standard]["nll"])
                 for seed, by in by_seed.items() if SELECTED in by and standard in by]
        if picks:
            each = ", ".join(f"seed {seed}: {kind}, {d:+.4f}" for seed, kind, d in picks)
            lines.append(f"\nn = {n}: the method chosen on the validation pool (none = the prior off), and its test "
                         f"NLL minus tuned standard fine-tuning: {each}; mean "
                         f"{statistics.fmean(d for _, _, d in picks):+.4f}.")
        deltas = []
        learned, baselines = Method.of(PriorKind.LOWRANK).name, (Method.of(k).name for k in BASELINES)
        baselines = list(baselines)
        for seed in s["seeds"]:
            by = {r["method"]: r for r in records if r["seed"] == seed and r["n_per_class"] == n and "error" not in r}
            base = [by[m] for m in baselines if m in by]
            if learned in by and base:
                best = min(base, key=lambda r: r["val_nll"])
                deltas.append((seed, by[learned]["nll"] - best["nll"], best["method"]))
        if deltas:
            each = ", ".join(f"seed {seed}: {d:+.4f} (vs {m})" for seed, d, m in deltas)
            mean = statistics.fmean(d for _, d, _ in deltas)
            lines.append(f"\nn = {n}: learned low-rank minus the validation-selected baseline, test NLL: {each}; "
                         f"mean {mean:+.4f} (negative: the prior helps). 5 seeds and 95% intervals: "
                         "benchmarks/results/pairs.md.")
    return "\n".join(lines)
