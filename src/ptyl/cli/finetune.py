"""``ptyl finetune`` (downstream training under a learned prior or a baseline) and ``ptyl evaluate``.

Both go through the pipeline's tasks (:mod:`ptyl.pipeline.tasks`): the same data, model adapter and metrics as the
demo and the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ptyl.autotune import prior_share
from ptyl.cli._common import (
    UsageError,
    add_common,
    add_data_model_options,
    add_task_options,
    info,
    model_kwargs,
    nonnegative_float,
    positive_float,
    positive_int,
    progress,
    require,
    task_options,
)
from ptyl.cli._tuning import default_kinds, kinds_spec, report_kinds, show_values
from ptyl.errors import ParameterMismatchError, PtylError
from ptyl.inference import bma_predict, predict_probs
from ptyl.io import (
    atomic_files,
    load_posterior,
    load_samples,
    prior_file_path,
    read_metadata,
    save_samples,
    save_weights,
)
from ptyl.metrics import reliability_diagram, save_json
from ptyl.models import build_model
from ptyl.pipeline import (
    TASKS,
    ClassificationTask,
    Start,
    get_task,
    load_pretrained,
    load_weights,
    pretrained_model_fn,
    pretrained_weights_path,
    train_config,
)
from ptyl.priors import PriorKind, prior_strength
from ptyl.priors.registry import HEAD_VARIANCE
from ptyl.training import Inference, fit
from ptyl.training.precision import PRECISIONS
from ptyl.tuning import AUTO, PriorSpec, TuningStrategy, default_grid, tune


def _baselines() -> list[str]:
    """Every prior kind but the learned low-rank default, and the random-initialisation start (from the registries)."""

    return [str(k) for k in PriorKind if k is not PriorKind.LOWRANK] + [str(Start.SCRATCH)]


def _defaults(option: str) -> str:
    """``lowrank 100, diag 100, ...``: the registry default of ``option`` for every kind that uses it."""
    return ", ".join(f"{kind} {kind.recipe.defaults[option]:g}" for kind in PriorKind
                     if kind.recipe.needs_posterior == (option != "variance") and kind.recipe.axis is not None)


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune on a target data set under the learned prior (or a baseline)",
        description="Fine-tune the pretrained backbone (fresh head) on n examples per class of the target data set "
                    "under the learned low-rank prior, or a baseline prior (--baseline), with MAP, SGLD, cyclical "
                    "SGLD or SWAG; writes results.json, reliability.png and model.safetensors to --out.")
    p.add_argument("--prior", help="prior file from 'ptyl learn-prior' or a shared prior directory "
                                   "(ptyl.io.save_pretrained); without it: --model's own weights under the l2sp "
                                   "baseline, or --baseline scratch")
    targets = ", ".join(f"{t.default_target} ({name})" for name, t in TASKS.items() if t.default_target)
    add_data_model_options(p, data_default=None, model_default=None,
                           data_help=f"target data (default per task: {targets})")
    p.add_argument("--n-per-class", type=positive_int, default=10,
                   help="training examples per class (classification, text) [10]")
    p.add_argument("--inference", "--method", dest="inference", default=str(Inference.MAP),
                   choices=[str(i) for i in Inference],
                   help="inference: MAP, SGLD + BMA, cyclical SGLD + BMA, downstream SWAG + BMA [map]")
    p.add_argument("--baseline", choices=_baselines(),
                   help="replace the learned low-rank prior by another prior kind (standard: N(0, variance), l2sp: "
                        "N(pretrained, variance), diag: learned diagonal, block: learned per-block, none: no prior) "
                        "or start from a random initialisation under the standard prior (scratch)")
    p.add_argument("--width", type=positive_int, help="model width (scratch only; else the prior's)")
    p.add_argument("--scale", type=positive_float,
                   help=f"prior scale lambda of a learned prior [the prior kind's default: {_defaults('scale')}]")
    p.add_argument("--eps", type=nonnegative_float,
                   help="isotropic jitter eps of a learned prior, N(mu, lam Sigma + eps I) [the kind's default: "
                        f"{_defaults('eps')}]")
    p.add_argument("--rank", type=int, help="use the first k <= K deviation columns [all]")
    p.add_argument("--variance", type=positive_float,
                   help=f"prior variance of an isotropic prior [the prior kind's default: {_defaults('variance')}]")
    p.add_argument("--head-variance", type=positive_float, default=HEAD_VARIANCE,
                   help=f"prior variance of the new head [{HEAD_VARIANCE:g}]")
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
                        "an edge optimum to its exact off limit (plain fine-tuning); without --baseline it also "
                        "chooses the prior kind among --kinds on the same pool. "
                        f"{' / '.join(repr(str(s)) for s in automatic)} learn the strength of one kind in one "
                        f"training run on all examples ({' / '.join(map(repr, with_pool))}: from the validation "
                        f"pool's NLL, never trained on; the others: no validation data); 'auto' = {AUTO.value!r}")
    p.add_argument("--kinds", nargs="+", metavar="KIND",
                   help="--tune grid without --baseline: the prior kinds compared on the pool [with --prior: "
                        f"{' '.join(default_kinds(True))}; without: {' '.join(default_kinds(False))}]")
    p.add_argument("--budget", type=positive_int, default=4, help="grid values for --tune grid, before extensions [4]")
    p.add_argument("--val-pool", type=int, default=500,
                   help="classification / text --tune grid: validation examples held out of the target's training "
                        "data [500]")
    p.add_argument("--seed", type=int, default=0, help="seed (few-shot subset, head init, training) [0]")
    p.add_argument("--out", help="output directory (results.json, reliability.png, model.safetensors)")
    add_task_options(p, "finetune")
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
def _source(args: argparse.Namespace, scratch: bool, task_kwargs: dict[str, Any],
            default_model: str | None) -> tuple[dict[str, Any], Any, Any]:
    """(model metadata, pretrained state dict or None, a source model to copy or None): the prior's pretrained
    weights; without a prior the model ``--model`` builds (a factory brings its own weights) or a random start."""

    if not args.prior:
        kwargs = {**task_kwargs, **model_kwargs(args)}
        meta = {"model": args.model or default_model, "model_kwargs": kwargs, "head": args.head or "head"}
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


def _task(args: argparse.Namespace, prior_meta: dict[str, Any], head: str):
    """(the task of ``--task`` built from its flags, the training-set size)."""
    task_class = get_task(args.task)
    args.data = args.data or task_class.default_target
    if prior_meta.get("task") not in (None, args.task) and task_class.has_source_stage():
        raise UsageError(f"prior {args.prior} was learned for the {prior_meta['task']} task, not {args.task}: pass "
                         f"--task {prior_meta['task']} or a prior learned with 'ptyl learn-prior --task {args.task}'")
    return task_class.from_args(args, prior_meta=prior_meta, head=head, log=lambda message: info(args, message))


def _warn_exact_posterior(args: argparse.Namespace, per_class: int | None) -> None:
    """T = 1 samples the exact posterior, which is too broad to average well with few examples per class."""
    if Inference.parse(args.inference).strategy.uses_temperature and args.temperature >= 1.0 and \
            per_class is not None and per_class < 100:
        warnings.warn(f"--temperature {args.temperature:g} samples the exact posterior with {per_class} examples per "
                      "class; below ~100 per class its Bayesian model average is poor (SGLD at T = 1 scored 0.26 "
                      "accuracy at 10 per class on MNIST in benchmarks/results/pairs.md, T = 0.01: 0.95). The "
                      "default is a cold posterior, --temperature 0.01.", UserWarning, stacklevel=2)


def _prior_spec(args: argparse.Namespace, head: str):
    default = PriorKind.LOWRANK if args.prior else PriorKind.L2SP
    kind = PriorKind.STANDARD if args.baseline == Start.SCRATCH else PriorKind.parse(args.baseline or default)
    posterior = load_posterior(args.prior) if kind.recipe.needs_posterior else None
    # a flag left out is None: PriorSpec / make_prior take the kind's registry default
    return PriorSpec(kind=kind, posterior=posterior, scale=args.scale, eps=args.eps, rank=args.rank,
                     variance=args.variance, head=head, head_variance=args.head_variance)


def run_finetune(args: argparse.Namespace) -> int:
    require(args, "out")
    scratch = args.baseline == Start.SCRATCH
    choose_kind = args.tune == TuningStrategy.GRID and args.baseline is None  # --tune grid picks the kind on the pool
    if args.kinds and not choose_kind:
        raise UsageError("--kinds chooses the prior kind with --tune grid; use it without --baseline")
    if args.prior:
        args.prior = str(prior_file_path(args.prior))  # a shared prior directory (ptyl.io.save_pretrained) works too
    if args.prior and not Path(args.prior).is_file():
        raise FileNotFoundError(f"prior file not found: {args.prior}")
    if not args.prior and not scratch:
        if args.model is None:
            raise UsageError("'ptyl finetune' needs --prior (a file from 'ptyl learn-prior'), or --model (its own "
                             "weights under a baseline prior), or --baseline scratch")
        if choose_kind:
            info(args, f"no --prior: comparing {', '.join(args.kinds or default_kinds(False))} around "
                       f"{args.model}'s own weights")
        elif args.baseline is None or PriorKind.parse(args.baseline).recipe.needs_posterior:
            if args.baseline is not None:
                raise UsageError(f"--baseline {args.baseline} is a learned prior: it needs --prior")
            args.baseline = str(PriorKind.L2SP)
            info(args, f"no --prior: fine-tuning {args.model} under the {args.baseline} baseline (centred on its "
                       "own weights)")
    start = time.perf_counter()
    out = Path(args.out)
    prior_meta = read_metadata(args.prior) if args.prior else {}
    head = args.head or prior_meta.get("head") or "head"
    task_options(args)  # another task's flag given is an error
    task, size = _task(args, prior_meta, head)
    train, test = task.train_set(size, args.seed), task.test_set(args.seed)
    meta, state, module = _source(args, scratch, task.model_kwargs(train[0]), get_task(args.task).default_model)
    model_fn = pretrained_model_fn(meta, state, task, module=module,
                                   source=pretrained_weights_path(args.prior) if args.prior else "the model")
    spec = _prior_spec(args, task.head)
    config = train_config(args.inference, len(train), steps=args.steps, batch_size=args.batch_size,
                          num_samples=args.num_samples, temperature=args.temperature, lr=args.lr,
                          grad_clip=args.grad_clip, seed=args.seed, progress=progress(args))
    if args.epochs:
        config.epochs, config.max_steps = args.epochs, None
    config.precision = args.precision
    per_class = size if task.size_key == "n_per_class" else None
    _warn_exact_posterior(args, per_class)
    selected: dict[str, Any] = {}
    tuning = None
    info(args, f"fine-tuning on {len(train)} {args.data} training examples: prior {spec.kind}, inference "
               f"{config.inference}, {config.epochs} epochs")
    if args.tune:
        strategy = AUTO if args.tune == "auto" else TuningStrategy.parse(args.tune)
        pool = task.validation_set()
        if not strategy.automatic:
            options = dict(seed=args.seed, config=config, progress=progress(args), val_set=pool,
                           folds=None if pool is not None else 5, objective=task.objective,
                           collate_fn=task.collate_fn, likelihood=task.likelihood)
            if choose_kind:
                kinds = [PriorKind.parse(k, "prior kind in --kinds") for k in args.kinds or
                         default_kinds(bool(args.prior))]
                spec = kinds_spec(args, spec, kinds)
                grids = {str(k): default_grid(k, args.budget, lrs=(args.lr,)) for k in kinds
                         if k.recipe.axis is not None}
                tuned = tune(model_fn, train, spec, grids, kinds=kinds, **options)
                report_kinds(args, tuned)
                spec = replace(spec, kind=tuned.kind)
            else:
                grid = default_grid(spec.kind, args.budget, lrs=(args.lr,))
                tuned = tune(model_fn, train, spec, grid, **options)
        else:
            if strategy.tuner.uses_validation and pool is None:
                raise UsageError(f"--tune {strategy} learns from a validation pool: give --val-pool > 0")
            tuned = tune(model_fn, train, spec, strategy=strategy, seed=args.seed, config=config,
                         progress=progress(args), objective=task.objective, collate_fn=task.collate_fn,
                         val_set=pool if strategy.tuner.uses_validation else None)
        result, selected, tuning = tuned.final, tuned.best, tuned.to_dict()
        info(args, f"tuned ({strategy}, {tuned.search_cost_s:.1f} s): {show_values(selected)}")
        row = tuned.selected
        strength = {k: row.get(k) for k in ("prior_share", "prior_share_blocks", "prior_off", "std_ratio")}
    else:
        torch.manual_seed(args.seed)
        model = model_fn()
        prior = spec.build_prior(model)
        ratio = prior_strength(prior, model).std_ratio  # against the start, as in tuning rows
        result = fit(model, train, prior, config, num_data=len(train), head=task.head)
        share = prior_share(prior, result.model, train, likelihood=task.likelihood, collate_fn=task.collate_fn)
        strength = {"prior_share": share.share, "prior_share_blocks": share.blocks, "prior_off": share.off,
                    "std_ratio": ratio}
    if strength.get("prior_share") is not None:
        info(args, f"prior share of the curvature (N-aware): {strength['prior_share']:.3g}"
                   f"{' -- the prior is off' if strength['prior_off'] else ''}")
    probs = result.predict(test)
    targets = task.targets(test)
    metrics = task.evaluate(probs, targets)
    weights_meta = {k: meta[k] for k in ("model", "model_kwargs", "image_size", "head") if k in meta}
    weights_meta.update({**task.metadata(), "seed": args.seed, "prior": args.prior, "method": config.inference,
                         "baseline": args.baseline, "batch_size": args.batch_size, task.size_key: size})
    if "segmentation" in weights_meta:
        weights_meta["segmentation"]["n_train"] = size
    used = spec.resolved()
    hyper = {"scale": used.scale, "eps": used.eps, "rank": used.rank, "variance": used.variance,
             "head_variance": used.head_variance, "lr": config.lr, **selected}
    report = {"task": args.task, "data": args.data, "prior_file": args.prior, "prior": str(spec.kind),
              "baseline": args.baseline, "method": config.inference,
              "n_per_class": per_class,
              "num_train": len(train), "num_test": len(test), "seed": args.seed, "metrics": metrics,
              "hyperparameters": hyper, "strength": strength, "tuning": tuning, "config": asdict(config),
              "history": result.history,
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


# ----------------------------------------------------------------------------------------------- evaluate
def run_evaluate(args: argparse.Namespace) -> int:
    require(args, "weights")
    model, meta = load_weights(args.weights)
    samples = _samples_file(args, meta)
    data = args.data or meta.get("data")
    if data is None:
        raise UsageError("the weights file does not say which data set it was trained on: pass --data")
    task_class = get_task(meta.get("task", ClassificationTask.name))
    if args.split not in task_class.splits:
        raise UsageError(f"--split {args.split}: {task_class.name} weights are evaluated on "
                         f"{' / '.join(task_class.splits)}")
    task = task_class.from_metadata(meta, data=data, eval_split=args.split)
    classes = getattr(task, "num_classes", None)
    if task_class.size_key == "n_per_class" and classes != meta.get("num_classes", classes):
        raise UsageError(f"{args.weights} predicts {meta['num_classes']} classes but {data!r} has {classes}")
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
        try:
            probs = bma_predict(model, load_samples(samples), loader, bn_loader=bn_loader, progress=progress(args))
        except ParameterMismatchError as err:  # the samples of another model: name their file
            raise ParameterMismatchError(f"{samples}: {err}") from err
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
