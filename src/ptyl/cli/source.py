"""``ptyl pretrain`` and ``ptyl learn-prior``: the source side (train on the source data, learn the SWAG prior)."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import DataLoader

from ptyl.cli._common import (
    UsageError,
    add_common,
    add_data_model_options,
    add_task_options,
    dtype_name,
    info,
    model_kwargs,
    nonnegative_int,
    positive_float,
    positive_int,
    progress,
    task_options,
)
from ptyl.data import load_dataset
from ptyl.inference import predict_probs
from ptyl.io import read_metadata
from ptyl.metrics import accuracy
from ptyl.pipeline import (
    TASKS,
    ClassificationTask,
    get_task,
    learn_source_prior,
    pretrain_source,
    pretrained_weights_path,
)
from ptyl.pipeline.source import OBJECTIVES

PRETRAIN_EPOCHS = 5
PRETRAIN_OUT = "pretrained.safetensors"  # the default output of 'ptyl pretrain'


def _add_source_options(parser: argparse.ArgumentParser, command: str) -> None:
    defaults = ", ".join(f"{t.default_source} / {t.default_model} ({name})" for name, t in TASKS.items()
                         if t.has_source_stage())
    add_data_model_options(parser, data_default=None, model_default=None,
                           data_help=f"source data (its train split; default data / model per task: {defaults})")
    add_task_options(parser, command)
    parser.add_argument("--width", type=positive_int, help="model width (channels of the first stage)")
    parser.add_argument("--objective", default=OBJECTIVES[0], choices=OBJECTIVES,
                        help="source objective: cross-entropy or SimCLR (self-supervised) [supervised]")
    parser.add_argument("--lr", type=positive_float, default=0.05, help="learning rate [0.05]")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="batch size [128]")
    parser.add_argument("--n-per-class", type=positive_int,
                        help="use only this many source examples per class (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed [0]")


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="train a model on the source data set (writes weights)",
                              description="Train a model on the source data set's train split and write its "
                                          "weights (safetensors) — the input of 'ptyl learn-prior --init'.")
    _add_source_options(p, "pretrain")
    p.add_argument("--epochs", type=nonnegative_int, default=5, help="training epochs [5]")
    p.add_argument("--out", default=PRETRAIN_OUT, help=f"weights file to write [{PRETRAIN_OUT}]")
    add_common(p)
    p.set_defaults(func=run_pretrain)

    p = subparsers.add_parser("learn-prior", help="learn a prior on the source data set (writes a prior file)",
                              description="Pretrain on the source data (or start from --init), then keep training at "
                                          "a high constant learning rate while SWAG collects, and write the posterior "
                                          "as a prior file plus the pretrained (SWA-mean) weights next to it.")
    _add_source_options(p, "learn-prior")
    p.add_argument("--pretrain-epochs", type=nonnegative_int,
                   help=f"pretraining epochs here, without --init [{PRETRAIN_EPOCHS}]")
    p.add_argument("--swag-epochs", type=positive_int, default=3, help="epochs of SWAG collection [3]")
    p.add_argument("--swag-lr", type=positive_float, help="constant learning rate while SWAG collects [--lr]")
    p.add_argument("--rank", type=int, default=20, help="SWAG rank K (deviation columns kept) [20]")
    p.add_argument("--init", help="weights file from 'ptyl pretrain' to start from instead of pretraining here")
    p.add_argument("--dtype", type=dtype_name, default="float32", help="storage dtype of the prior file [float32]")
    p.add_argument("--out", default="prior.safetensors", help="prior file to write [prior.safetensors]")
    add_common(p)
    p.set_defaults(func=run_learn_prior)


def _pretrain_epochs(args: argparse.Namespace) -> int:
    """Pretraining epochs of learn-prior; an error instead of silently pretraining again next to a 'ptyl pretrain'
    output, or silently ignoring --pretrain-epochs."""
    if args.init is not None:
        if args.pretrain_epochs is not None:
            raise UsageError("--pretrain-epochs and --init exclude each other: --init starts from pretrained weights")
        return 0
    if args.pretrain_epochs is None and Path(PRETRAIN_OUT).is_file():
        raise UsageError(f"found {PRETRAIN_OUT} (the output of 'ptyl pretrain'): pass --init {PRETRAIN_OUT} to "
                         "start from it, or --pretrain-epochs N to pretrain here again")
    return PRETRAIN_EPOCHS if args.pretrain_epochs is None else args.pretrain_epochs


def _head(args: argparse.Namespace) -> str:
    return args.head or "head"


def _task_defaults(args: argparse.Namespace) -> dict:
    """Fill ``--data`` / ``--model`` from the task and return its own options."""
    task = get_task(args.task)
    args.data = args.data or task.default_source
    args.model = args.model or task.default_model
    return task_options(args)


def _source_accuracy(model, data_name: str) -> float:
    test = load_dataset(data_name, "test")
    return float(accuracy(predict_probs(model, DataLoader(test, batch_size=512)), test.targets))


def run_pretrain(args: argparse.Namespace) -> int:
    options = _task_defaults(args)
    info(args, f"pretraining {args.model} on {args.data} ({args.objective}, {args.epochs} epochs)")
    model, meta = pretrain_source(args.data, args.model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                  objective=args.objective, n_per_class=args.n_per_class,
                                  model_kwargs=model_kwargs(args), head=_head(args), seed=args.seed, out=args.out,
                                  progress=progress(args), task=args.task, task_options=options)
    line = f"weights written to {args.out}"
    if args.objective == OBJECTIVES[0] and args.task == ClassificationTask.name:  # a real classifier of test images
        line += f" (source test accuracy {_source_accuracy(model, args.data):.4f})"
    print(line)
    return 0


def run_learn_prior(args: argparse.Namespace) -> int:
    options = _task_defaults(args)
    epochs = _pretrain_epochs(args)
    start = f"from {args.init}" if args.init else f"after {epochs} pretraining epochs here"
    info(args, f"learning a prior: {args.model} on {args.data} ({args.objective}), rank {args.rank}, {start}")
    path = learn_source_prior(args.data, args.model, pretrain_epochs=epochs,
                              swag_epochs=args.swag_epochs, rank=args.rank, lr=args.lr, swag_lr=args.swag_lr,
                              batch_size=args.batch_size, objective=args.objective, n_per_class=args.n_per_class,
                              model_kwargs=model_kwargs(args), head=_head(args), init=args.init, dtype=args.dtype,
                              out=args.out, seed=args.seed, progress=progress(args), task=args.task,
                              task_options=options)
    meta = read_metadata(path)
    count = sum(_numel(p["shape"]) for p in meta["parameters"])
    print(f"prior written to {path} (rank {meta['rank']}, {count:,} parameters, "
          f"{meta.get('num_snapshots', '?')} snapshots); pretrained weights: {pretrained_weights_path(path)}")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
