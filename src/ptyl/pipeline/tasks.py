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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.data.subsets import hold_out
from ptyl.errors import ConfigError, DataError, PriorFileError
from ptyl.validation import positive_int

__all__ = ["TASKS", "ClassificationTask", "SegmentationTask", "SourceSetup", "Task", "TextTask", "build_from_metadata",
           "get_task"]


@dataclass
class SourceSetup:
    """What the source stage of a task trains (:meth:`Task.source_setup`, :func:`ptyl.pipeline.learn_source_prior`).

    Attributes:
        data: the source training set.
        model: the fresh source model (its head is left out of the prior).
        meta: metadata describing it (recorded in the prior file and the weights file).
        include: the parameters the prior covers (``None``: every trainable one but the head).
        collate_fn: how examples become batches (``None``: the default).
        image_size: the images' side (``None`` for data that are not images).
    """

    data: Dataset
    model: nn.Module
    meta: dict[str, Any]
    include: Sequence[str] | None = None
    collate_fn: Callable | None = None
    image_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Task:
    """One kind of downstream problem (subclass it for a new one and add it to :data:`TASKS`).

    Class attributes: ``name`` (recorded in weights files), ``head`` (module name of the new head), ``size_key`` /
    ``size_label`` (how results name the training-set size), ``metrics`` (what :meth:`evaluate` returns, the first
    three are logged), ``objective`` / ``collate_fn`` (training loss and batching; ``None``: cross-entropy, default
    batching).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""  # one line for the command line's --task help
    head: ClassVar[str] = "head"
    size_key: ClassVar[str] = "n_per_class"
    size_label: ClassVar[str] = "n/class"
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "nll", "ece", "brier")
    splits: ClassVar[tuple[str, ...]] = ("test",)  # what 'ptyl evaluate --split' may score
    default_source: ClassVar[str | None] = None  # 'ptyl learn-prior --data' when not given (a source stage)
    default_target: ClassVar[str | None] = None  # 'ptyl finetune --data' when not given
    default_model: ClassVar[str | None] = None  # 'ptyl learn-prior --model' when not given
    objective: Callable | None = None
    collate_fn: Callable | None = None

    # --- the command line ---------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup, command: str) -> None:
        """Add this task's own flags to ``ptyl <command>`` (``"finetune"`` or ``"learn-prior"``); none by default.

        Args:
            group: the argument group of this task.
            command: the subcommand.
        """

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, prior_meta: Mapping[str, Any], head: str,
                  log: Callable[[str], None] = print) -> tuple[Task, int]:
        """The task ``ptyl finetune`` runs, from its flags.

        Args:
            args: the parsed flags (common ones such as ``data``, ``n_per_class``, ``val_pool``, ``tune``, ``seed``
                and this task's own).
            prior_meta: the prior file's metadata (empty without a prior).
            head: the head's module name.
            log: progress messages.

        Returns:
            ``(task, training-set size)``.
        """
        raise ConfigError(f"task {cls.name!r} cannot be built from the command line")

    @classmethod
    def source_setup(cls, source: str, model: str, *, n_per_class: int | None = None,
                     model_kwargs: Mapping[str, Any] | None = None, seed: int = 0, head: str = "head",
                     **options: Any) -> SourceSetup:
        """The source stage's data and fresh model (``ptyl learn-prior --task NAME``).

        Args:
            source: the source data (a name or a path).
            model: the architecture (a name or ``module:factory``).
            n_per_class: use only this many source examples per class.
            model_kwargs: architecture options.
            seed: seeds the subset and the model.
            head: the head's module name.
            options: the task's own settings (its flags).

        Returns:
            A :class:`SourceSetup`.
        """
        raise ConfigError(f"task {cls.name!r} has no source stage of its own (learn its prior with another task, "
                          "e.g. classification on the same data)")

    @classmethod
    def has_source_stage(cls) -> bool:
        """Whether the task defines :meth:`source_setup` (``ptyl learn-prior --task`` lists those)."""
        return cls.source_setup.__func__ is not Task.source_setup.__func__

    def model_kwargs(self, example: Any) -> dict[str, Any]:
        """Keyword arguments a source architecture built for this task gets (e.g. ``in_channels`` of images).

        Args:
            example: one training example ``(input, target)``.

        Returns:
            The keyword arguments (none by default).
        """
        return {}

    def train_set(self, n: int, seed: int) -> Dataset:
        """A training set.

        Args:
            n: its size (per class, or in all: see ``size_key``).
            seed: draws it; nested in ``n`` where the task allows.

        Returns:
            The dataset.
        """
        raise NotImplementedError

    def test_set(self, seed: int = 0) -> Dataset:
        """The evaluation set (it may depend on the training draw's ``seed``)."""
        raise NotImplementedError

    def validation_set(self) -> Dataset | None:
        """A validation pool of target examples that no training set ever contains.

        Returns:
            The pool, or ``None`` when the task has none (tuning then cross-validates or splits the training set).
        """
        return None

    def targets(self, dataset: Dataset) -> torch.Tensor:
        """The targets of ``dataset``: what :meth:`evaluate` compares predictions with (labels, or masks)."""
        return torch.as_tensor(dataset.targets)

    def evaluate(self, probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Metrics of predictions.

        Args:
            probs: predictive probabilities (``FitResult.predict``).
            targets: :meth:`targets` of the evaluated set.

        Returns:
            ``{metric: value}`` for the names in ``metrics``.
        """
        from ptyl.metrics import evaluate_probs

        return evaluate_probs(probs, targets)

    def adapt(self, model: nn.Module) -> nn.Module:
        """Turn ``model``, a pretrained source model, into this task's model with a fresh head (seed the RNG first)."""
        raise NotImplementedError

    def scratch(self, meta: Mapping[str, Any]) -> nn.Module:
        """A randomly initialised model of this task for the architecture described by ``meta``."""
        raise ConfigError(f"task {self.name!r} has no random-initialisation start")

    def metadata(self) -> dict[str, Any]:
        """JSON-able settings written into weights files (``ptyl evaluate`` rebuilds the task from them)."""
        return {"task": self.name}

    @classmethod
    def wrap(cls, classifier: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
        """The model a weights file of this task describes.

        Args:
            classifier: the classifier rebuilt from the file's metadata.
            meta: the metadata.

        Returns:
            The model whose state the file holds.
        """
        return classifier

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], data: str | None = None, eval_split: str = "test") -> Task:
        """The task a weights file was trained on.

        Args:
            meta: the weights file's metadata (:meth:`metadata` wrote it).
            data: evaluate on this data set instead.
            eval_split: the split evaluated (one of :attr:`splits`).

        Returns:
            The task.
        """
        raise ConfigError(f"task {cls.name!r} cannot be rebuilt from a weights file")


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
        from ptyl.data import few_shot_subset, load_dataset
        from ptyl.models import is_factory

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
        from ptyl.data import load_dataset

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
        from ptyl.data import few_shot_subset

        return few_shot_subset(self.pool, int(n), int(seed))

    def test_set(self, seed: int = 0) -> Dataset:
        from ptyl.data import few_shot_subset, load_dataset

        if self._test is None:
            test = load_dataset(self.data, self.eval_split, image_size=self.image_size)
            if self.max_test is not None and self.max_test < len(test):
                test = few_shot_subset(test, max(1, self.max_test // test.num_classes), 0)
            self._test = test
        return self._test

    def adapt(self, model: nn.Module) -> nn.Module:
        from ptyl.models import replace_head

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
    test split (seed ``test_seed``, default ``seed + 1``).

    Args:
        data: the digit data set.
        n_test: test canvases.
        decoder_channels: decoder width.
        test_seed: fixed seed of the test canvases (``None``: ``seed + 1`` of the training draw).
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
                 test_seed: int | None = None, **canvas: Any) -> None:
        from ptyl.data import load_dataset

        self.data, self.n_test, self.decoder_channels, self.test_seed = data, n_test, decoder_channels, test_seed
        self.pools = load_dataset(data, "train"), load_dataset(data, "test")
        self.canvas = {"num_digit_classes": int(self.pools[0].num_classes), **canvas}
        self.num_classes = int(self.canvas["num_digit_classes"]) + 1  # + background
        self._tests: dict[int, Dataset] = {}

    def _canvases(self, pool, n: int, seed: int) -> Dataset:
        from ptyl.data import DigitCanvasSegmentation

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
        from ptyl.metrics.segmentation import evaluate_segmentation

        return evaluate_segmentation(probs, targets)

    def adapt(self, model: nn.Module) -> nn.Module:
        from ptyl.models.segmentation import SegmentationNet

        return SegmentationNet(model, num_classes=self.num_classes, decoder_channels=self.decoder_channels,
                               image_channels=_image_channels(model))

    def scratch(self, meta: Mapping[str, Any]) -> nn.Module:
        return self.adapt(build_classifier(meta))

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data,
                "segmentation": {"num_classes": self.num_classes, "decoder_channels": self.decoder_channels,
                                 "n_test": self.n_test, "test_seed": self.test_seed, **self.canvas}}

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
        from ptyl.models.segmentation import SegmentationNet

        seg = meta.get("segmentation") or {}
        return SegmentationNet(classifier, num_classes=int(seg["num_classes"]),
                               decoder_channels=int(seg.get("decoder_channels", 32)),
                               image_channels=int((meta.get("model_kwargs") or {}).get("in_channels", 1)))


TEXT_MAX_LENGTH = 64  # tokens kept per sentence
TEXT_TEST_SIZE = 600  # sentences held out of a text file for testing
TEXT_SPLIT_SEED = 0  # draws that hold-out, once


class TextTask(Task):
    """Few-shot text classification with a pretrained encoder (e.g. :class:`ptyl.models.hf.TextClassifier`):
    ``n`` sentences per class of ``pool``, scored on ``test``; batches go through
    :func:`ptyl.data.collate_text` and the loss is :func:`ptyl.models.hf.text_classification_objective`.

    From files (:meth:`from_files`, what ``ptyl learn-prior --task text`` / ``ptyl finetune --task text`` use): a
    built-in VADER set (``vader-movies``, ``vader-amazon``, ``vader-tweets``) or your own CSV / TSV / JSONL file with
    a header naming a text and a label column (:func:`ptyl.data.load_text_dataset` documents the format); the test
    set is a second file or a class-balanced hold-out of ``test_size`` sentences (drawn once, seed 0). Only the
    transformer ``layers`` (default the last) and the head train; the prior covers those layers.

    Args:
        pool: the labelled target sentences (a :class:`ptyl.data.TextDataset`).
        test: held-out sentences.
        val_pool: hold out this many sentences of ``pool`` (balanced over classes) as a validation pool.
        objective, collate_fn: override the training loss and batching (e.g. a model over cached hidden states).
        layers: train only these transformer layers (and the head), the rest frozen (``None``: train everything).
        settings: how :meth:`from_files` built the task (recorded in weights files).
    """

    name = "text"
    description = "few-shot text classification with MiniLM (built-in VADER sets or your own CSV/TSV/JSONL files)"
    default_source = "vader-movies"
    default_target = "vader-amazon"
    default_model = "minilm"

    def __init__(self, pool: Dataset, test: Dataset, *, val_pool: int = 0, objective: Callable | None = None,
                 collate_fn: Callable | None = None, layers: Sequence[int] | None = None,
                 settings: Mapping[str, Any] | None = None) -> None:
        from ptyl.data import collate_text
        from ptyl.models.hf import text_classification_objective

        self.pool, self.val = hold_out(pool, val_pool)
        self.test = test
        self.num_classes = int(pool.num_classes)
        self.objective = objective or text_classification_objective
        self.collate_fn = collate_fn or collate_text
        self.layers = None if layers is None else [int(layer) for layer in layers]
        self.settings = dict(settings or {})
        self.data = str(getattr(pool, "name", "text"))

    @classmethod
    def from_files(cls, data: str, *, test_data: str | None = None, test_size: int = TEXT_TEST_SIZE, val_pool: int = 0,
                   max_length: int = TEXT_MAX_LENGTH, text_column: str = "text", label_column: str = "label",
                   layers: Sequence[int] | None = (-1,), tokenizer: Any = None) -> TextTask:
        """The task of a built-in text set or your own file (see the class docstring).

        Args:
            data: a built-in name or a file (:func:`ptyl.data.load_text_dataset`).
            test_data: a second file to test on (same columns and classes); ``None``: hold ``test_size`` out.
            test_size: sentences held out for the test set, balanced over classes.
            val_pool: sentences held out of the rest as a validation pool.
            max_length: tokens kept per sentence.
            text_column, label_column: the columns of your files.
            layers: the transformer layers that train (negative: from the top).
            tokenizer: default MiniLM's (:func:`ptyl.models.hf.load_hf_tokenizer`).

        Returns:
            The task.

        Raises:
            DataError: a missing column, an empty class, too few sentences for the test set or the pool.
        """
        from ptyl.models.hf import load_hf_tokenizer

        tokenizer = tokenizer if tokenizer is not None else load_hf_tokenizer()
        pool = _text_set(data, tokenizer, max_length, text_column, label_column)
        if test_data is not None:
            test = _text_set(test_data, tokenizer, max_length, text_column, label_column, classes=pool.classes)
        else:
            try:
                pool, test = hold_out(pool, test_size, seed=TEXT_SPLIT_SEED)
            except DataError as err:
                raise DataError(f"{data}: a test set of {test_size} sentences ({test_size // pool.num_classes} per "
                                f"class) leaves too few to train on; lower --test-size or pass --test-data "
                                f"({err})") from err
        settings = {"test_data": test_data, "test_size": test_size, "max_length": max_length,
                    "text_column": text_column, "label_column": label_column,
                    "layers": None if layers is None else [int(layer) for layer in layers]}
        task = cls(pool, test, val_pool=val_pool, layers=layers, settings=settings)
        task.data = str(data)
        return task

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup, command: str) -> None:
        """The text columns, the sentence length and the trained layers; ``ptyl finetune`` also the test set."""
        group.add_argument("--text-column", default="text", help="text: the text column of your file [text]")
        group.add_argument("--label-column", default="label", help="text: the label column of your file [label]")
        group.add_argument("--max-length", type=positive_int,
                           help=f"text: tokens kept per sentence [the prior's, else {TEXT_MAX_LENGTH}]")
        group.add_argument("--layers", type=int, nargs="+", metavar="L",
                           help="text: the transformer layers that train and that the prior covers (negative: from "
                                "the top) [the prior's, else -1: the last]")
        if command == "finetune":
            group.add_argument("--test-data", metavar="FILE",
                               help="text: a file to test on (same columns and classes) [a hold-out of --data]")
            group.add_argument("--test-size", type=positive_int, default=TEXT_TEST_SIZE,
                               help=f"text: sentences of --data held out for testing, without --test-data "
                                    f"[{TEXT_TEST_SIZE}]")

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, prior_meta: Mapping[str, Any], head: str,
                  log: Callable[[str], None] = print) -> tuple[Task, int]:
        """See :meth:`Task.from_args`: ``--n-per-class`` sentences per class of ``--data``; the layers and the
        sentence length of the prior unless given."""
        if head != cls.head:
            raise ConfigError(f"the text task's head is {cls.head!r}, not {head!r}")
        source = prior_meta.get("text") or {}
        options = {"test_data": args.test_data, "test_size": args.test_size,
                   "max_length": args.max_length or source.get("max_length") or TEXT_MAX_LENGTH,
                   "text_column": args.text_column, "label_column": args.label_column,
                   "layers": args.layers or source.get("layers") or [-1]}
        pool = args.val_pool if args.tune else 0
        try:
            task = cls.from_files(args.data, val_pool=pool, **options)
            task.train_set(args.n_per_class, args.seed)
        except DataError:
            if not pool:
                raise
            log(f"{args.data} cannot spare a {pool}-sentence validation pool next to {args.n_per_class} per class: "
                "tuning by 5-fold cross-validation instead")
            task = cls.from_files(args.data, **options)
        return task, args.n_per_class

    @classmethod
    def source_setup(cls, source: str, model: str, *, n_per_class: int | None = None,
                     model_kwargs: Mapping[str, Any] | None = None, seed: int = 0, head: str = "head",
                     max_length: int | None = None, text_column: str = "text", label_column: str = "label",
                     layers: Sequence[int] | None = None) -> SourceSetup:
        """See :meth:`Task.source_setup`: the source sentences, the text model with only ``layers`` (default the
        last) and its head trainable, and a prior over those layers."""
        from ptyl.data import TextDataset, collate_text, few_shot_subset, load_text_dataset
        from ptyl.models.hf import encoder_layer_names, load_hf_tokenizer

        layers = [int(layer) for layer in (layers or [-1])]
        max_length = max_length or TEXT_MAX_LENGTH
        texts, labels, classes = load_text_dataset(source, text_column=text_column, label_column=label_column)
        data = TextDataset(texts, labels, load_hf_tokenizer(), classes=classes, max_length=max_length,
                           name=str(source))
        if n_per_class:
            data = few_shot_subset(data, int(n_per_class), seed)
        meta = {"model": model, "architecture": model, "model_kwargs": dict(model_kwargs or {}), "head": head,
                "num_classes": data.num_classes, "source": str(source), "num_source_examples": len(data),
                "seed": seed, "task": cls.name, "text": {"max_length": max_length, "layers": layers}}
        torch.manual_seed(seed)
        classifier = build_classifier(meta)
        include = encoder_layer_names(classifier, layers)
        _train_only(classifier, include, head)
        return SourceSetup(data, classifier, meta, include=include, collate_fn=collate_text)

    def validation_set(self) -> Dataset | None:
        """See :meth:`Task.validation_set`.

        Returns:
            The pool held out of the training data (``None`` with ``val_pool=0``).
        """
        return self.val

    def train_set(self, n: int, seed: int) -> Dataset:
        from ptyl.data import few_shot_subset

        return few_shot_subset(self.pool, int(n), int(seed))

    def test_set(self, seed: int = 0) -> Dataset:
        return self.test

    def adapt(self, model: nn.Module) -> nn.Module:
        from ptyl.models import replace_head

        model = replace_head(model, self.num_classes)
        if self.layers is not None:
            from ptyl.models.hf import encoder_layer_names

            _train_only(model, encoder_layer_names(model, self.layers), self.head)
        return model

    def metadata(self) -> dict[str, Any]:
        return {"task": self.name, "data": self.data, "num_classes": self.num_classes, "head": self.head,
                "text": dict(self.settings)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], data: str | None = None, eval_split: str = "test") -> Task:
        """See :meth:`Task.from_metadata` (the files and settings come from ``meta["text"]``)."""
        if "text" not in meta:
            raise ConfigError("the weights file does not record how its text task was built (no 'text' metadata)")
        return cls.from_files(data or meta["data"], **meta["text"])


def _text_set(path: str, tokenizer: Any, max_length: int, text_column: str, label_column: str,
              classes: Sequence[str] | None = None) -> Dataset:
    from ptyl.data import TextDataset, load_text_dataset

    texts, labels, names = load_text_dataset(path, text_column=text_column, label_column=label_column, classes=classes)
    return TextDataset(texts, labels, tokenizer, classes=names, max_length=max_length, name=str(path))


def _train_only(model: nn.Module, names: Sequence[str], head: str) -> None:
    """``requires_grad`` on ``names`` and the head's parameters only."""
    from ptyl.params import name_matches, normalize_name

    keep = set(names)
    for name, param in model.named_parameters():
        key = normalize_name(name)
        param.requires_grad_(key in keep or name_matches(key, head))


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


def build_classifier(meta: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """A fresh classifier from ``meta["model"]`` (a built-in name or a ``module:factory``) / ``meta["model_kwargs"]``
    with ``num_classes`` outputs (default: the metadata's); a factory that does not take ``num_classes`` gets its
    head (``meta["head"]``) replaced when its size differs."""
    from ptyl.models import build_model, get_head, is_factory, replace_head

    if "model" not in meta:
        raise PriorFileError("metadata does not name the model architecture ('model'); pass --model")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs["num_classes"] = int(num_classes if num_classes is not None else meta.get("num_classes", 10))
    model = build_model(meta["model"], **kwargs)
    if is_factory(meta["model"]):
        head = meta.get("head") or "head"
        if get_head(model, head).out_features != kwargs["num_classes"]:
            replace_head(model, kwargs["num_classes"], head_name=head)
    return model


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
                        module: nn.Module | None = None) -> Callable[[], nn.Module]:
    """A factory of fresh downstream models (call it after seeding: the new head is random).

    Args:
        meta: metadata naming the source architecture (a prior file's or a weights file's).
        state: the pretrained state dict; ``None`` (and no ``module``): a random initialisation (``scratch``).
        task: adapts the source model (a fresh head or decoder).
        module: copy this source model instead of rebuilding it from ``meta``.

    Returns:
        ``model_fn() -> nn.Module``.
    """

    def make() -> nn.Module:
        if module is not None:
            return task.adapt(copy.deepcopy(module))
        if state is None:
            return task.scratch(meta)
        model = build_classifier(meta)
        model.load_state_dict(state)
        return task.adapt(model)

    return make
