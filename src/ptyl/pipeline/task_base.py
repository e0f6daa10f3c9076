"""The task interface (:class:`Task`, what a new task implements) and the source stage's :class:`SourceSetup`;
the tasks themselves and their registry :data:`ptyl.pipeline.tasks.TASKS` are in :mod:`ptyl.pipeline.tasks`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.errors import ConfigError, PriorFileError
from ptyl.metrics import evaluate_probs
from ptyl.models import build_model, get_head, is_factory, replace_head

__all__ = ["SourceSetup", "Task", "build_classifier"]


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
    likelihood: ClassVar[str] = "categorical"  # the data term, for the N-aware diagnostic (per-pixel classes too)

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


def build_classifier(meta: Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """A fresh classifier from ``meta["model"]`` (a built-in name or a ``module:factory``) / ``meta["model_kwargs"]``
    with ``num_classes`` outputs (default: the metadata's); a factory that does not take ``num_classes`` gets its
    head (``meta["head"]``) replaced when its size differs."""
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
