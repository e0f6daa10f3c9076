"""Tasks: what changes between classification, segmentation and text in the source -> prior -> tune -> fit ->
evaluate pipeline -- the data, the head, the metrics, the model adapter -- behind one interface, so the runner
(:func:`ptyl.pipeline.run_transfer`), the command line and the benchmarks are written once.

:data:`TASKS` is the registry the command line reads: ``--task``'s choices, each task's own flags
(:meth:`Task.add_arguments`), how the flags become a task (:meth:`Task.from_args`) and, for tasks with a source stage
of their own, how ``ptyl learn-prior`` builds the source data and model (:meth:`Task.source_setup`). Adding a task is
its class plus one entry in :data:`TASKS`.

>>> task = ClassificationTask("digits")
>>> task.head, task.size_key, len(task.train_set(2, seed=0))
('head', 'n_per_class', 20)
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.data import DigitCanvasSegmentation, few_shot_subset, load_dataset
from ptyl.data.subsets import hold_out
from ptyl.errors import ConfigError, DataError
from ptyl.io.weights import load_state_checked
from ptyl.metrics.segmentation import evaluate_segmentation
from ptyl.models import is_factory, replace_head
from ptyl.models.segmentation import SegmentationNet
from ptyl.pipeline.task_base import SourceSetup, Task, build_classifier
from ptyl.pipeline.text_task import TextTask
from ptyl.validation import positive_int

POOL_CANVAS_SEED = 12_345  # the validation canvases are drawn once

__all__ = ["TASKS", "ClassificationTask", "SegmentationTask", "SourceSetup", "Task", "TextTask", "build_from_metadata",
           "get_task"]


class ClassificationTask(Task):
    """Few-shot image classification: ``n`` examples per class of a data set's train split, scored on its test split.

    Args:
        data: a data set name or a path to your own images (:func:`ptyl.data.load_dataset`).
        image_size: resize images (to match the source's resolution).
        max_test: evaluate on a class-balanced subset of this many test images.
        eval_split: the split evaluated (``"test"``, ``"train"``, ``"all"``).
        head: module name of the classifier's head (replaced by a fresh one; gets the head prior).
        val_pool: hold out ``val_pool // C`` images per class of the train split as a validation pool
            (:meth:`validation_set`, drawn once with a fixed seed); training sets come from the rest. 0: no pool.
    """

    name = "classification"
    description = "few-shot image classification"
    splits = ("test", "train", "all")
    default_source = "kmnist"
    default_target = "mnist"
    default_model = "smallcnn"

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, prior_meta: Mapping[str, Any], head: str,
                  log: Callable[[str], None] = print) -> tuple[Task, int]:
        """See :meth:`Task.from_args`: ``--n-per-class`` images per class; under ``--tune`` a ``--val-pool``
        validation pool (5-fold cross-validation when the data cannot spare it)."""
        pool = args.val_pool if args.tune else 0
        image_size = prior_meta.get("image_size")
        try:
            task = cls(args.data, image_size=image_size, head=head, val_pool=pool)
            task.train_set(args.n_per_class, args.seed)  # the pool must leave n per class to train on
        except DataError:
            if not pool:
                raise
            log(f"{args.data} cannot spare a {pool}-image validation pool next to {args.n_per_class} per class: "
                "tuning by 5-fold cross-validation instead")
            task = cls(args.data, image_size=image_size, head=head)
        return task, args.n_per_class

    @classmethod
    def source_setup(cls, source: str, model: str, *, n_per_class: int | None = None,
                     model_kwargs: Mapping[str, Any] | None = None, seed: int = 0, head: str = "head",
                     **options: Any) -> SourceSetup:
        """See :meth:`Task.source_setup`: the train split of an image data set and a classifier for it."""

        if options:
            raise ConfigError(f"the classification source stage takes no options {sorted(options)}")
        data = load_dataset(source, "train")
        if n_per_class:
            data = few_shot_subset(data, int(n_per_class), seed)
        kwargs = {"in_channels": data.image_shape[0], **(model_kwargs or {})}
        name = model if is_factory(model) else model.lower()
        meta = {"model": name, "architecture": name, "model_kwargs": kwargs, "head": head,
                "num_classes": data.num_classes, "source": source, "image_size": data.image_shape[-1],
                "num_source_examples": len(data), "seed": seed, "task": cls.name}
        torch.manual_seed(seed)
        return SourceSetup(data, build_classifier(meta), meta, image_size=data.image_shape[-1])

    def model_kwargs(self, example: Any) -> dict[str, Any]:
        """``in_channels`` of the images (see :meth:`Task.model_kwargs`)."""
        return {"in_channels": int(example[0].shape[0])}

    def __init__(self, data: str = "mnist", *, image_size: int | None = None, max_test: int | None = None,
                 eval_split: str = "test", head: str = "head", val_pool: int = 0) -> None:
        self.data, self.image_size, self.max_test, self.eval_split = data, image_size, max_test, eval_split
        self.head = head
        self.pool, self.val = hold_out(load_dataset(data, "train", image_size=image_size), val_pool)
        self.num_classes = self.pool.num_classes
        self._test = None

    def validation_set(self) -> Dataset | None:
        """See :meth:`Task.validation_set`.

        Returns:
            The pool held out of the training data (``None`` with ``val_pool=0``).
        """
        return self.val

    def train_set(self, n: int, seed: int) -> Dataset:
        return few_shot_subset(self.pool, int(n), int(seed))

    def test_set(self, seed: int = 0) -> Dataset:
        if self._test is None:
            test = load_dataset(self.data, self.eval_split, image_size=self.image_size)
            if self.max_test is not None and self.max_test < len(test):
                test = few_shot_subset(test, max(1, self.max_test // test.num_classes), 0)
            self._test = test
        return self._test

    def adapt(self, model: nn.Module) -> nn.Module:
        return replace_head(model, self.num_classes, head_name=self.head)

    def scratch(self, meta: Mapping[str, Any]) -> nn.Module:
        return build_classifier(meta, num_classes=self.num_classes)

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data, "num_classes": self.num_classes, "head": self.head}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], data: str | None = None, eval_split: str = "test") -> Task:
        """See :meth:`Task.from_metadata`; ``eval_split`` picks the split evaluated."""
        return cls(data or meta["data"], image_size=meta.get("image_size"), eval_split=eval_split,
                   head=meta.get("head", "head"))


class SegmentationTask(Task):
    """Per-pixel segmentation of digit canvases (:class:`ptyl.data.DigitCanvasSegmentation`) with a
    :class:`~ptyl.models.SegmentationNet` whose encoder is the pretrained classifier's trunk and whose ``decoder`` is
    new. Training canvases come from the data set's train split (``n`` canvases per seed), test canvases from its
    test split (seed ``test_seed``, default ``seed + 1``). With ``val_pool`` canvases, a validation pool is drawn once
    from ``val_digits`` digits held out of the train split (class-balanced), which no training canvas uses.

    Args:
        data: the digit data set.
        n_test: test canvases.
        decoder_channels: decoder width.
        test_seed: fixed seed of the test canvases (``None``: ``seed + 1`` of the training draw).
        val_pool: validation canvases (0: none; tuning then splits the training canvases).
        val_digits: digits held out for the validation canvases.
        canvas: forwarded to :class:`DigitCanvasSegmentation` (``canvas_size``, ``digits_per_canvas``, ...).
    """

    name = "segmentation"
    description = "per-pixel segmentation of digit canvases (the prior: learn-prior on the digit data)"
    head = "decoder"
    default_target = "mnist"
    size_key = "n_canvases"
    size_label = "canvases"
    metrics = ("miou", "nll", "ece", "pixel_accuracy")

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup, command: str) -> None:
        """``--n-train``, ``--n-test``, ``--canvas-size`` (``ptyl finetune``)."""
        if command != "finetune":
            return
        group.add_argument("--n-train", type=positive_int, default=64, help="segmentation: training canvases [64]")
        group.add_argument("--n-test", type=positive_int, default=64, help="segmentation: test canvases [64]")
        group.add_argument("--canvas-size", type=positive_int, default=56, help="segmentation: canvas side [56]")

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, prior_meta: Mapping[str, Any], head: str,
                  log: Callable[[str], None] = print) -> tuple[Task, int]:
        """See :meth:`Task.from_args`: ``--n-train`` canvases of ``--data``'s digits."""
        return cls(args.data, n_test=args.n_test, canvas_size=args.canvas_size), args.n_train

    def model_kwargs(self, example: Any) -> dict[str, Any]:
        """``in_channels`` of the canvases (see :meth:`Task.model_kwargs`)."""
        return {"in_channels": int(example[0].shape[0])}

    def __init__(self, data: str = "mnist", *, n_test: int = 64, decoder_channels: int = 32,
                 test_seed: int | None = None, val_pool: int = 0, val_digits: int = 1000, **canvas: Any) -> None:
        self.data, self.n_test, self.decoder_channels, self.test_seed = data, n_test, decoder_channels, test_seed
        train_digits = load_dataset(data, "train")
        self.canvas = {"num_digit_classes": int(train_digits.num_classes), **canvas}
        rest, held = hold_out(train_digits, val_digits if val_pool else 0)
        self.pools = rest, load_dataset(data, "test")
        self.val_pool = int(val_pool)
        self.val = self._canvases(held, self.val_pool, POOL_CANVAS_SEED) if held is not None else None
        self.num_classes = int(self.canvas["num_digit_classes"]) + 1  # + background
        self._tests: dict[int, Dataset] = {}

    def validation_set(self) -> Dataset | None:
        """See :meth:`Task.validation_set`.

        Returns:
            The validation canvases (``None`` with ``val_pool=0``).
        """
        return self.val

    def _canvases(self, pool, n: int, seed: int) -> Dataset:
        return DigitCanvasSegmentation(pool.images, pool.targets, int(n), seed=int(seed), **self.canvas)

    def train_set(self, n: int, seed: int) -> Dataset:
        return self._canvases(self.pools[0], n, seed)

    def test_set(self, seed: int = 0) -> Dataset:
        seed = self.test_seed if self.test_seed is not None else seed + 1
        if seed not in self._tests:
            self._tests[seed] = self._canvases(self.pools[1], self.n_test, seed)
        return self._tests[seed]

    def targets(self, dataset: Dataset) -> torch.Tensor:
        return dataset.masks

    def evaluate(self, probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return evaluate_segmentation(probs, targets)

    def adapt(self, model: nn.Module) -> nn.Module:
        return SegmentationNet(model, num_classes=self.num_classes, decoder_channels=self.decoder_channels,
                               image_channels=_image_channels(model))

    def scratch(self, meta: Mapping[str, Any]) -> nn.Module:
        return self.adapt(build_classifier(meta))

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data,
                "segmentation": {"num_classes": self.num_classes, "decoder_channels": self.decoder_channels,
                                 "n_test": self.n_test, "test_seed": self.test_seed, **self.canvas,
                                 **({"val_pool": self.val_pool} if self.val_pool else {})}}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], data: str | None = None, eval_split: str = "test") -> Task:
        """See :meth:`Task.from_metadata` (the canvas settings come from ``meta["segmentation"]``)."""
        seg = dict(meta["segmentation"])
        fixed = {key: seg.pop(key, None) for key in ("num_classes", "decoder_channels", "n_test", "test_seed",
                                                      "n_train")}
        return cls(data or meta["data"], n_test=int(fixed["n_test"]), decoder_channels=int(fixed["decoder_channels"]),
                   test_seed=fixed["test_seed"], **seg)

    @classmethod
    def wrap(cls, classifier: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
        """The :class:`~ptyl.models.SegmentationNet` around the classifier (see :meth:`Task.wrap`)."""
        seg = meta.get("segmentation") or {}
        return SegmentationNet(classifier, num_classes=int(seg["num_classes"]),
                               decoder_channels=int(seg.get("decoder_channels", 32)),
                               image_channels=int((meta.get("model_kwargs") or {}).get("in_channels", 1)))


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ClassificationTask, SegmentationTask, TextTask)}


def get_task(name: str) -> type[Task]:
    """The :class:`Task` class called ``name``."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {tuple(TASKS)}")
    return TASKS[name]


def _image_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return 1


def build_from_metadata(meta: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """A fresh model as a weights file's metadata describes it: the classifier, wrapped for its ``task``.

    Args:
        meta: ``model``, ``model_kwargs``, ``num_classes``, ``task`` (and the task's own settings).
        num_classes: override the classifier's number of classes.

    Returns:
        The randomly initialised model.
    """
    classifier = build_classifier(meta, num_classes)
    return get_task(meta.get("task", ClassificationTask.name)).wrap(classifier, meta)


def pretrained_model_fn(meta: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None, task: Task,
                        module: nn.Module | None = None,
                        source: str | os.PathLike = "the pretrained state") -> Callable[[], nn.Module]:
    """A factory of fresh downstream models (call it after seeding: the new head is random).

    Args:
        meta: metadata naming the source architecture (a prior file's or a weights file's).
        state: the pretrained state dict; ``None`` (and no ``module``): a random initialisation (``scratch``).
        task: adapts the source model (a fresh head or decoder).
        module: copy this source model instead of rebuilding it from ``meta``.
        source: where ``state`` came from (a file), named when it does not fit the model (a
            :class:`~ptyl.errors.ParameterMismatchError`).

    Returns:
        ``model_fn() -> nn.Module``.
    """

    def make() -> nn.Module:
        if module is not None:
            return task.adapt(copy.deepcopy(module))
        if state is None:
            return task.scratch(meta)
        return task.adapt(load_state_checked(build_classifier(meta), state, source))

    return make
