"""Self-supervised (SimCLR) source prior vs supervised source prior vs standard fine-tuning, KMNIST -> MNIST.

    python benchmarks/accuracy/simclr.py            # full: n = 10, 100 per class, 3 seeds (~10 min on 2 CPU cores)
    python benchmarks/accuracy/simclr.py --quick    # smoke test, under a minute

Source stage (once, on the 8,000-image KMNIST train split, SmallCNN of width 16):

* supervised: train with cross-entropy, then keep training at a constant learning rate while SWAG collects
  (:func:`ptyl.pipeline.learn_source_prior`) over ``features.*`` (the task head is left out);
* SimCLR: the same trunk inside ``SimCLRModel`` trained with NT-Xent on two augmented views per image, labels ignored,
  then SWAG over ``features.*`` (the projection head is left out).

Downstream (MNIST, n images per class drawn by ``few_shot_subset(seed)``, so every seed is a different subsample;
evaluated on the 2,000-image MNIST test split). Every model starts from its source's SWAG mean with a new
random head under N(0, 1); the methods differ in the backbone prior (and the source):

=============================  =====================================================================
standard FT (supervised init)  N(0, v I) on the backbone (weight decay), starting at the supervised weights
supervised learned prior       low-rank SWAG prior N(mu, lam Sigma) from the supervised source
standard FT (SimCLR init)      N(0, v I), starting at the SimCLR weights
SimCLR learned prior           low-rank SWAG prior N(mu, lam Sigma) from the SimCLR source
=============================  =====================================================================

Tuning: :func:`ptyl.pipeline.run_transfer` (``ptyl.tuning.tune``) with the same budget for every method:
``--budget`` values of the method's main axis (lambda for learned priors, v for standard fine-tuning), each spanning
4 decades, at one shared learning rate;
selection by validation NLL on a class-balanced 80/20 split of the n training images, then a refit on all n.
Reported: test accuracy, NLL and ECE, mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    add_common_args, fmt_mean_std, fmt_table, machine_info, machine_line, mean_std_fields, set_threads,
    write_results,
)

from ptyl.pipeline import learn_source_prior, run_transfer  # noqa: E402
from ptyl.priors import PriorKind  # noqa: E402

NAME = "simclr"
# (label, source, prior kind) in table order
SUPERVISED, SIMCLR = "supervised", "simclr"  # the source objectives of ptyl.pipeline.learn_source_prior
METHODS = (
    ("standard FT (supervised init)", SUPERVISED, PriorKind.STANDARD),
    ("supervised learned prior", SUPERVISED, PriorKind.LOWRANK),
    ("standard FT (SimCLR init)", SIMCLR, PriorKind.STANDARD),
    ("SimCLR learned prior", SIMCLR, PriorKind.LOWRANK),
)
# log10 range of each method's main axis (4 decades each; see the module docstring)
RANGES = {PriorKind.LOWRANK: (4.0, 8.0), PriorKind.STANDARD: (-2.0, 2.0)}


@dataclass
class Settings:
    width: int = 16
    source_size: int | None = None  # None: the whole KMNIST train split
    sup_pretrain_epochs: int = 3
    sup_swag_epochs: int = 2
    simclr_pretrain_epochs: int = 5
    simclr_swag_epochs: int = 2
    source_lr: float = 0.1
    source_batch: int = 256
    rank: int = 10
    ns: tuple[int, ...] = (10, 100)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: tuple[int, ...] = (100, 200)  # downstream SGD steps per n (on the 80 % split; the refit keeps the epochs)
    batch_size: int = 32
    lr: float = 0.2
    budget: int = 3
    test_size: int | None = None  # None: the whole MNIST test split


def settings(quick: bool) -> Settings:
    if not quick:
        return Settings()
    return Settings(source_size=512, sup_pretrain_epochs=1, sup_swag_epochs=1, simclr_pretrain_epochs=1,
                    simclr_swag_epochs=1, source_batch=128, rank=2, ns=(3,), seeds=(0,), steps=(6,),
                    budget=2, test_size=200)


# ------------------------------------------------------------------------------------------------- source stage
def learn_sources(s: Settings, out: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Supervised and SimCLR prior files (each with its SWA-mean weights), from the pipeline's source stage."""
    out_dir = {}
    for kind, pre, swag in ((SUPERVISED, s.sup_pretrain_epochs, s.sup_swag_epochs),
                            (SIMCLR, s.simclr_pretrain_epochs, s.simclr_swag_epochs)):
        start = time.perf_counter()
        path = learn_source_prior("kmnist", "smallcnn", pretrain_epochs=pre, swag_epochs=swag, rank=s.rank,
                                  lr=s.source_lr, batch_size=s.source_batch, objective=kind,
                                  n_per_class=None if s.source_size is None else s.source_size // 10,
                                  model_kwargs={"width": s.width}, out=out / f"simclr_bench_{kind}.safetensors",
                                  progress=progress)
        out_dir[kind] = {"prior": path, "seconds": time.perf_counter() - start}
        print(f"source {kind}: {path} ({out_dir[kind]['seconds']:.0f} s)", flush=True)
    return out_dir


# ------------------------------------------------------------------------------------------------ downstream
def run(s: Settings, out: Path, progress: bool) -> tuple[list[dict], dict]:
    """Each (source, prior kind) through :func:`ptyl.pipeline.run_transfer` on few-shot MNIST."""
    sources = learn_sources(s, out, progress)
    rows = []
    for n, steps in zip(s.ns, s.steps):
        fit_size = n * 10 - 10 * max(1, round(0.2 * n))  # the 80 % of tune's class-balanced split
        epochs = max(1, math.ceil(steps / math.ceil(fit_size / s.batch_size)))
        for seed in s.seeds:
            for label, source_kind, kind in METHODS:
                records = run_transfer(sources[source_kind]["prior"], "mnist", n_per_class=[n], seeds=[seed],
                                       methods=[str(kind)], budget=s.budget, lrs=(s.lr,), ranges=RANGES,
                                       epochs=epochs, batch_size=s.batch_size, max_test=s.test_size, progress=False,
                                       val_pool=0, folds=None)  # the committed protocol: one 80/20 split
                record = records[0]
                row = {"method": label, "source": source_kind, "prior": str(kind), "n_per_class": n, "seed": seed,
                       "epochs": epochs, **{k: record[k] for k in ("accuracy", "nll", "ece", "brier")},
                       "best": record["selected"], "tuning": record["validation"],
                       "edge_warnings": record["edge_warnings"], "other_warnings": record["warnings"],
                       "seconds": record["wall_time_s"]}
                rows.append(row)
                print(f"n={n:4d} seed={seed} {label:30s} acc={row['accuracy']:.3f} nll={row['nll']:.3f} "
                      f"ece={row['ece']:.3f} best={row['best']} ({row['seconds']:.0f} s)", flush=True)
    timing = {f"source_{k}_s": v["seconds"] for k, v in sources.items()}
    return rows, timing


def summarise(rows: list[dict], s: Settings) -> tuple[list[list[str]], list[dict]]:
    table, summary = [], []
    for n in s.ns:
        for label, _, _ in METHODS:
            cell = [r for r in rows if r["n_per_class"] == n and r["method"] == label]
            stats = {k: [r[k] for r in cell] for k in ("accuracy", "nll", "ece")}
            edges = sum(bool(r["edge_warnings"]) for r in cell)
            table.append([str(n), label, *(fmt_mean_std(stats[k]) for k in ("accuracy", "nll", "ece")),
                          f"{edges}/{len(cell)}"])
            summary.append({"n_per_class": n, "method": label, "seeds": len(cell),
                            **mean_std_fields(stats)})
    return table, summary


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
    rows, timing = run(s, out, args.progress)
    elapsed = time.perf_counter() - start
    table, summary = summarise(rows, s)
    command = "python benchmarks/accuracy/simclr.py" + (" --quick" if args.quick else "")
    md = "\n".join([
        "# SimCLR source prior vs supervised source prior vs standard fine-tuning (KMNIST -> MNIST)",
        "",
        f"Command: `{command}` ({elapsed / 60:.1f} min).  ",
        machine_line(info) + ".  ",
        f"Seeds {list(s.seeds)} (each a different few-shot subsample of the MNIST train split); test: "
        f"{'2,000' if s.test_size is None else s.test_size} MNIST test images. SmallCNN(width={s.width}). Mean ± std "
        "over seeds.",
        "",
        fmt_table(["n / class", "method", "accuracy", "NLL", "ECE", "best at grid edge"], table),
        "",
        f"Source: KMNIST train ({'8,000' if s.source_size is None else s.source_size} images); supervised "
        f"{s.sup_pretrain_epochs} + {s.sup_swag_epochs} SWAG epochs, SimCLR {s.simclr_pretrain_epochs} + "
        f"{s.simclr_swag_epochs} SWAG epochs, lr {s.source_lr}, batch {s.source_batch}, rank {s.rank}, "
        f"~{2 * s.rank} snapshots; supervised {timing['source_supervised_s']:.0f} s, SimCLR "
        f"{timing['source_simclr_s']:.0f} s.",
        f"Downstream: SGD (Nesterov, cosine), lr {s.lr}, batch {s.batch_size}, about {list(s.steps)} steps for "
        f"n = {list(s.ns)}; head prior N(0, 1). Tuning: {s.budget} trials per method (lambda in "
        f"10^{RANGES[PriorKind.LOWRANK]} for learned priors, v in 10^{RANGES[PriorKind.STANDARD]} for standard "
        "fine-tuning), chosen "
        "by validation NLL on a class-balanced 80/20 split, then refit on all n. 'best at grid edge' counts seeds "
        "whose chosen value lies at an end of its grid. Per-seed values, chosen hyper-parameters and every "
        "trial are in simclr.json.",
    ])
    data = {"command": command, "machine": info, "elapsed_s": elapsed, "settings": asdict(s),
            "methods": [dict(zip(("label", "source", "prior"), map(str, m))) for m in METHODS],
            "ranges_log10": {str(k): v for k, v in RANGES.items()},
            "summary": summary, "runs": rows, "timing": timing}
    md_path, _ = write_results(args.out, NAME, md, data)
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
