"""``ptyl finetune`` (downstream training under a learned prior or a baseline) and ``ptyl evaluate``."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ptyl.cli._common import (
    UsageError, add_common, info, model_kwargs, nonnegative_float, positive_float, positive_int, progress, require,
)

BASELINES = ("standard", "l2sp", "diag", "scratch")
# Defaults that worked on KMNIST -> MNIST (see `ptyl demo`); use --tune to select them by validation NLL instead.
DEFAULT_SCALE = 1e4
DEFAULT_VARIANCE = {"standard": 1.0, "l2sp": 1e-2, "scratch": 1.0}
SAMPLES_FORMAT = "ptyl-samples"


def add_parsers(subparsers) -> None:
    from ptyl.data import available_datasets
    from ptyl.models import available_models

    p = subparsers.add_parser(
        "finetune", help="fine-tune on a target data set under the learned prior (or a baseline)",
        description="Fine-tune the pretrained backbone (fresh head) on n examples per class of the target data set "
                    "under the learned low-rank prior, or a baseline prior (--baseline), with MAP, SGLD, cyclical "
                    "SGLD or SWAG; writes results.json, reliability.png and model.safetensors to --out.")
    p.add_argument("--prior", help="prior file from 'ptyl learn-prior' (not needed for --baseline scratch)")
    p.add_argument("--data", default="mnist", choices=available_datasets(), help="target data set [mnist]")
    p.add_argument("--n-per-class", type=positive_int, default=10, help="training examples per class [10]")
    p.add_argument("--method", default="map", choices=("map", "sgld", "csgld", "swag"),
                   help="inference: MAP, SGLD + BMA, cyclical SGLD + BMA, downstream SWAG + BMA [map]")
    p.add_argument("--baseline", choices=BASELINES,
                   help="replace the learned low-rank prior: standard (N(0, variance)), l2sp (N(pretrained, "
                        "variance)), diag (learned diagonal), scratch (random init, N(0, variance))")
    p.add_argument("--model", choices=available_models(),
                   help="architecture (default: the prior's; must match it)")
    p.add_argument("--width", type=positive_int, help="model width (scratch only; else the prior's)")
    p.add_argument("--scale", type=positive_float, default=DEFAULT_SCALE,
                   help=f"prior scale lambda of a learned prior [{DEFAULT_SCALE:g}]")
    p.add_argument("--eps", type=nonnegative_float, default=0.0, help="isotropic jitter eps of a learned prior [0]")
    p.add_argument("--rank", type=int, help="use the first k <= K deviation columns (default: all)")
    p.add_argument("--variance", type=positive_float,
                   help="prior variance of standard / l2sp / scratch [1, 0.01, 1]")
    p.add_argument("--head-variance", type=positive_float, default=1.0, help="prior variance of the new head [1]")
    p.add_argument("--lr", type=positive_float, default=0.01, help="learning rate [0.01]")
    p.add_argument("--epochs", type=positive_int, help="epochs (default: from --steps)")
    p.add_argument("--steps", type=positive_int, default=100, help="optimiser steps when --epochs is not given [100]")
    p.add_argument("--batch-size", type=positive_int, default=32, help="batch size [32]")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="posterior temperature (sgld/csgld) [1]")
    p.add_argument("--num-samples", type=positive_int, default=10, help="posterior samples for BMA [10]")
    p.add_argument("--tune", action="store_true",
                   help="select the prior strength and lr by validation NLL (80/20 class-balanced split), then refit")
    p.add_argument("--budget", type=positive_int, default=4, help="trials for --tune [4]")
    p.add_argument("--task", default="classification", choices=("classification", "segmentation"),
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
    p.add_argument("--samples", help="samples.safetensors from 'ptyl finetune' (sampling methods): evaluate the BMA")
    p.add_argument("--data", choices=available_datasets(), help="data set (default: the one fine-tuned on)")
    p.add_argument("--split", default="test", choices=("train", "test", "all"), help="split [test]")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    add_common(p)
    p.set_defaults(func=run_evaluate)


# ----------------------------------------------------------------------------------------------- finetune
def _check_architecture(args: argparse.Namespace, meta: dict[str, Any]) -> None:
    arch = meta.get("model") or meta.get("architecture")
    if args.model and arch and args.model != arch:
        raise UsageError(f"prior {args.prior} was learned for architecture {arch!r}, but --model is {args.model!r}; "
                         f"drop --model or learn a prior for {args.model!r}")


def _base_model(args: argparse.Namespace, num_classes: int, in_channels: int) -> tuple[Any, dict[str, Any]]:
    """(model with a fresh head, metadata describing it): pretrained from the prior's weights, or from scratch."""
    from ptyl.experiments import build_from_metadata, load_pretrained
    from ptyl.io import read_metadata

    if args.baseline == "scratch":
        if args.prior:
            meta = read_metadata(args.prior)
            _check_architecture(args, meta)
            meta = {k: meta[k] for k in ("model", "model_kwargs", "image_size") if k in meta}
        else:
            kwargs = {"in_channels": in_channels, **model_kwargs(args)}
            meta = {"model": args.model or "smallcnn", "model_kwargs": kwargs}
        return build_from_metadata(meta, num_classes=num_classes), meta
    meta = read_metadata(args.prior)
    _check_architecture(args, meta)
    model, _ = load_pretrained(args.prior, num_classes=num_classes)
    return model, meta


def _prior_spec(args: argparse.Namespace, head: str):
    from ptyl.inference.tuning import MethodSpec
    from ptyl.io import load_posterior

    kind = {"scratch": "standard", None: "lowrank"}.get(args.baseline, args.baseline)
    posterior = load_posterior(args.prior) if kind in ("lowrank", "diag") else None
    variance = args.variance if args.variance is not None else DEFAULT_VARIANCE.get(args.baseline or "", None)
    return MethodSpec(kind=kind, posterior=posterior, scale=args.scale, eps=args.eps, rank=args.rank,
                      variance=variance, head=head, head_variance=args.head_variance)


def _datasets(args: argparse.Namespace, image_size: int | None):
    from ptyl.data import few_shot_subset, load_dataset

    if args.task == "segmentation":
        from ptyl.data.segmentation import make_segmentation_splits

        train, test = make_segmentation_splits(args.data, args.n_train, args.n_test, seed=args.seed,
                                               canvas_size=args.canvas_size)
        return train, test, train.num_classes
    train = few_shot_subset(load_dataset(args.data, "train", image_size=image_size), args.n_per_class, args.seed)
    test = load_dataset(args.data, "test", image_size=image_size)
    return train, test, train.num_classes


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from ptyl.experiments import save_weights, train_config
    from ptyl.inference.trainer import fit
    from ptyl.inference.tuning import default_grid, tune
    from ptyl.metrics import evaluate_probs, reliability_diagram, save_json

    require(args, "out")
    if args.baseline != "scratch":
        require(args, "prior")
    if args.prior and not Path(args.prior).is_file():
        raise FileNotFoundError(f"prior file not found: {args.prior}")
    start = time.perf_counter()
    out = Path(args.out)
    segmentation = args.task == "segmentation"
    image_size = None
    if args.prior:
        from ptyl.io import read_metadata

        image_size = read_metadata(args.prior).get("image_size")
    train, test, num_classes = _datasets(args, image_size)
    in_channels = int(train[0][0].shape[0])
    torch.manual_seed(args.seed)
    classifier, meta = _base_model(args, num_classes if not segmentation else 10, in_channels)
    head = "head"
    if segmentation:
        from ptyl.models.segmentation import SegmentationNet

        def model_fn():
            torch.manual_seed(args.seed)
            base, _ = _base_model(args, 10, in_channels)
            return SegmentationNet(base, num_classes=num_classes)

        head = "decoder"
    else:
        state = {k: v.clone() for k, v in classifier.state_dict().items()}

        def model_fn():
            model, _ = _base_model(args, num_classes, in_channels)
            if args.baseline != "scratch":
                model.load_state_dict(state)  # same pretrained backbone and head init in every trial
            return model

    spec = _prior_spec(args, head)
    config = train_config(args.method, len(train), steps=args.steps, batch_size=args.batch_size,
                          num_samples=args.num_samples, temperature=args.temperature, lr=args.lr,
                          seed=args.seed, progress=progress(args))
    if args.epochs:
        config.epochs = args.epochs
    selected: dict[str, Any] = {}
    tuning = None
    info(args, f"fine-tuning on {len(train)} {args.data} {'canvases' if segmentation else 'examples'}: "
               f"prior {spec.kind}, method {args.method}, {config.epochs} epochs")
    if args.tune:
        grid = default_grid(spec.kind, args.budget, lrs=(args.lr,))
        tuned = tune(model_fn, train, spec, grid, seed=args.seed, config=config, progress=progress(args))
        result, selected, tuning = tuned.final, tuned.best, tuned.to_dict()
    else:
        torch.manual_seed(args.seed)
        model = model_fn()
        prior = spec.build_prior(model)
        result = fit(model, train, prior, config, num_data=len(train), head=head)
    probs = result.predict(test)
    targets = test.masks if segmentation else test.targets
    if segmentation:
        from ptyl.metrics.segmentation import evaluate_segmentation

        metrics = evaluate_segmentation(probs, targets)
    else:
        metrics = evaluate_probs(probs, targets)
    out.mkdir(parents=True, exist_ok=True)
    reliability_diagram(probs, targets, out / "reliability.png",
                        title=f"{spec.kind} / {args.method} on {args.data}")
    weights_meta = {k: meta[k] for k in ("model", "model_kwargs", "image_size") if k in meta}
    weights_meta.update({"num_classes": num_classes if not segmentation else 10, "task": args.task,
                         "data": args.data, "seed": args.seed, "prior": args.prior, "method": args.method,
                         "baseline": args.baseline, "n_per_class": None if segmentation else args.n_per_class,
                         "batch_size": args.batch_size})
    if segmentation:
        weights_meta["segmentation"] = {"num_classes": num_classes, "decoder_channels": 32,
                                        "canvas_size": args.canvas_size, "n_test": args.n_test,
                                        "n_train": args.n_train}
    save_weights(result.model, out / "model.safetensors", weights_meta)
    if result.samples is not None and len(result.samples):
        _save_samples(result.samples, out / "samples.safetensors", weights_meta)
    hyper = {"scale": spec.scale, "eps": spec.eps, "rank": spec.rank, "variance": spec.variance,
             "head_variance": spec.head_variance, "lr": config.lr, **selected}
    report = {"task": args.task, "data": args.data, "prior_file": args.prior, "prior": spec.kind,
              "baseline": args.baseline, "method": args.method, "n_per_class": None if segmentation else args.n_per_class,
              "num_train": len(train), "num_test": len(test), "seed": args.seed, "metrics": metrics,
              "hyperparameters": hyper, "tuning": tuning, "config": asdict(config), "history": result.history,
              "wall_time_s": time.perf_counter() - start}
    save_json(out / "results.json", report)
    print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))
    info(args, f"wrote {out / 'results.json'}, {out / 'reliability.png'}, {out / 'model.safetensors'}")
    return 0


def _save_samples(bank, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from ptyl.io.prior_file import atomic_write

    tensors = {f"{i:04d}::{name}": t.contiguous() for i, state in enumerate(bank) for name, t in state.items()}
    header = {"ptyl_weights": json.dumps({**meta, "format": SAMPLES_FORMAT, "num_samples": len(bank)})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def _load_samples(path: str) -> list[dict[str, Any]]:
    from safetensors.torch import load_file

    from ptyl.errors import PriorFileError
    from ptyl.io.prior_file import read_json_header

    if not Path(path).is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    meta = read_json_header(path, "ptyl_weights", what="samples")  # a clear error for a corrupt or foreign file
    if meta.get("format") != SAMPLES_FORMAT:
        raise PriorFileError(f"{path}: format {meta.get('format')!r} is not {SAMPLES_FORMAT!r}; pass the "
                             "samples.safetensors written by 'ptyl finetune' with a sampling method")
    flat = load_file(path)
    samples: dict[int, dict[str, Any]] = {}
    for key, t in flat.items():
        index, _, name = key.partition("::")
        samples.setdefault(int(index), {})[name] = t
    return [samples[i] for i in sorted(samples)]


# ----------------------------------------------------------------------------------------------- evaluate
def _training_loader(meta: dict[str, Any]):
    """The fine-tuning set, rebuilt from the weights' metadata: BMA recomputes each sample's BatchNorm statistics on
    it, exactly as ``ptyl finetune`` did."""
    from torch.utils.data import DataLoader

    if meta.get("task") == "segmentation":
        from ptyl.data.segmentation import make_segmentation_splits

        seg = meta["segmentation"]
        train, _ = make_segmentation_splits(meta["data"], int(seg["n_train"]), 1, seed=int(meta.get("seed", 0)),
                                            canvas_size=int(seg["canvas_size"]))
    else:
        from ptyl.data import few_shot_subset, load_dataset

        if not meta.get("n_per_class"):
            return None
        train = few_shot_subset(load_dataset(meta["data"], "train", image_size=meta.get("image_size")),
                                int(meta["n_per_class"]), int(meta.get("seed", 0)))
    return DataLoader(train, batch_size=int(meta.get("batch_size", 32)), shuffle=False)


def run_evaluate(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader

    from ptyl.experiments import load_weights
    from ptyl.inference.bma import bma_predict, predict_probs
    from ptyl.metrics import evaluate_probs, save_json

    require(args, "weights")
    model, meta = load_weights(args.weights)
    data = args.data or meta.get("data")
    if data is None:
        raise UsageError("the weights file does not say which data set it was trained on: pass --data")
    if meta.get("task") == "segmentation":
        from ptyl.data.segmentation import make_segmentation_splits
        from ptyl.metrics.segmentation import evaluate_segmentation

        if args.split != "test":
            raise UsageError(f"--split {args.split} is for classification weights; segmentation weights are "
                             "evaluated on their test canvases")
        seg = meta["segmentation"]
        _, test = make_segmentation_splits(data, 1, int(seg["n_test"]), seed=int(meta.get("seed", 0)),
                                           canvas_size=int(seg["canvas_size"]))
        targets = test.masks
    else:
        from ptyl.data import load_dataset

        test = load_dataset(data, args.split, image_size=meta.get("image_size"))
        if test.num_classes != meta.get("num_classes", test.num_classes):
            raise UsageError(f"{args.weights} predicts {meta['num_classes']} classes but {data!r} has "
                             f"{test.num_classes}")
        targets = test.targets
    loader = DataLoader(test, batch_size=256, shuffle=False)
    if args.samples:
        bn_loader = _training_loader(meta) if data == meta.get("data") else None
        probs = bma_predict(model, _load_samples(args.samples), loader, bn_loader=bn_loader, progress=progress(args))
    else:
        probs = predict_probs(model, loader, progress=progress(args))
    if meta.get("task") == "segmentation":
        metrics = evaluate_segmentation(probs, targets)
    else:
        metrics = evaluate_probs(probs, targets)
    metrics = {k: float(v) for k, v in metrics.items()}
    result = {"weights": args.weights, "samples": args.samples, "data": data, "split": args.split,
              "num_examples": len(test), **metrics}
    if args.out:
        save_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0 if all(math.isfinite(v) for v in metrics.values()) else 1
