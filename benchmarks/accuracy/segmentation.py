"""Segmentation downstream of a classification source: learned prior vs standard fine-tuning vs L2-SP.

    python benchmarks/accuracy/segmentation.py           # full: 20 and 100 training canvases, 3 seeds (~13 min)
    python benchmarks/accuracy/segmentation.py --quick   # smoke test, under a minute

Source (once): a SmallCNN (width 16) trained with cross-entropy on the 8,000-image KMNIST train split, then SWAG while
training goes on at a constant learning rate (:func:`ptyl.pipeline.learn_source_prior`): a low-rank Gaussian over
``features.*`` and the SWA-mean weights next to it.

Downstream: per-pixel segmentation of MNIST digit canvases (:class:`ptyl.data.DigitCanvasSegmentation`: 28x28
canvases holding one MNIST digit each, mask = 1 + digit class where the intensity exceeds 0.3, else background; 11
classes). Training canvases come from the MNIST train split (``seed`` draws them, so each seed is a different
training set), the 300 test canvases from the disjoint MNIST test split (fixed). The model is
``SegmentationNet(SmallCNN)`` (:class:`ptyl.pipeline.SegmentationTask`): its encoder ``features.*`` starts at the
source SWA mean (the names match the prior), the decoder is new and gets N(0, 1). Backbone priors:

=================  ===============================================  ============================
learned prior      N(mu, lam Sigma), low-rank SWAG from the source  Shwartz-Ziv et al. 2022
standard           N(0, v I)  (weight decay)                        standard fine-tuning
L2-SP              N(theta_source, v I)                             Li et al. 2018
=================  ===============================================  ============================

Training: Adam (lr 5e-3, batch 10, cosine decay) for every method and every trial; with plain SGD at a CPU budget
the network only learned foreground vs background (mIoU ~0.10, earlier version of this benchmark). Adam is scale
invariant, so even the stiffest prior on the grid cannot make a trial diverge (SGD diverged for strict priors at lr
0.3); the table counts diverged trials anyway.

Tuning, the same budget for every method (:func:`ptyl.pipeline.run_transfer`, the pipeline the CLI and the demo use):
:func:`ptyl.tuning.tune` with ``default_grid(kind, budget)``
(``budget`` log-spaced values of the method's main axis over the library's default range: lambda in 10^[0, 8],
standard v in 10^[-2, 2], L2-SP v in 10^[-4, 0]) at the one shared learning rate. Canvases carry a mask, not one
label, so ``tune`` splits them at random (seeded 80 / 20, ``split="auto"``); every trial is scored by per-pixel
validation NLL, and the chosen value is refit on all the training canvases and evaluated on the test canvases.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    add_common_args, fmt_mean_std, fmt_table, machine_info, machine_line, mean_std_fields, set_threads,
    write_results,
)

from ptyl.pipeline import SegmentationTask, learn_source_prior, run_transfer  # noqa: E402
from ptyl.priors import PriorKind  # noqa: E402
from ptyl.tuning import default_grid  # noqa: E402

NAME = "segmentation"
# label -> prior kind (the grid is ptyl.tuning.default_grid(kind, budget))
METHODS = {
    "learned prior (low-rank SWAG)": PriorKind.LOWRANK,
    "standard fine-tuning": PriorKind.STANDARD,
    "L2-SP": PriorKind.L2SP,
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
    ns: tuple[int, ...] = (20, 100)
    steps: tuple[int, ...] = (400, 800)  # Adam steps per n on the 80 % split (epochs fixed from these)
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 10
    optimizer: str = "adam"
    lr: float = 5e-3
    decoder_channels: int = 16
    budget: int = 3
    n_test: int = 300


def settings(quick: bool) -> Settings:
    if not quick:
        return Settings()
    return Settings(source_size=500, pretrain_epochs=1, swag_epochs=1, source_batch=100, rank=2,
                    ns=(10,), steps=(6,), seeds=(0,), budget=2, n_test=20)


# ------------------------------------------------------------------------------------------------- source stage
def learn_source(s: Settings, out: Path, progress: bool) -> tuple[Path, float]:
    """The pipeline's source stage (:func:`ptyl.pipeline.learn_source_prior`): a prior file + SWA-mean weights."""
    start = time.perf_counter()
    path = learn_source_prior("kmnist", "smallcnn", pretrain_epochs=s.pretrain_epochs, swag_epochs=s.swag_epochs,
                              rank=s.rank, lr=s.source_lr, batch_size=s.source_batch,
                              n_per_class=None if s.source_size is None else s.source_size // 10,
                              model_kwargs={"width": s.width}, out=out / "segmentation_prior.safetensors",
                              progress=progress)
    seconds = time.perf_counter() - start
    print(f"source: {path} ({seconds:.0f} s)", flush=True)
    return path, seconds


# ------------------------------------------------------------------------------------------------ downstream
def run(s: Settings, out: Path, progress: bool) -> tuple[list[dict], float]:
    """Every method through :func:`ptyl.pipeline.run_transfer` with the segmentation task (``tune`` over the
    method's main axis on a random 80/20 canvas split, per-pixel val NLL; refit on all canvases; test)."""
    prior, source_s = learn_source(s, out, progress)
    task = SegmentationTask("mnist", n_test=s.n_test, decoder_channels=s.decoder_channels, test_seed=10_000, **CANVAS)
    labels = {str(kind): label for label, kind in METHODS.items()}
    rows = []
    for n, steps in zip(s.ns, s.steps):
        n_fit = n - max(1, round(0.2 * n))  # tune's split: epochs give ~`steps` steps on the 80 %
        epochs = max(1, math.ceil(steps / math.ceil(n_fit / s.batch_size)))
        for seed in s.seeds:
            records = run_transfer(prior, task=task, n_per_class=[n], seeds=[seed], methods=list(labels),
                                   budget=s.budget, lrs=(s.lr,), epochs=epochs, batch_size=s.batch_size,
                                   folds=None,  # the committed protocol: one random 80/20 canvas split
                                   train_overrides={"optimizer": s.optimizer}, progress=False)
            for record in records:
                axis = METHODS[labels[record["method"]]].recipe.axis
                row = {"method": labels[record["method"]], "n_canvases": n, "seed": seed,
                       **{k: record[k] for k in KEYS}, "best": {axis: record["selected"].get(axis)},
                       "at_edge": any(w.startswith(f"best {axis}=") for w in record["edge_warnings"]),
                       "diverged_trials": sum(not math.isfinite(r["val_nll"]) for r in record["validation"]),
                       "tuning": record["validation"], "split": record["split"], "epochs": epochs,
                       "seconds": record["wall_time_s"]}
                rows.append(row)
                print(f"n={n:4d} seed={seed} {row['method']:30s} mIoU={row['miou']:.3f} "
                      f"pixacc={row['pixel_accuracy']:.3f} nll={row['nll']:.3f} ece={row['ece']:.3f} "
                      f"best={row['best']} ({row['seconds']:.0f} s)", flush=True)
    return rows, source_s


KEYS = ("miou", "pixel_accuracy", "nll", "ece")


def summarise(rows: list[dict], s: Settings) -> tuple[list[list[str]], list[dict]]:
    table, summary = [], []
    for n in s.ns:
        for method in METHODS:
            cell = [r for r in rows if r["n_canvases"] == n and r["method"] == method]
            stats = {k: [r[k] for r in cell] for k in KEYS}
            chosen = ", ".join(f"{v:g}" for r in cell for v in r["best"].values())
            table.append([str(n), method, *(fmt_mean_std(stats[k]) for k in KEYS), chosen,
                          f"{sum(r['at_edge'] for r in cell)}/{len(cell)}",
                          f"{sum(r['diverged_trials'] for r in cell)}/{sum(len(r['tuning']) for r in cell)}"])
            summary.append({"n_canvases": n, "method": method, "seeds": len(cell),
                            **mean_std_fields(stats)})
    return table, summary


def paired_differences(rows: list[dict], s: Settings) -> tuple[list[str], list[dict]]:
    """Learned prior minus each baseline, paired by seed (same training canvases, same split), in mIoU and NLL.

    Verdict: "better" / "worse" only when every seed agrees on the sign of the mIoU difference and its mean exceeds
    0.01; otherwise "no consistent difference"."""
    learned = next(iter(METHODS))
    lines, data = [], []
    for n in s.ns:
        by = {(r["method"], r["seed"]): r for r in rows if r["n_canvases"] == n}
        for baseline in list(METHODS)[1:]:
            seeds = [sd for sd in s.seeds if (learned, sd) in by and (baseline, sd) in by]
            d = {k: [by[(learned, sd)][k] - by[(baseline, sd)][k] for sd in seeds] for k in ("miou", "nll")}
            wins = sum(x > 0 for x in d["miou"])
            mean_miou = statistics.mean(d["miou"])
            if wins == len(seeds) and mean_miou > 0.01:
                verdict = "learned prior better"
            elif wins == 0 and mean_miou < -0.01:
                verdict = "learned prior worse"
            else:
                verdict = "no consistent difference"
            spread = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in d.items()}
            lines.append(f"- {n} canvases, learned prior − {baseline}: mIoU {mean_miou:+.3f} ± {spread['miou']:.3f}, "
                         f"NLL {statistics.mean(d['nll']):+.3f} ± {spread['nll']:.3f}; higher mIoU in {wins}/"
                         f"{len(seeds)} seeds: **{verdict}**.")
            data.append({"n_canvases": n, "baseline": baseline, "seeds": seeds, "miou_diff": d["miou"],
                         "nll_diff": d["nll"], "verdict": verdict})
    return lines, data


def selection_spread(rows: list[dict], s: Settings) -> list[str]:
    """How much the prior strength moves the validation NLL: max - min over a method's grid, median over runs."""
    parts = []
    for n in s.ns:
        cell = [r for r in rows if r["n_canvases"] == n]
        spread = statistics.median(max(t["val_nll"] for t in r["tuning"]) - min(t["val_nll"] for t in r["tuning"])
                                   for r in cell)
        parts.append(f"{n} canvases: {spread:.3f} on {cell[0]['split']['val']} validation canvases")
    return parts


def render(rows: list[dict], s: Settings, info: dict, elapsed: float, source_s: float,
           command: str) -> tuple[str, dict]:
    """The markdown report and the JSON payload of a run."""
    table, summary = summarise(rows, s)
    diff_lines, diffs = paired_differences(rows, s)
    grids = {m: default_grid(k, budget=s.budget, lrs=(s.lr,)) for m, k in METHODS.items()}
    ranges = {m: ", ".join(f"{a} {v}" for a, v in g.items() if a != "lr") for m, g in grids.items()}
    md = "\n".join([
        "# Segmentation on MNIST digit canvases with a KMNIST classification source: learned prior vs standard vs "
        "L2-SP",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min).  ",
        machine_line(info) + ".  ",
        f"Seeds {list(s.seeds)} (each a different set of training canvases); {s.n_test} fixed test canvases from the "
        "MNIST test split. Mean ± std over seeds; NLL and ECE per pixel.",
        "",
        fmt_table(["train canvases", "method", "mIoU", "pixel accuracy", "NLL", "ECE", "chosen value per seed",
                   "best at grid edge", "diverged trials"], table),
        "",
        "Paired differences (learned prior minus baseline, per seed, mean ± std over seeds; NLL: negative is better):",
        "",
        *diff_lines,
        "",
        "Verdict rule: better / worse only when every seed agrees on the sign of the mIoU difference and the mean "
        "difference exceeds 0.01. Validation-NLL range over each method's grid (max − min, median over seeds and "
        f"methods): {'; '.join(selection_spread(rows, s))}.",
        "",
        f"Canvases: {CANVAS['canvas_size']}x{CANVAS['canvas_size']}, one MNIST digit each, 11 pixel classes "
        f"(background + 10 digits), foreground = intensity > {CANVAS['threshold']}. Model: SegmentationNet(SmallCNN("
        f"width={s.width})), decoder width {s.decoder_channels}, decoder prior N(0, 1).",
        f"Source: KMNIST train ({'8,000' if s.source_size is None else s.source_size} images), {s.pretrain_epochs} "
        f"epochs + {s.swag_epochs} SWAG epochs, lr {s.source_lr}, rank {s.rank}, ~{2 * s.rank} snapshots "
        f"({source_s:.0f} s).",
        f"Downstream: {s.optimizer} (cosine), lr {s.lr}, batch {s.batch_size}, about {list(s.steps)} steps on the 80 % "
        f"split for {list(s.ns)} canvases (the refit on all canvases keeps the epochs, so ~25 % more steps). "
        f"Tuning: `ptyl.pipeline.run_transfer` (`ptyl.tuning.tune`), {s.budget} trials per method "
        f"({'; '.join(f'{m}: {r}' for m, r in ranges.items())}), random 80/20 split of the canvases (seeded), "
        "per-pixel validation NLL; the chosen value is refit on all training canvases and tested. "
        "Per-seed values and every trial are in segmentation.json.",
    ])
    data = {"command": command, "machine": info, "elapsed_s": elapsed, "settings": asdict(s), "canvas": CANVAS,
            "methods": {m: {"prior": str(k), "grid": grids[m]} for m, k in METHODS.items()},
            "summary": summary, "paired_differences": diffs, "runs": rows, "source_s": source_s}
    return md, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--progress", action="store_true", help="tqdm bars for the source stage")
    args = parser.parse_args(argv)
    set_threads(args.threads)  # 1 thread by default (see common.set_threads)
    s = settings(args.quick)
    info = machine_info()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, source_s = run(s, out, args.progress)
    elapsed = time.perf_counter() - start
    command = "python benchmarks/accuracy/segmentation.py" + (" --quick" if args.quick else "")
    md, data = render(rows, s, info, elapsed, source_s, command)
    md_path, _ = write_results(args.out, NAME, md, data)
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
