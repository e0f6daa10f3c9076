"""Segmentation downstream of a classification source: learned prior vs standard fine-tuning vs L2-SP.

    python benchmarks/accuracy/segmentation.py           # full: 20 and 100 training canvases, 2 seeds (~10 min)
    python benchmarks/accuracy/segmentation.py --quick   # smoke test, under a minute

Source (once): a SmallCNN (width 16) trained with cross-entropy on the 8,000-image KMNIST train split, then SWAG while
training goes on at a constant learning rate (``learn_prior``): a low-rank Gaussian over ``features.*``.

Downstream: per-pixel segmentation of MNIST digit canvases (:class:`ptyl.data.DigitCanvasSegmentation`: 28x28
canvases holding one MNIST digit each, mask = 1 + digit class where the intensity exceeds 0.3, else background; 11
classes). Training canvases come from the MNIST train split (``seed`` draws them, so each seed is a different
training set), the 300 test canvases from the disjoint MNIST test split (fixed). The model is
``SegmentationNet(SmallCNN)``: its encoder ``features.*`` starts at the source SWAG mean (the names match the prior),
the decoder is new and gets N(0, 1). Backbone priors:

=================  ===============================================  ============================
learned prior      N(mu, lam Sigma), low-rank SWAG from the source  Shwartz-Ziv et al. 2022
standard           N(0, v I)  (weight decay)                        standard fine-tuning
L2-SP              N(theta_source, v I)                             Li et al. 2018
=================  ===============================================  ============================

Tuning, the same budget for every method: ``--budget`` log-spaced values of the main axis (lambda, or v), 4 decades
each, at one shared learning rate; every trial is trained on a random 80 % of the training canvases and scored by
per-pixel NLL on the other 20 %; the selected trial's model is evaluated on the test canvases (no refit: it keeps the
benchmark inside its time budget, and it is the same protocol for every method). ``ptyl.inference.tuning.tune`` is
not used because its class-balanced split needs one label per example, and a canvas has a mask.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_common_args, fmt_table, machine_info, machine_line, write_results  # noqa: E402

from ptyl.data import DigitCanvasSegmentation, few_shot_subset, load_dataset  # noqa: E402
from ptyl.inference.trainer import TrainConfig, fit  # noqa: E402
from ptyl.metrics.segmentation import evaluate_segmentation  # noqa: E402
from ptyl.models import SmallCNN  # noqa: E402
from ptyl.models.segmentation import SegmentationNet  # noqa: E402
from ptyl.posterior.source import learn_prior, pretrain  # noqa: E402
from ptyl.priors import make_prior  # noqa: E402

NAME = "segmentation"
# label -> (make_prior method, main axis, log10 range of the axis)
METHODS = {
    "learned prior (low-rank SWAG)": ("lowrank", "scale", (4.0, 8.0)),
    "standard fine-tuning": ("standard", "variance", (-2.0, 2.0)),
    "L2-SP": ("l2sp", "variance", (-4.0, 0.0)),
}
CANVAS = {"canvas_size": 28, "digits_per_canvas": (1, 1), "threshold": 0.3, "num_digit_classes": 10}


@dataclass
class Settings:
    width: int = 16
    source_size: int | None = None  # None: the whole KMNIST train split
    pretrain_epochs: int = 3
    swag_epochs: int = 2
    source_lr: float = 0.1
    source_batch: int = 256
    rank: int = 10
    snapshots: int = 12
    ns: tuple[int, ...] = (20, 100)
    steps: tuple[int, ...] = (300, 400)  # SGD steps per n
    seeds: tuple[int, ...] = (0, 1)
    batch_size: int = 10
    lr: float = 0.3
    decoder_channels: int = 16
    budget: int = 3
    n_test: int = 300


def settings(quick: bool) -> Settings:
    if not quick:
        return Settings()
    return Settings(source_size=500, pretrain_epochs=1, swag_epochs=1, source_batch=100, rank=2, snapshots=3,
                    ns=(10,), steps=(6,), seeds=(0,), budget=2, n_test=20)


def logspace(lo: float, hi: float, n: int) -> list[float]:
    return [float(f"{10 ** (lo + (hi - lo) * i / max(n - 1, 1)):.6g}") for i in range(n)]


# ------------------------------------------------------------------------------------------------- source stage
def learn_source(s: Settings, progress: bool) -> dict[str, Any]:
    source = load_dataset("kmnist", "train")
    if s.source_size is not None:
        source = few_shot_subset(source, s.source_size // source.num_classes, seed=0)
    start = time.perf_counter()
    torch.manual_seed(0)
    classifier = SmallCNN(width=s.width)
    pretrain(classifier, source, epochs=s.pretrain_epochs, lr=s.source_lr, batch_size=s.source_batch,
             progress=progress)
    every = max(1, s.swag_epochs * math.ceil(len(source) / s.source_batch) // s.snapshots)
    posterior = learn_prior(classifier, source, epochs=s.swag_epochs, lr=s.source_lr, rank=s.rank,
                            collect_every=every, head="head", batch_size=s.source_batch, progress=progress,
                            metadata={"source": "kmnist-train"})
    state = {k: v.clone() for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    seconds = time.perf_counter() - start
    print(f"source: {posterior.num_parameters} parameters, rank {posterior.rank}, {seconds:.0f} s", flush=True)
    return {"posterior": posterior, "state": state, "seconds": seconds}


def make_model(source: dict[str, Any], s: Settings) -> SegmentationNet:
    """SegmentationNet whose encoder holds the source weights and SWAG mean; new decoder."""
    classifier = SmallCNN(width=s.width)
    classifier.load_state_dict(source["state"], strict=False)
    source["posterior"].load_mean_into(classifier)
    return SegmentationNet(classifier, num_classes=CANVAS["num_digit_classes"] + 1,
                           decoder_channels=s.decoder_channels)


# ------------------------------------------------------------------------------------------------ downstream
def tune_and_test(method: str, source, train, test, s: Settings, steps: int, seed: int) -> dict[str, Any]:
    """Grid over the method's main axis on an 80/20 canvas split; test metrics of the best trial by val NLL."""
    kind, axis, (lo, hi) = METHODS[method]
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(0.2 * len(train)))
    fit_part, val_part = Subset(train, perm[n_val:]), Subset(train, perm[:n_val])
    val_masks = train.masks[perm[:n_val]]
    epochs = max(1, math.ceil(steps / math.ceil(len(fit_part) / s.batch_size)))
    config = TrainConfig(epochs=epochs, batch_size=s.batch_size, lr=s.lr, seed=seed, progress=False)
    trials, best = [], None
    for value in logspace(lo, hi, s.budget):
        torch.manual_seed(seed)  # the same decoder initialisation in every trial
        model = make_model(source, s)
        prior = make_prior(model, kind, posterior=source["posterior"], head="decoder",
                           **{axis: value})  # L2-SP: centred on the weights the model holds now
        row: dict[str, Any] = {axis: value}
        try:
            result = fit(model, fit_part, prior, config, head="decoder")
            row.update({f"val_{k}": v for k, v in evaluate_segmentation(result.predict(val_part), val_masks).items()})
        except FloatingPointError as err:  # divergence: the trial loses
            row.update({"val_nll": math.inf, "error": str(err)})
            result = None
        trials.append(row)
        if result is not None and (best is None or row["val_nll"] < best[0]["val_nll"]):
            best = (row, result)
    if best is None:
        raise RuntimeError(f"every trial of {method} diverged: {trials}")
    metrics = evaluate_segmentation(best[1].predict(test), test.masks)
    chosen = best[0][axis]
    values = [t[axis] for t in trials]
    return {**metrics, "best": {axis: chosen}, "at_edge": len(values) > 1 and chosen in (min(values), max(values)),
            "tuning": trials, "epochs": epochs}


def run(s: Settings, progress: bool) -> tuple[list[dict], float]:
    source = learn_source(s, progress)
    train_pool, test_pool = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    test = DigitCanvasSegmentation(test_pool.images, test_pool.targets, s.n_test, seed=10_000, **CANVAS)
    rows = []
    for n, steps in zip(s.ns, s.steps):
        for seed in s.seeds:
            train = DigitCanvasSegmentation(train_pool.images, train_pool.targets, n, seed=seed, **CANVAS)
            for method in METHODS:
                start = time.perf_counter()
                row = {"method": method, "n_canvases": n, "seed": seed,
                       **tune_and_test(method, source, train, test, s, steps, seed),
                       "seconds": time.perf_counter() - start}
                rows.append(row)
                print(f"n={n:4d} seed={seed} {method:30s} mIoU={row['miou']:.3f} pixacc={row['pixel_accuracy']:.3f} "
                      f"nll={row['nll']:.3f} ece={row['ece']:.3f} best={row['best']} ({row['seconds']:.0f} s)",
                      flush=True)
    return rows, source["seconds"]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


KEYS = ("miou", "pixel_accuracy", "nll", "ece")


def summarise(rows: list[dict], s: Settings) -> tuple[list[list[str]], list[dict]]:
    table, summary = [], []
    for n in s.ns:
        for method in METHODS:
            cell = [r for r in rows if r["n_canvases"] == n and r["method"] == method]
            stats = {k: [r[k] for r in cell] for k in KEYS}
            table.append([str(n), method, *(mean_std(stats[k]) for k in KEYS),
                          f"{sum(r['at_edge'] for r in cell)}/{len(cell)}"])
            summary.append({"n_canvases": n, "method": method, "seeds": len(cell),
                            **{f"{k}_mean": statistics.mean(v) for k, v in stats.items()},
                            **{f"{k}_std": statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in stats.items()}})
    return table, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--progress", action="store_true", help="tqdm bars for the source stage")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or 1)  # 1 thread by default: on a shared 2-core machine 2 threads contend
    s = settings(args.quick)
    info = machine_info()
    start = time.perf_counter()
    rows, source_s = run(s, args.progress)
    elapsed = time.perf_counter() - start
    table, summary = summarise(rows, s)
    command = "python benchmarks/accuracy/segmentation.py" + (" --quick" if args.quick else "")
    ranges = {m: f"{axis} in 10^[{lo:g}, {hi:g}]" for m, (_, axis, (lo, hi)) in METHODS.items()}
    md = "\n".join([
        "# Segmentation on MNIST digit canvases with a KMNIST classification source: learned prior vs standard vs "
        "L2-SP",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min).  ",
        machine_line(info) + ".  ",
        f"Seeds {list(s.seeds)} (each a different set of training canvases); {s.n_test} fixed test canvases from the "
        "MNIST test split. Mean ± std over seeds; NLL and ECE per pixel.",
        "",
        fmt_table(["train canvases", "method", "mIoU", "pixel accuracy", "NLL", "ECE", "best at grid edge"], table),
        "",
        f"Canvases: {CANVAS['canvas_size']}x{CANVAS['canvas_size']}, one MNIST digit each, 11 pixel classes "
        f"(background + 10 digits), foreground = intensity > {CANVAS['threshold']}. Model: SegmentationNet(SmallCNN("
        f"width={s.width})), decoder width {s.decoder_channels}, decoder prior N(0, 1).",
        f"Source: KMNIST train ({'8,000' if s.source_size is None else s.source_size} images), {s.pretrain_epochs} "
        f"epochs + {s.swag_epochs} SWAG epochs, lr {s.source_lr}, rank {s.rank}, ~{s.snapshots} snapshots "
        f"({source_s:.0f} s).",
        f"Downstream: SGD (Nesterov, cosine), lr {s.lr}, batch {s.batch_size}, about {list(s.steps)} steps for "
        f"{list(s.ns)} canvases. Tuning: {s.budget} trials per method ({'; '.join(f'{m}: {r}' for m, r in ranges.items())}), "
        "trained on 80 % of the canvases, chosen by per-pixel validation NLL on the other 20 %; the chosen trial is "
        "tested (no refit). Per-seed values and every trial are in segmentation.json.",
    ])
    data = {"command": command, "machine": info, "elapsed_s": elapsed, "settings": asdict(s), "canvas": CANVAS,
            "methods": {m: {"prior": k, "axis": a, "log10_range": r} for m, (k, a, r) in METHODS.items()},
            "summary": summary, "runs": rows, "source_s": source_s}
    md_path, _ = write_results(args.out, NAME, md, data)
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
