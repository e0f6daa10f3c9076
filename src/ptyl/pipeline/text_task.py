"""The text task: few-shot text classification with MiniLM on the built-in VADER sets or your own files."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.data import TextDataset, collate_text, few_shot_subset, load_text_dataset
from ptyl.data.subsets import hold_out
from ptyl.errors import ConfigError, DataError
from ptyl.models import replace_head
from ptyl.models.hf import encoder_layer_names, load_hf_tokenizer, text_classification_objective
from ptyl.params import name_matches, normalize_name
from ptyl.pipeline.task_base import SourceSetup, Task, build_classifier
from ptyl.validation import positive_int

__all__ = ["TEXT_MAX_LENGTH", "TEXT_SPLIT_SEED", "TEXT_TEST_SIZE", "TextTask"]

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
        return few_shot_subset(self.pool, int(n), int(seed))

    def test_set(self, seed: int = 0) -> Dataset:
        return self.test

    def adapt(self, model: nn.Module) -> nn.Module:
        model = replace_head(model, self.num_classes)
        if self.layers is not None:
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
    texts, labels, names = load_text_dataset(path, text_column=text_column, label_column=label_column, classes=classes)
    return TextDataset(texts, labels, tokenizer, classes=names, max_length=max_length, name=str(path))


def _train_only(model: nn.Module, names: Sequence[str], head: str) -> None:
    """``requires_grad`` on ``names`` and the head's parameters only."""
    keep = set(names)
    for name, param in model.named_parameters():
        key = normalize_name(name)
        param.requires_grad_(key in keep or name_matches(key, head))
