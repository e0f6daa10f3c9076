"""``ptyl demo``: the whole story in one command — learn a prior on KMNIST, transfer to MNIST, compare methods.

Source and target are different data sets (Japanese hiragana -> Arabic digits). With n = 10 and 100 examples per
class (two few-shot draws each), standard fine-tuning, L2-SP, the learned low-rank prior (MAP) and the learned
low-rank prior with SGLD and Bayesian model averaging are each tuned with the same budget (validation NLL on a
class-balanced 80/20 split), refit on all n*C examples and scored on MNIST's test split
(`--methods ... diag` adds the learned diagonal prior).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ptyl.cli._common import add_common, info, positive_int, progress
from ptyl.pipeline.methods import Method
from ptyl.priors.registry import PriorKind
from ptyl.training.registry import Inference

METHODS = [Method.of(PriorKind.STANDARD).name, Method.of(PriorKind.L2SP).name, Method.of(PriorKind.LOWRANK).name,
           Method.of(PriorKind.LOWRANK, Inference.SGLD).name]
# Sized for about 8 minutes on 2 shared CPU cores. Every method gets `budget` log-spaced values of its prior-strength
# axis over a 4-decade range (its stable, sensible region; learned-prior scales below ~1e3 make SGD at lr 0.1 diverge
# because the smallest SWAG variances are ~1e-6) at one learning rate. SGLD runs at temperature 0.01 (a cold
# posterior): at T = 1 the posterior of 100 examples under these priors is so broad that its BMA is poor.
FULL = dict(source="kmnist", target="mnist", model="smallcnn", width=16, pretrain_epochs=3, swag_epochs=2, rank=20,
            source_lr=0.05, source_batch_size=64, source_per_class=None, n_per_class=[10, 100], seeds=[0, 1],
            methods=METHODS, budget=4, lr=0.1, steps=200, num_samples=8, temperature=0.01, max_test=None, eps=0.0,
            ranges={PriorKind.STANDARD: (-1.0, 3.0), PriorKind.L2SP: (-2.0, 2.0), PriorKind.LOWRANK: (3.0, 7.0),
                    PriorKind.DIAG: (3.0, 7.0)})
# Seconds: a handful of source images, a tiny network, two trials per method. Exercises every stage, proves nothing.
QUICK = dict(source="kmnist", target="mnist", model="smallcnn", width=4, pretrain_epochs=1, swag_epochs=1, rank=4,
             source_lr=0.05, source_batch_size=32, source_per_class=20, n_per_class=[2, 4], seeds=[0],
             methods=METHODS, budget=2, lr=0.01, steps=6, num_samples=2,
             temperature=0.01, max_test=100, eps=1e-3, ranges=None)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("demo", help="learn a prior on KMNIST, transfer to MNIST, compare methods",
                              description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--quick", action="store_true", help="a seconds-long miniature (smoke test; numbers meaningless)")
    p.add_argument("--out", default="ptyl-demo", help="output directory [ptyl-demo]")
    p.add_argument("--methods", nargs="+",
                   help=f"methods to compare [{' '.join(FULL['methods'])}]; also diag, lowrank-csgld, swag, scratch")
    p.add_argument("--n-per-class", nargs="+", type=positive_int, help="examples per class [10 100]")
    p.add_argument("--seeds", nargs="+", type=int, help="few-shot subset seeds [0 1]")
    p.add_argument("--budget", type=positive_int, help=f"tuning trials per method [{FULL['budget']}]")
    p.add_argument("--steps", type=positive_int, help=f"optimiser steps per fit [{FULL['steps']}]")
    p.add_argument("--prior", help="reuse this prior file instead of learning one")
    p.epilog = "The demo runs on one CPU thread unless --threads is given (small batches gain little from threads)."
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ptyl.metrics import save_json
    from ptyl.pipeline import learn_source_prior, parse_method, plot_data_efficiency, run_transfer, summarize

    if getattr(args, "threads", None) is None:
        import torch

        torch.set_num_threads(1)  # batches of 32 small images gain little from threads; shared cores lose a lot
    settings = dict(QUICK if args.quick else FULL)
    for key in ("methods", "n_per_class", "seeds", "budget", "steps"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    for method in settings["methods"]:
        parse_method(method)  # a typo fails now, not after the source stage
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    s = settings
    if args.prior:
        prior = Path(args.prior)
        if not prior.is_file():
            raise FileNotFoundError(f"prior file not found: {prior}")
        info(args, f"[1/2] reusing prior {prior}")
    else:
        info(args, f"[1/2] source: {s['model']} (width {s['width']}) on {s['source']}: {s['pretrain_epochs']} "
                   f"pretraining epochs, then SWAG (rank {s['rank']}) for {s['swag_epochs']} epochs")
        prior = learn_source_prior(s["source"], s["model"], pretrain_epochs=s["pretrain_epochs"],
                                   swag_epochs=s["swag_epochs"], rank=s["rank"], lr=s["source_lr"],
                                   batch_size=s["source_batch_size"], n_per_class=s["source_per_class"],
                                   model_kwargs={"width": s["width"]}, out=out / "prior.safetensors",
                                   progress=progress(args))
    source_time = time.perf_counter() - start
    info(args, f"      prior: {prior} ({source_time:.0f}s)")
    info(args, f"[2/2] target: {s['target']}, n per class {s['n_per_class']}, seeds {s['seeds']}, methods "
               f"{', '.join(s['methods'])}; each tuned with {s['budget']} trials (validation NLL), then refit; "
               f"lr {s['lr']}, {s['steps']} steps, SGLD temperature {s['temperature']}")
    results = run_transfer(prior, s["target"], n_per_class=s["n_per_class"], seeds=s["seeds"], methods=s["methods"],
                           budget=s["budget"], lrs=(s["lr"],), ranges=s["ranges"], steps=s["steps"],
                           num_samples=s["num_samples"], temperature=s["temperature"], max_test=s["max_test"],
                           eps=s["eps"], out_dir=out, progress=progress(args),
                           log=(lambda line: info(args, line)))
    table = summarize(results, metrics=("accuracy", "nll", "ece"))
    wall = time.perf_counter() - start
    save_json(out / "results.json", {"settings": settings, "wall_time_s": wall, "source_time_s": source_time,
                                     "results": results})
    plot = plot_data_efficiency(results, out / "data_efficiency.png")
    header = (f"ptyl demo{' --quick' if args.quick else ''}: prior learned on {s['source']}, transferred to "
              f"{s['target']} ({s['model']}, width {s['width']})")
    if args.quick:
        header += ("\nSMOKE TEST: every stage runs on a miniature (a handful of images, a width-4 network, a few "
                   "steps); the numbers below mean nothing. Run 'ptyl demo' for the real comparison.")
    (out / "summary.md").write_text(f"# {header}\n\n{table}\n\nwall time: {wall:.0f}s\n", encoding="utf-8")
    print(header)
    print(f"each method: {s['budget']} tuning trials (validation NLL, 80/20 split), lr {s['lr']}, {s['steps']} steps, "
          f"SGLD temperature {s['temperature']}, {s['num_samples']} BMA samples; prior-strength ranges (log10): "
          f"{_ranges(s['ranges'])}")
    print()
    print(table)
    print()
    print(f"wrote {out / 'results.json'}, {plot}, {out / 'summary.md'}")
    print(f"wall time: {wall:.0f}s (source {source_time:.0f}s)")
    sys.stdout.flush()
    return 0


def _ranges(ranges) -> str:
    """``standard [-1, 3], ...``; each kind's registry default when the demo sets none."""
    if ranges is None:
        return "each prior kind's default range (ptyl.priors.PriorKind)"
    return ", ".join(f"{k} [{lo:g}, {hi:g}]" for k, (lo, hi) in ranges.items())
