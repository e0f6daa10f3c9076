"""Self-supervised (SimCLR) source prior vs supervised source prior vs standard fine-tuning, KMNIST -> MNIST.

    python benchmarks/accuracy/simclr.py            # full: n = 10, 100 per class, 3 seeds (~10 min on 2 CPU cores)
    python benchmarks/accuracy/simclr.py --quick    # smoke test, under a minute

Source stage (once, on the 8,000-image KMNIST train split, SmallCNN of width 16):

* supervised: train with cross-entropy, then keep training at a constant learning rate while SWAG collects
  (``ptyl.posterior.source.learn_prior``) over ``features.*`` (the task head is left out);
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

Tuning: ``ptyl.inference.tuning.tune`` with the same budget for every method: ``--budget`` values of the method's main
axis (lambda for learned priors, v for standard fine-tuning), each spanning 4 decades, at one shared learning rate;
selection by validation NLL on a class-balanced 80/20 split of the n training images, then a refit on all n.
Reported: test accuracy, NLL and ECE, mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    add_common_args, fmt_mean_std, fmt_table, machine_info, machine_line, mean_std_fields, set_threads,
    write_results,
)

from ptyl.data import SimCLRAugment, few_shot_subset, load_dataset  # noqa: E402
from ptyl.inference.trainer import TrainConfig  # noqa: E402
from ptyl.inference.tuning import MethodSpec, default_grid, tune  # noqa: E402
from ptyl.metrics import evaluate_probs  # noqa: E402
from ptyl.models import SmallCNN  # noqa: E402
from ptyl.posterior.simclr import SimCLRModel, SimCLRObjective  # noqa: E402
from ptyl.posterior.source import learn_prior, pretrain  # noqa: E402

NAME = "simclr"
# (label, source, prior kind) in table order
METHODS = (
    ("standard FT (supervised init)", "supervised", "standard"),
    ("supervised learned prior", "supervised", "lowrank"),
    ("standard FT (SimCLR init)", "simclr", "standard"),
    ("SimCLR learned prior", "simclr", "lowrank"),
)
# log10 range of each method's main axis (4 decades each; see the module docstring)
RANGES = {"lowrank": (4.0, 8.0), "standard": (-2.0, 2.0)}


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
    snapshots: int = 12
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
                    simclr_swag_epochs=1, source_batch=128, rank=2, snapshots=3, ns=(3,), seeds=(0,), steps=(6,),
                    budget=2, test_size=200)


# ------------------------------------------------------------------------------------------------- source stage
def learn_sources(s: Settings, progress: bool) -> dict[str, dict[str, Any]]:
    """Supervised and SimCLR source posteriors (plus the trained trunk weights and BN statistics)."""
    source = load_dataset("kmnist", "train")
    if s.source_size is not None:
        source = few_shot_subset(source, s.source_size // source.num_classes, seed=0)
    steps_per_epoch = math.ceil(len(source) / s.source_batch)
    out = {}
    for kind in ("supervised", "simclr"):
        start = time.perf_counter()
        torch.manual_seed(0)
        classifier = SmallCNN(width=s.width)
        if kind == "supervised":
            model, objective, exclude, head = classifier, None, None, "head"
            pre, swag = s.sup_pretrain_epochs, s.sup_swag_epochs
        else:
            model = SimCLRModel(classifier)  # shares classifier.features: names features.* match downstream
            objective = SimCLRObjective(SimCLRAugment(28), temperature=0.5, seed=0)
            exclude, head = model.excluded_parameter_names(), None
            pre, swag = s.simclr_pretrain_epochs, s.simclr_swag_epochs
        pretrain(model, source, epochs=pre, lr=s.source_lr, batch_size=s.source_batch, objective=objective,
                 progress=progress)
        every = max(1, swag * steps_per_epoch // s.snapshots)
        posterior = learn_prior(model, source, epochs=swag, lr=s.source_lr, rank=s.rank, collect_every=every,
                                head=head, exclude=exclude, batch_size=s.source_batch, objective=objective,
                                progress=progress, metadata={"objective": kind, "source": "kmnist-train"})
        state = {k: v.clone() for k, v in classifier.state_dict().items() if not k.startswith("head.")}
        out[kind] = {"posterior": posterior, "state": state, "seconds": time.perf_counter() - start}
        print(f"source {kind}: {posterior.num_parameters} parameters, rank {posterior.rank}, "
              f"{out[kind]['seconds']:.0f} s", flush=True)
    return out


def model_factory(source: dict[str, Any], width: int):
    """Fresh SmallCNN: source trunk (BN statistics included), SWAG mean on top, new random head."""

    def make() -> SmallCNN:
        model = SmallCNN(width=width)
        model.load_state_dict(source["state"], strict=False)
        source["posterior"].load_mean_into(model)
        return model

    return make


# ------------------------------------------------------------------------------------------------ downstream
def run(s: Settings, progress: bool) -> tuple[list[dict], dict]:
    sources = learn_sources(s, progress)
    target = load_dataset("mnist", "train")
    test = load_dataset("mnist", "test")
    if s.test_size is not None:
        test = few_shot_subset(test, s.test_size // test.num_classes, seed=0)
    rows = []
    for n, steps in zip(s.ns, s.steps):
        for seed in s.seeds:
            train = few_shot_subset(target, n, seed=seed)
            fit_size = len(train) - sum(max(1, round(0.2 * n)) for _ in range(train.num_classes))
            epochs = max(1, math.ceil(steps / math.ceil(fit_size / s.batch_size)))
            config = TrainConfig(epochs=epochs, batch_size=s.batch_size, lr=s.lr)
            for label, source_kind, kind in METHODS:
                source = sources[source_kind]
                spec = MethodSpec(kind=kind, posterior=source["posterior"] if kind == "lowrank" else None)
                grid = default_grid(kind, budget=s.budget, lrs=(s.lr,), log10_range=RANGES[kind])
                start = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = tune(model_factory(source, s.width), train, spec, grid, seed=seed, config=config,
                                  progress=False)
                metrics = evaluate_probs(result.final.predict(test), test.targets)
                row = {"method": label, "source": source_kind, "prior": kind, "n_per_class": n, "seed": seed,
                       "epochs": epochs, **{k: float(v) for k, v in metrics.items()}, "best": result.best,
                       "tuning": result.table, "edge_warnings": result.edge_warnings,
                       "other_warnings": [str(w.message) for w in caught if str(w.message) not in result.edge_warnings],
                       "seconds": time.perf_counter() - start}
                rows.append(row)
                print(f"n={n:4d} seed={seed} {label:30s} acc={row['accuracy']:.3f} nll={row['nll']:.3f} "
                      f"ece={row['ece']:.3f} best={result.best} ({row['seconds']:.0f} s)", flush=True)
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
    rows, timing = run(s, args.progress)
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
        f"~{s.snapshots} snapshots; supervised {timing['source_supervised_s']:.0f} s, SimCLR "
        f"{timing['source_simclr_s']:.0f} s.",
        f"Downstream: SGD (Nesterov, cosine), lr {s.lr}, batch {s.batch_size}, about {list(s.steps)} steps for "
        f"n = {list(s.ns)}; head prior N(0, 1). Tuning: {s.budget} trials per method (lambda in "
        f"10^{RANGES['lowrank']} for learned priors, v in 10^{RANGES['standard']} for standard fine-tuning), chosen "
        "by validation NLL on a class-balanced 80/20 split, then refit on all n. 'best at grid edge' counts seeds "
        "whose chosen value lies at an end of its grid. Per-seed values, chosen hyper-parameters and every "
        "trial are in simclr.json.",
    ])
    data = {"command": command, "machine": info, "elapsed_s": elapsed, "settings": asdict(s),
            "methods": [dict(zip(("label", "source", "prior"), m)) for m in METHODS], "ranges_log10": RANGES,
            "summary": summary, "runs": rows, "timing": timing}
    md_path, _ = write_results(args.out, NAME, md, data)
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
