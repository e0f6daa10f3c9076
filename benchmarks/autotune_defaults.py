"""Defaults of the automatic tuning strategies, chosen on a held-out pair (never on a benchmark pair's test set).

Held-out pair: MNIST-5k (source: SmallCNN-16 pretrained, SWAG rank 20) -> KMNIST (target), which is not one of the
benchmark's transfer pairs. Training sets: n examples per class of the KMNIST train split without a fixed
500-image validation pool (50 per class); every configuration is scored on that pool only. The training budget is
the benchmark's (SGD lr 0.1, Nesterov, batch 32, cosine, ``--steps`` steps, gradient clipping 5, eps = 1e-3), the
strategies start from lambda = 100 (the middle of the learned kinds' grid, 10^[0, 4]) and the head variance 1.

    python benchmarks/autotune_defaults.py --seeds 0 1 --n 10          # ~20 min on one core

Rows: a 5-point lambda grid (reference: its best trial by pool NLL and the summed cost), DE-ELBO over init_std x
hyper_lr, the online marginal likelihood (K-FAC / diagonal GGN, a few update schedules). Writes
``autotune_defaults.{md,json}`` to ``--out`` (resumable: finished rows are kept).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_OUT, ROOT, machine_info, machine_line, set_threads  # noqa: E402

from ptyl.data import few_shot_subset, load_dataset  # noqa: E402
from ptyl.inference import predict_probs  # noqa: E402
from ptyl.io import load_posterior, read_metadata  # noqa: E402
from ptyl.metrics import evaluate_probs, save_json  # noqa: E402
from ptyl.pipeline import ClassificationTask, learn_source_prior, load_pretrained, pretrained_model_fn  # noqa: E402
from ptyl.training import TrainConfig, fit  # noqa: E402
from ptyl.tuning import PriorSpec, TuningStrategy, tune  # noqa: E402

CONFIGS = {
    "grid": None,
    "de-elbo std1e-4 lr1e-2": ("de-elbo", dict(init_std=1e-4, hyper_lr=1e-2, hyper_solver="adam")),
    "de-elbo std1e-3 lr1e-2": ("de-elbo", dict(init_std=1e-3, hyper_lr=1e-2, hyper_solver="adam")),
    "de-elbo std1e-2 lr1e-2": ("de-elbo", dict(init_std=1e-2, hyper_lr=1e-2, hyper_solver="adam")),
    "de-elbo std1e-4 lr1e-1": ("de-elbo", dict(init_std=1e-4, hyper_lr=1e-1, hyper_solver="adam")),
    "de-elbo std1e-3 lr1e-1": ("de-elbo", dict(init_std=1e-3, hyper_lr=1e-1, hyper_solver="adam")),
    "de-elbo std1e-2 lr1e-1": ("de-elbo", dict(init_std=1e-2, hyper_lr=1e-1, hyper_solver="adam")),
    "de-elbo exact": ("de-elbo", dict(hyper_solver="exact")),
    "marglik kfac exact u10": ("marglik", dict(curvature="kfac", fisher="exact", updates=10)),
    "marglik kfac mc u10": ("marglik", dict(curvature="kfac", fisher="mc", updates=10)),
    "marglik kfac mc u5": ("marglik", dict(curvature="kfac", fisher="mc", updates=5)),
    "marglik diag mc u10": ("marglik", dict(curvature="diag", fisher="mc", updates=10)),
    "marglik kfac mc u10 best": ("marglik", dict(curvature="kfac", fisher="mc", updates=10, restore_best=True)),
}
GRID = [1.0, 10.0, 100.0, 1000.0, 10000.0]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n", type=int, nargs="+", default=[10])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--initial", type=float, default=100.0, help="starting lambda of the automatic strategies")
    p.add_argument("--prior", default=str(ROOT / "runs" / "autotune" / "prior_mnist5k_smallcnn16.safetensors"))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def pool_split(seed: int = 10_000, per_class: int = 50):
    """(training pool, validation pool) of the KMNIST train split: ``per_class`` images per class held out."""
    data = load_dataset("kmnist", "train")
    targets = torch.as_tensor(data.targets)
    gen = torch.Generator().manual_seed(seed)
    val, rest = [], []
    for c in range(data.num_classes):
        idx = torch.nonzero(targets == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        val.append(idx[:per_class])
        rest.append(idx[per_class:])
    return data.subset(torch.cat(rest).sort().values), data.subset(torch.cat(val).sort().values)


def config_for(n_examples: int, steps: int, seed: int) -> TrainConfig:
    per_epoch = math.ceil(n_examples / 32)
    return TrainConfig(epochs=max(2, math.ceil(steps / per_epoch)), batch_size=32, lr=0.1, grad_clip=5.0, seed=seed,
                       progress=False)


def run_row(name, model_fn, train, val, spec, config, initial) -> dict:
    start = time.perf_counter()
    if CONFIGS[name] is None:  # every grid value trained on all n and scored on the pool
        trials = []
        for scale in GRID:
            torch.manual_seed(config.seed)
            model = model_fn()
            result = fit(model, train, spec.build_prior(model, scale=scale), config, num_data=len(train),
                         head=spec.head)
            trials.append((scale, evaluate_probs(result.predict(val), val.targets), result.history[-1]["loss"]))
        best_scale, best, loss = min(trials, key=lambda t: float(t[1]["nll"]))
        return {"selected": {"scale": best_scale}, "val_nll": float(best["nll"]),
                "val_accuracy": float(best["accuracy"]), "wall_s": time.perf_counter() - start, "final_loss": loss,
                "curve": {str(s): float(m["nll"]) for s, m, _ in trials}}
    strategy, options = CONFIGS[name]
    bma = {"bma_samples": 10} if strategy == "de-elbo" else {}
    auto = TuningStrategy.parse(strategy).settings(initial={"scale": initial}, **options, **bma)
    tuned = tune(model_fn, train, spec, strategy=strategy, auto=auto, seed=config.seed, config=config, progress=False)
    wall = time.perf_counter() - start
    metrics = evaluate_probs(predict_probs(tuned.final.model, DataLoader(val, batch_size=256)), val.targets)
    row = {"selected": tuned.best, "val_nll": float(metrics["nll"]), "val_accuracy": float(metrics["accuracy"]),
           "wall_s": wall, "final_loss": tuned.table[-1]["loss"]}
    if bma:  # the same run, predictions averaged over 10 draws of q
        averaged = evaluate_probs(tuned.final.predict(val), val.targets)
        row.update({"bma_val_nll": float(averaged["nll"]), "bma_val_accuracy": float(averaged["accuracy"])})
    return row


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    prior = Path(args.prior)
    if not prior.is_file():
        prior.parent.mkdir(parents=True, exist_ok=True)
        learn_source_prior("mnist5k", "smallcnn", pretrain_epochs=5, swag_epochs=3, rank=20, out=prior,
                           progress=False)
    meta = read_metadata(prior)
    pretrained, _ = load_pretrained(prior)
    posterior = load_posterior(prior)
    task = ClassificationTask("kmnist", image_size=meta.get("image_size"))
    model_fn = pretrained_model_fn(meta, pretrained.state_dict(), task)
    rest, val = pool_split()
    spec = PriorSpec("lowrank", posterior=posterior, eps=1e-3, head=task.head)
    command = "python benchmarks/autotune_defaults.py " + shlex.join(sys.argv[1:])
    out = Path(args.out) / "autotune_defaults.json"
    rows = json.loads(out.read_text()) if out.is_file() else []
    done = {(r["config"], r["n"], r["seed"], r["steps"], r["initial"]) for r in rows}
    for n in args.n:
        for seed in args.seeds:
            train = few_shot_subset(rest, n, seed)
            for name in args.configs:
                key = (name, n, seed, args.steps, args.initial)
                if key in done:
                    continue
                torch.manual_seed(seed)
                row = run_row(name, model_fn, train, val, spec, config_for(len(train), args.steps, seed), args.initial)
                rows.append({"config": name, "n": n, "seed": seed, "steps": args.steps, "initial": args.initial,
                             "command": command, **row})
                print(json.dumps(rows[-1]), flush=True)
                save_json(out, rows)
    write_table(rows, Path(args.out) / "autotune_defaults.md")


def write_table(rows: list[dict], path: Path) -> None:
    commands = list(dict.fromkeys(r["command"] for r in rows))  # the runs that produced the rows, in order
    lines = ["# Defaults of the automatic strategies (held-out pair MNIST-5k -> KMNIST, pool of 500)\n",
             "Commands (rows resume across them):\n", *(f"    {c}" for c in commands), "",
             f"{machine_line(machine_info())} (this table's rendering; each row's wall time is its own run's)\n",
             "| config | n | start lambda | seeds | pool NLL | pool acc | selected lambda (median) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["config"], r["n"], r["initial"]), []).append(r)
    for (name, n, initial), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        def ms(key, rs=rs):
            values = [r[key] for r in rs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.4f} ± {sd:.4f}"
        scales = [r["selected"]["scale"] for r in rs]
        lines.append(f"| {name} | {n} | {initial:g} | {len(rs)} | {ms('val_nll')} | {ms('val_accuracy')} | "
                     f"{statistics.median(scales):.3g} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")
        if all("bma_val_nll" in r for r in rs):
            lines.append(f"| {name} + BMA(10) | {n} | {initial:g} | {len(rs)} | {ms('bma_val_nll')} | "
                         f"{ms('bma_val_accuracy')} | (same run) | |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
