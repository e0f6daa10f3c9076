"""Self-supervised (SimCLR) source prior vs supervised source prior vs tuned baselines, KMNIST -> MNIST, under issue
21's protocol: a validation pool, every strength axis ending at its off limit, the kind chosen on the pool.

    python benchmarks/accuracy/simclr.py --jobs 2   # full: n = 10, 100 per class, 5 seeds
    python benchmarks/accuracy/simclr.py --quick    # smoke test, about a minute

Every finished (source, n, seed) cell is appended to ``simclr_runs.jsonl`` under a hash of the settings, and each
source prior is kept (``simclr_source_<objective>.json`` names it): an interrupted run resumes where it stopped.

Source stage (once, on the 8,000-image KMNIST train split, SmallCNN of width 16):

* supervised: train with cross-entropy, then keep training at a constant learning rate while SWAG collects
  (:func:`ptyl.pipeline.learn_source_prior`) over ``features.*`` (the task head is left out);
* SimCLR: the same trunk inside ``SimCLRModel`` trained with NT-Xent on two augmented views per image, labels ignored,
  then SWAG over ``features.*`` (the projection head is left out).

Downstream (MNIST, n images per class drawn by ``few_shot_subset(seed)``, so every seed is a different subsample; a
500-image validation pool held out of the MNIST train split; the MNIST test split). For each source, every model
starts from its SWAG mean with a new random head under N(0, 1) and the kinds standard (N(0, v I)), L2-SP
(N(theta_source, v I)) and the learned low-rank prior (N(mu, lam Sigma + eps I)) are tuned together
(:func:`ptyl.pipeline.run_transfer` with kind selection: one search per training set, the off limit -- plain
fine-tuning -- shared, the kind chosen on the pool: "selected"). SGD (Nesterov, lr 0.1, cosine, clipping 5), 500 /
1,000 steps at n = 10 / 100 as in ``pairs.py``. Reported: test NLL, accuracy, ECE (mean ± std over 5 seeds) and
paired 95% t-intervals: per source, selected minus tuned standard fine-tuning and the learned prior minus each
baseline; across sources, SimCLR minus supervised (learned prior, and selection).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_common_args,
    machine_info,
    machine_line,
    reuse_or_learn,
    run_pending_cells,
    search_minutes,
    set_threads,
    settings_key,
    write_results,
)
from pairs import JsonlStore  # noqa: E402
from pairs_report import LABELS, _ci, _verdict, method_table, paired, summary_rows, t_interval  # noqa: E402

from ptyl.pipeline import learn_source_prior, markdown_table, run_transfer  # noqa: E402

NAME = "simclr"
SUPERVISED, SIMCLR = "supervised", "simclr"  # the source objectives of ptyl.pipeline.learn_source_prior
KINDS = ("standard", "l2sp", "lowrank")
GRIDS = {"standard": [10.0, 100.0, 1000.0], "l2sp": [1e-5, 1e-4, 1e-3], "lowrank": [10.0, 100.0, 1000.0]}


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
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: tuple[int, ...] = (500, 1000)
    batch_size: int = 32
    lr: float = 0.1
    grad_clip: float = 5.0
    val_pool: int = 500
    test_size: int | None = None  # None: the whole MNIST test split


def settings(quick: bool) -> Settings:
    if not quick:
        return Settings()
    return Settings(source_size=512, sup_pretrain_epochs=1, sup_swag_epochs=1, simclr_pretrain_epochs=1,
                    simclr_swag_epochs=1, source_batch=128, rank=2, ns=(3,), seeds=(0, 1), steps=(6,),
                    val_pool=100, test_size=200)


# ------------------------------------------------------------------------------------------------- source stage
def source_fields(s: Settings, kind: str) -> dict[str, Any]:
    """The settings that make one source prior (a stored prior is reused when they match)."""
    pre, swag = ((s.sup_pretrain_epochs, s.sup_swag_epochs) if kind == SUPERVISED
                 else (s.simclr_pretrain_epochs, s.simclr_swag_epochs))
    return {"objective": kind, "width": s.width, "source_size": s.source_size, "pretrain_epochs": pre,
            "swag_epochs": swag, "source_lr": s.source_lr, "source_batch": s.source_batch, "rank": s.rank}


def learn_source(s: Settings, kind: str, out: Path, progress: bool) -> tuple[Path, float]:
    """One prior file (with its SWA-mean weights) from the pipeline's source stage."""
    f = source_fields(s, kind)
    start = time.perf_counter()
    path = learn_source_prior("kmnist", "smallcnn", pretrain_epochs=f["pretrain_epochs"],
                              swag_epochs=f["swag_epochs"], rank=s.rank, lr=s.source_lr, batch_size=s.source_batch,
                              objective=kind, n_per_class=None if s.source_size is None else s.source_size // 10,
                              model_kwargs={"width": s.width}, out=out / f"simclr_bench_{kind}.safetensors",
                              progress=progress)
    seconds = time.perf_counter() - start
    print(f"source {kind}: {path} ({seconds:.0f} s)", flush=True)
    return Path(path), seconds


def learn_sources(s: Settings, out: Path, progress: bool) -> dict[str, dict[str, Any]]:
    """Supervised and SimCLR prior files, each reused when a previous run with its settings left it."""
    sources = {}
    for kind in (SUPERVISED, SIMCLR):
        path, seconds = reuse_or_learn(out / f"{NAME}_source_{kind}.json", source_fields(s, kind),
                                       lambda kind=kind: learn_source(s, kind, out, progress), label=f"source {kind}")
        sources[kind] = {"prior": path, "seconds": seconds}
    return sources


# ------------------------------------------------------------------------------------------------ downstream
def cell_key(s: Settings) -> str:
    """Everything but the seeds: stored records count only under the same settings."""
    return settings_key({k: v for k, v in asdict(s).items() if k != "seeds"})


def run_cell(job: tuple[Settings, str, str, int, int, str]) -> list[dict]:
    """One source and training set (n images per class, one seed): the kinds tuned together, the kind selected on
    the pool (:func:`ptyl.pipeline.run_transfer`); its records appended to the store."""
    s, source, prior, n, seed, store = job
    set_threads(1)
    steps = dict(zip(s.ns, s.steps, strict=True))[n]
    grids = {k: {("scale" if k == "lowrank" else "variance"): v, "lr": [s.lr]} for k, v in GRIDS.items()}
    records = run_transfer(prior, "mnist", n_per_class=[n], seeds=[seed], methods=list(KINDS), grids=grids,
                           steps=steps, batch_size=s.batch_size, max_test=s.test_size, val_pool=s.val_pool,
                           train_overrides={"grad_clip": s.grad_clip}, progress=False,
                           log=lambda line: print(f"[{source}]{line}", flush=True))
    for record in records:
        record.update(pair=f"{source} source", n=str(n), source_objective=source, key=cell_key(s))
        JsonlStore(Path(store)).append(record)
    return records


def run(s: Settings, out: Path, progress: bool, jobs: int = 1) -> tuple[list[dict], dict]:
    """Every (source, n, seed) cell not yet in ``simclr_runs.jsonl`` (an interrupted run resumes), on ``jobs``
    processes."""
    sources = learn_sources(s, out, progress)
    store = out / f"{NAME}_runs.jsonl"  # quick and full records differ in their key
    cells = {(src, str(n), seed): (s, src, str(sources[src]["prior"]), n, seed, str(store))
             for src in sources for n in s.ns for seed in s.seeds}
    rows = [r for r in run_pending_cells(JsonlStore(store), cell_key(s), cells, ("source_objective", "n", "seed"),
                                         run_cell, jobs) if r["seed"] in s.seeds]
    rows.sort(key=lambda r: (r["source_objective"] != SUPERVISED, int(r["n"]), r["seed"]))
    return rows, {f"source_{k}_s": v["seconds"] for k, v in sources.items()}


def across_sources(rows: list[dict], s: Settings) -> str:
    """SimCLR minus supervised, paired by seed (same subsample, pool and test set)."""
    lines = []
    for n in s.ns:
        for method in ("lowrank", "selected"):
            by = {src: {r["seed"]: r for r in rows if r["n"] == str(n) and r["method"] == method
                        and r["source_objective"] == src and "error" not in r} for src in (SUPERVISED, SIMCLR)}
            seeds = sorted(set(by[SUPERVISED]) & set(by[SIMCLR]))
            if not seeds:
                continue
            d = t_interval([by[SIMCLR][x]["nll"] - by[SUPERVISED][x]["nll"] for x in seeds])
            a = t_interval([by[SIMCLR][x]["accuracy"] - by[SUPERVISED][x]["accuracy"] for x in seeds])
            lines.append([str(n), LABELS.get(method, method), _ci(d), _ci(a), _verdict(d), len(seeds)])
    return markdown_table(["n / class", "method", "Δ test NLL SimCLR − supervised [95% CI]",
                           "Δ test acc [95% CI]", "verdict (NLL)", "seeds"], lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--progress", action="store_true", help="tqdm bars for the source stage")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one (source, n, seed) cell each")
    args = parser.parse_args(argv)
    set_threads(args.threads)  # 1 thread by default (see common.set_threads)
    s = settings(args.quick)
    info = machine_info()
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, timing = run(s, out, args.progress, jobs=args.jobs)
    elapsed = time.perf_counter() - start
    command = "python benchmarks/accuracy/simclr.py" + (" --quick" if args.quick else "")
    cfg = {"pairs": {f"{src} source": {"n": [str(n) for n in s.ns]} for src in (SUPERVISED, SIMCLR)}}
    summary, summary_data = summary_rows(rows, cfg)
    sections = []
    for cell in cfg["pairs"]:
        for n in s.ns:
            group = [r for r in rows if r["pair"] == cell and r["n"] == str(n)]
            sections += [f"### {cell}, n = {n} per class", "", method_table(group), "", paired(group)[0], ""]
    test = "the MNIST test split" if s.test_size is None else f"{s.test_size} MNIST test images"
    md = "\n".join([
        "# SimCLR source prior vs supervised source prior vs tuned baselines (KMNIST -> MNIST)",
        "",
        "Command: `{}` ({:.1f} min of searches over {} cells, resumable; ".format(command, *search_minutes(
            rows, ("source_objective", "n", "seed"))) + f"this invocation {elapsed / 60:.1f} min).  ",
        machine_line(info) + ".  ",
        f"Seeds {list(s.seeds)} (each a different few-shot subsample of the MNIST train split); a {s.val_pool}-image "
        f"validation pool; test: {test}. SmallCNN(width={s.width}). Mean ± std over seeds. Protocol: the module "
        "docstring of `benchmarks/accuracy/simclr.py` and the protocol paragraph of `pairs.md` (the off limit, the "
        "N-aware prior "
        "share, the search statuses).",
        "",
        "## Summary: the selection against tuned standard fine-tuning (per source)", "", summary, "",
        "## SimCLR minus supervised source (paired by seed)", "", across_sources(rows, s), "",
        *sections,
        f"Source: KMNIST train ({'8,000' if s.source_size is None else s.source_size} images); supervised "
        f"{s.sup_pretrain_epochs} + {s.sup_swag_epochs} SWAG epochs, SimCLR {s.simclr_pretrain_epochs} + "
        f"{s.simclr_swag_epochs} SWAG epochs, lr {s.source_lr}, batch {s.source_batch}, rank {s.rank}; "
        f"supervised {timing['source_supervised_s']:.0f} s, SimCLR {timing['source_simclr_s']:.0f} s.",
        f"Downstream: SGD (Nesterov, cosine), lr {s.lr}, clipping {s.grad_clip}, batch {s.batch_size}, "
        f"{list(s.steps)} steps for n = {list(s.ns)}; head prior N(0, 1). Initial grids {GRIDS}, extended by the "
        "library's rule. Every trial is in simclr.json.",
    ])
    data = {"command": command, "machine": info, "elapsed_s": elapsed, "settings": asdict(s), "grids": GRIDS,
            "summary": summary_data, "runs": rows, "timing": timing}
    md_path, _ = write_results(args.out, NAME, md, data)
    print(md)
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
