"""``ptyl finetune`` (downstream training under a learned prior or a baseline) and ``ptyl evaluate``.

Both go through the pipeline's tasks (:mod:`ptyl.pipeline.tasks`): the same data, model adapter and metrics as the
demo and the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ptyl.cli._common import (
    UsageError, add_common, add_data_model_options, info, model_kwargs, nonnegative_float, positive_float, positive_int,
    progress, require,
)
from ptyl.errors import PtylError


def _baselines() -> list[str]:
    """Every prior kind but the learned low-rank default, and the random-initialisation start (from the registries)."""
    from ptyl.pipeline import Start
    from ptyl.priors import PriorKind

    return [str(k) for k in PriorKind if k is not PriorKind.LOWRANK] + [str(Start.SCRATCH)]


def add_parsers(subparsers) -> None:
    from ptyl.pipeline import ClassificationTask, SegmentationTask
    from ptyl.training.precision import PRECISIONS
    from ptyl.training import Inference
    from ptyl.tuning import AUTO, TuningStrategy

    p = subparsers.add_parser(
        "finetune", help="fine-tune on a target data set under the learned prior (or a baseline)",
        description="Fine-tune the pretrained backbone (fresh head) on n examples per class of the target data set "
                    "under the learned low-rank prior, or a baseline prior (--baseline), with MAP, SGLD, cyclical "
                    "SGLD or SWAG; writes results.json, reliability.png and model.safetensors to --out.")
    p.add_argument("--prior", help="prior file from 'ptyl learn-prior' or a shared prior directory "
                                   "(ptyl.io.save_pretrained); without it: --model's own weights under the l2sp "
                                   "baseline, or --baseline scratch")
    add_data_model_options(p, data_default="mnist", model_default=None, data_help="target data")
    p.add_argument("--n-per-class", type=positive_int, default=10, help="training examples per class [10]")
    p.add_argument("--inference", "--method", dest="inference", default=str(Inference.MAP),
                   choices=[str(i) for i in Inference],
                   help="inference: MAP, SGLD + BMA, cyclical SGLD + BMA, downstream SWAG + BMA [map]")
    p.add_argument("--baseline", choices=_baselines(),
                   help="replace the learned low-rank prior by another prior kind (standard: N(0, variance), l2sp: "
                        "N(pretrained, variance), diag: learned diagonal, block: learned per-block, none: no prior) "
                        "or start from a random initialisation under the standard prior (scratch)")
    p.add_argument("--width", type=positive_int, help="model width (scratch only; else the prior's)")
    p.add_argument("--scale", type=positive_float,
                   help="prior scale lambda of a learned prior [the prior kind's default, 100]")
    p.add_argument("--eps", type=nonnegative_float,
                   help="isotropic jitter eps of a learned prior, N(mu, lam Sigma + eps I) [the kind's default, 1e-3]")
    p.add_argument("--rank", type=int, help="use the first k <= K deviation columns (default: all)")
    p.add_argument("--variance", type=positive_float,
                   help="prior variance of standard / l2sp / scratch [the prior kind's default: 10, 1e-3, 10]")
    p.add_argument("--head-variance", type=positive_float, default=1.0, help="prior variance of the new head [1]")
    p.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (SGD, cosine to 0) [0.1]")
    p.add_argument("--grad-clip", type=positive_float, default=5.0, help="gradient-norm clipping [5]")
    p.add_argument("--epochs", type=positive_int, help="epochs (default: from --steps)")
    p.add_argument("--steps", type=positive_int, default=1000,
                   help="optimiser steps when --epochs is not given [1000: converged at 10-100 per class]")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size [32]")
    p.add_argument("--temperature", type=nonnegative_float, default=0.01,
                   help="posterior temperature of sgld/csgld [0.01, cold; 1 = the exact posterior]")
    p.add_argument("--num-samples", type=positive_int, default=10, help="posterior samples for BMA [10]")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32, or mixed precision bf16 / fp16 (the prior term stays in full precision) [fp32]")
    automatic = [s for s in TuningStrategy if s.automatic]
    with_pool = [str(s) for s in automatic if s.tuner.uses_validation]
    p.add_argument("--tune", nargs="?", const=str(TuningStrategy.GRID),
                   choices=(*(str(s) for s in TuningStrategy), "auto"),
                   help=f"choose the prior strength: '{TuningStrategy.GRID}' (alone: --tune) by validation NLL on a "
                        "held-out pool (--val-pool; 5-fold cross-validation when it is 0), extending the grid past "
                        "an edge optimum; "
                        f"{' / '.join(repr(str(s)) for s in automatic)} learn it in one training run on all "
                        f"examples ({' / '.join(map(repr, with_pool))}: from the validation pool's NLL, never "
                        f"trained on; the others: no validation data); 'auto' = {AUTO.value!r}")
    p.add_argument("--budget", type=positive_int, default=4, help="grid values for --tune grid, before extensions [4]")
    p.add_argument("--val-pool", type=int, default=500,
                   help="classification --tune grid: validation images held out of the target's train split [500]")
    p.add_argument("--task", default=ClassificationTask.name, choices=(ClassificationTask.name, SegmentationTask.name),
                   help="classification (few-shot) or digit-canvas segmentation [classification]")
    p.add_argument("--n-train", type=positive_int, default=64, help="segmentation: training canvases [64]")
    p.add_argument("--n-test", type=positive_int, default=64, help="segmentation: test canvases [64]")
    p.add_argument("--canvas-size", type=positive_int, default=56, help="segmentation: canvas side [56]")
    p.add_argument("--seed", type=int, default=0, help="seed (few-shot subset, head init, training) [0]")
    p.add_argument("--out", help="output directory (results.json, reliability.png, model.safetensors)")
    add_common(p)
    p.set_defaults(func=run_finetune)

    p = subparsers.add_parser("evaluate", help="evaluate saved weights on a data set (metrics JSON)",
                              description="Accuracy, NLL, ECE and Brier (or mIoU for segmentation) of a weights file "
                                          "written by 'ptyl finetune' on a data set's test split.")
    p.add_argument("--weights", help="model.safetensors from 'ptyl finetune'")
    p.add_argument("--samples", help="samples.safetensors from 'ptyl finetune' (sampling methods): evaluate the BMA "
                                     "[the samples.safetensors next to --weights of a sampling run]")
    p.add_argument("--single", action="store_true",
                   help="score the weights file alone even when it comes from a sampling run (its last sample)")
    p.add_argument("--data", metavar="NAME|PATH", help="data set or path (default: the one fine-tuned on)")
    p.add_argument("--split", default="test", choices=("train", "test", "all"), help="split [test]")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    add_common(p)
    p.set_defaults(func=run_evaluate)


# ----------------------------------------------------------------------------------------------- finetune
def _source(args: argparse.Namespace, scratch: bool, in_channels: int) -> tuple[dict[str, Any], Any, Any]:
    """(model metadata, pretrained state dict or None, a source model to copy or None): the prior's pretrained
    weights; without a prior the model ``--model`` builds (a factory brings its own weights) or a random start."""
    from ptyl.io import read_metadata
    from ptyl.models import build_model
    from ptyl.pipeline import load_pretrained

    if not args.prior:
        kwargs = {"in_channels": in_channels, **model_kwargs(args)}
        meta = {"model": args.model or "smallcnn", "model_kwargs": kwargs, "head": args.head or "head"}
        return meta, None, (None if scratch else build_model(meta["model"], **kwargs))
    meta = read_metadata(args.prior)
    arch = meta.get("model") or meta.get("architecture")
    if args.model and arch and args.model != arch:
        raise UsageError(f"prior {args.prior} was learned for architecture {arch!r}, but --model is {args.model!r}; "
                         f"drop --model or learn a prior for {args.model!r}")
    if args.head and meta.get("head") not in (None, args.head):
        raise UsageError(f"prior {args.prior} was learned with head {meta['head']!r}, but --head is {args.head!r}")
    meta = {**meta, "head": args.head or meta.get("head") or "head"}
    if scratch:
        return {k: meta[k] for k in ("model", "model_kwargs", "image_size", "head") if k in meta}, None, None
    return meta, load_pretrained(args.prior)[0].state_dict(), None


def _task(args: argparse.Namespace, image_size: int | None, head: str):
    from ptyl.errors import DataError
    from ptyl.pipeline import ClassificationTask, SegmentationTask

    if args.task == SegmentationTask.name:
        return SegmentationTask(args.data, n_test=args.n_test, canvas_size=args.canvas_size), args.n_train
    pool = args.val_pool if args.tune else 0
    try:
        task = ClassificationTask(args.data, image_size=image_size, head=head, val_pool=pool)
        task.train_set(args.n_per_class, args.seed)  # the pool must leave n per class to train on
    except DataError:
        if not pool:
            raise
        info(args, f"{args.data} cannot spare a {pool}-image validation pool next to {args.n_per_class} per class: "
                   "tuning by 5-fold cross-validation instead")
        task = ClassificationTask(args.data, image_size=image_size, head=head)
    return task, args.n_per_class


def _warn_exact_posterior(args: argparse.Namespace, per_class: int | None) -> None:
    """T = 1 samples the exact posterior, which is too broad to average well with few examples per class."""
    import warnings

    from ptyl.training import Inference

    if Inference.parse(args.inference).strategy.uses_temperature and args.temperature >= 1.0 and \
            per_class is not None and per_class < 100:
        warnings.warn(f"--temperature {args.temperature:g} samples the exact posterior with {per_class} examples per "
                      "class; below ~100 per class its Bayesian model average is poor (SGLD at T = 1 scored 0.26 "
                      "accuracy at 10 per class on MNIST in benchmarks/results/pairs.md, T = 0.01: 0.95). The "
                      "default is a cold posterior, --temperature 0.01.", UserWarning, stacklevel=2)


def _prior_spec(args: argparse.Namespace, head: str):
    from ptyl.io import load_posterior
    from ptyl.pipeline import Start
    from ptyl.priors import PriorKind
    from ptyl.tuning import PriorSpec

    kind = PriorKind.STANDARD if args.baseline == Start.SCRATCH else PriorKind.parse(args.baseline or PriorKind.LOWRANK)
    recipe = kind.recipe
    posterior = load_posterior(args.prior) if recipe.needs_posterior else None
    chosen = {"scale": args.scale, "variance": args.variance}
    if recipe.axis is not None and chosen.get(recipe.axis) is None:
        chosen[recipe.axis] = recipe.default
    return PriorSpec(kind=kind, posterior=posterior, scale=chosen["scale"] or 1.0, eps=args.eps, rank=args.rank,
                     variance=chosen["variance"], head=head, head_variance=args.head_variance)


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from ptyl.io import atomic_files, prior_file, read_metadata, save_samples, save_weights
    from ptyl.metrics import reliability_diagram, save_json
    from ptyl.pipeline import ClassificationTask, Start, pretrained_model_fn, train_config
    from ptyl.priors import PriorKind
    from ptyl.training import fit
    from ptyl.tuning import AUTO, TuningStrategy, default_grid, tune

    require(args, "out")
    scratch = args.baseline == Start.SCRATCH
    if args.prior:
        args.prior = str(prior_file(args.prior))  # a shared prior directory (ptyl.io.save_pretrained) works too
    if args.prior and not Path(args.prior).is_file():
        raise FileNotFoundError(f"prior file not found: {args.prior}")
    if not args.prior and not scratch:
        if args.model is None:
            raise UsageError("'ptyl finetune' needs --prior (a file from 'ptyl learn-prior'), or --model (its own "
                             "weights under a baseline prior), or --baseline scratch")
        if args.baseline is None or PriorKind.parse(args.baseline).recipe.needs_posterior:
            if args.baseline is not None:
                raise UsageError(f"--baseline {args.baseline} is a learned prior: it needs --prior")
            args.baseline = str(PriorKind.L2SP)
            info(args, f"no --prior: fine-tuning {args.model} under the {args.baseline} baseline (centred on its "
                       "own weights)")
    start = time.perf_counter()
    out = Path(args.out)
    prior_meta = read_metadata(args.prior) if args.prior else {}
    head = args.head or prior_meta.get("head") or "head"
    task, size = _task(args, prior_meta.get("image_size"), head)
    train, test = task.train_set(size, args.seed), task.test_set(args.seed)
    meta, state, module = _source(args, scratch, int(train[0][0].shape[0]))
    model_fn = pretrained_model_fn(meta, state, task, module=module)
    spec = _prior_spec(args, task.head)
    config = train_config(args.inference, len(train), steps=args.steps, batch_size=args.batch_size,
                          num_samples=args.num_samples, temperature=args.temperature, lr=args.lr,
                          grad_clip=args.grad_clip, seed=args.seed, progress=progress(args))
    if args.epochs:
        config.epochs, config.max_steps = args.epochs, None
    config.precision = args.precision
    _warn_exact_posterior(args, size if isinstance(task, ClassificationTask) else None)
    selected: dict[str, Any] = {}
    tuning = None
    info(args, f"fine-tuning on {len(train)} {args.data} training examples: prior {spec.kind}, inference "
               f"{config.inference}, {config.epochs} epochs")
    if args.tune:
        strategy = AUTO if args.tune == "auto" else TuningStrategy.parse(args.tune)
        pool = task.validation_set()
        if not strategy.automatic:
            grid = default_grid(spec.kind, args.budget, lrs=(args.lr,))
            tuned = tune(model_fn, train, spec, grid, seed=args.seed, config=config, progress=progress(args),
                         val_set=pool, folds=None if pool is not None else 5, objective=task.objective,
                         collate_fn=task.collate_fn)
        else:
            if strategy.tuner.uses_validation and pool is None:
                raise UsageError(f"--tune {strategy} learns from a validation pool: give --val-pool > 0")
            tuned = tune(model_fn, train, spec, strategy=strategy, seed=args.seed, config=config,
                         progress=progress(args), objective=task.objective, collate_fn=task.collate_fn,
                         val_set=pool if strategy.tuner.uses_validation else None)
        result, selected, tuning = tuned.final, tuned.best, tuned.to_dict()
        info(args, f"tuned ({strategy}, {tuned.search_cost_s:.1f} s): {_values(selected)}")
    else:
        torch.manual_seed(args.seed)
        model = model_fn()
        result = fit(model, train, spec.build_prior(model), config, num_data=len(train), head=task.head)
    probs = result.predict(test)
    targets = task.targets(test)
    metrics = task.evaluate(probs, targets)
    weights_meta = {k: meta[k] for k in ("model", "model_kwargs", "image_size", "head") if k in meta}
    weights_meta.update({**task.metadata(), "seed": args.seed, "prior": args.prior, "method": config.inference,
                         "baseline": args.baseline, "batch_size": args.batch_size, task.size_key: size})
    if "segmentation" in weights_meta:
        weights_meta["segmentation"]["n_train"] = size
    eps = spec.eps if spec.eps is not None else spec.kind.recipe.eps
    hyper = {"scale": spec.scale, "eps": eps, "rank": spec.rank, "variance": spec.variance,
             "head_variance": spec.head_variance, "lr": config.lr, **selected}
    report = {"task": args.task, "data": args.data, "prior_file": args.prior, "prior": str(spec.kind),
              "baseline": args.baseline, "method": config.inference,
              "n_per_class": size if isinstance(task, ClassificationTask) else None,
              "num_train": len(train), "num_test": len(test), "seed": args.seed, "metrics": metrics,
              "hyperparameters": hyper, "tuning": tuning, "config": asdict(config), "history": result.history,
              "wall_time_s": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_files():  # every output file appears, or none does
        reliability_diagram(probs, targets, out / "reliability.png",
                            title=f"{spec.kind} / {config.inference} on {args.data}")
        save_weights(result.model, out / "model.safetensors", weights_meta)
        if result.samples is not None and len(result.samples):
            save_samples(result.samples, out / "samples.safetensors", weights_meta)
        save_json(out / "results.json", report)
    print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
    info(args, f"wrote {out / 'results.json'}, {out / 'reliability.png'}, {out / 'model.safetensors'}")
    return 0


def _values(selected: dict[str, Any]) -> str:
    """``scale=1.2e+03, head_variance=0.4`` (per-block scales in braces)."""
    def show(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {show(x)}" for k, x in v.items()) + "}"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={show(v)}" for k, v in selected.items())


# ----------------------------------------------------------------------------------------------- evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ptyl.inference import bma_predict, predict_probs
    from ptyl.io import load_samples
    from ptyl.metrics import save_json
    from ptyl.pipeline import ClassificationTask, get_task, load_weights

    require(args, "weights")
    model, meta = load_weights(args.weights)
    samples = _samples_file(args, meta)
    data = args.data or meta.get("data")
    if data is None:
        raise UsageError("the weights file does not say which data set it was trained on: pass --data")
    task_class = get_task(meta.get("task", ClassificationTask.name))
    if task_class is ClassificationTask:
        task = ClassificationTask.from_metadata(meta, data=data, eval_split=args.split)
        if task.num_classes != meta.get("num_classes", task.num_classes):
            raise UsageError(f"{args.weights} predicts {meta['num_classes']} classes but {data!r} has "
                             f"{task.num_classes}")
    elif args.split != "test":
        raise UsageError(f"--split {args.split} is for classification weights; {task_class.name} weights are "
                         "evaluated on their test set")
    else:
        task = task_class.from_metadata(meta, data=data)
    seed = int(meta.get("seed", 0))
    test = task.test_set(seed)
    loader = DataLoader(test, batch_size=256, shuffle=False)
    if samples:
        # BMA recomputes each sample's BatchNorm statistics on the fine-tuning set, exactly as 'ptyl finetune' did
        size = meta.get(task.size_key) or (meta.get("segmentation") or {}).get("n_train")
        bn_loader = None
        if data == meta.get("data") and size:
            bn_loader = DataLoader(task.train_set(int(size), seed), batch_size=int(meta.get("batch_size", 32)),
                                   shuffle=False)
        probs = bma_predict(model, load_samples(samples), loader, bn_loader=bn_loader, progress=progress(args))
    else:
        probs = predict_probs(model, loader, progress=progress(args))
    metrics = {k: float(v) for k, v in task.evaluate(probs, task.targets(test)).items()}
    result = {"weights": args.weights, "samples": samples, "data": data, "split": args.split,
              "num_examples": len(test), **metrics}
    if args.out:
        save_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0 if all(math.isfinite(v) for v in metrics.values()) else 1


def _samples_file(args: argparse.Namespace, meta: dict[str, Any]) -> str | None:
    """The samples to average: ``--samples``, else the file 'ptyl finetune' wrote next to the weights of a sampling
    run; a sampling run without either is an error (its weights file holds one sample, not the model average)."""
    from ptyl.training import Inference

    if args.samples or args.single:
        if args.samples and args.single:
            raise UsageError("--samples and --single exclude each other")
        return args.samples
    method = meta.get("method")
    try:
        sampling = method is not None and Inference.parse(method).strategy.collects_samples
    except PtylError:
        sampling = False
    if not sampling:
        return None
    nearby = Path(args.weights).with_name("samples.safetensors")
    if nearby.is_file():
        info(args, f"{args.weights} comes from a {method} run: averaging the samples in {nearby}")
        return str(nearby)
    raise UsageError(f"{args.weights} comes from a {method} run, whose prediction is the average over its samples, "
                     f"and no {nearby.name} lies next to it: pass --samples FILE, or --single to score this one "
                     "sample alone")
