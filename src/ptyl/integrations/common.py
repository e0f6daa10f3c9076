"""What the framework integrations share: N for the prior term, and source-side SWAG collection that ends in a prior
file. Framework-free (tested without Lightning or transformers)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ptyl.errors import ConfigError
from ptyl.io.pretrained import save_pretrained
from ptyl.io.prior_file import save_posterior
from ptyl.params import Selector, check_head_matches, named_parameters
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.swag import SWAGCollector
from ptyl.training.callbacks import SWAGCollection

__all__ = ["SourceCollection", "dataset_size"]


def dataset_size(num_data: int | None, dataset: Any, where: str) -> int:
    """N of ``-log p(theta) / N``: ``num_data`` if given, else ``len(dataset)`` (the whole data set: under DDP each
    rank reads a shard of it, so this is the global N).

    Args:
        num_data: given by the user (``None``: from the data set).
        dataset: the training data set (a map-style ``Dataset``).
        where: how an error message names the source of the data.

    Returns:
        N.

    Raises:
        ConfigError: the data set has no length (an ``IterableDataset``) and ``num_data`` was not given.
    """
    if num_data is not None:
        if int(num_data) < 1:
            raise ConfigError(f"num_data must be >= 1, got {num_data}")
        return int(num_data)
    try:
        return len(dataset)
    except TypeError:
        raise ConfigError(f"cannot count the training examples of {where} ({type(dataset).__name__} has no len()); "
                          "pass num_data=N, the number of training examples") from None


class SourceCollection:
    """Source-side SWAG (Maddox et al. 2019, arXiv 1902.02476) in a framework's loop: a
    :class:`~ptyl.training.SWAGCollection` whose :class:`~ptyl.posterior.SWAGCollector` is built on the model when
    training starts (on its device), and a prior file written at the end.

    Args:
        collector: a collector of your own (``None``: built from ``rank`` / ``include`` / ``exclude`` / ``head``).
        rank, include, exclude, head: see :class:`~ptyl.posterior.SWAGCollector` (the head is left out of the prior;
            an error when it names no parameter).
        every_n_steps: a snapshot every this many optimizer steps; ``None``: one at the end of every epoch.
        start_step, start_epoch: burn-in before the first snapshot.
        out: where the prior goes at the end (on the main process): a ``.safetensors`` prior file, or else a shared
            prior directory (:func:`ptyl.io.save_pretrained`: prior file + model card); ``None``: memory only.
        metadata: recorded in the prior file (source data, architecture, objective...).
        dtype: storage dtype of the prior file (``"bfloat16"`` halves it).
    """

    def __init__(self, collector: SWAGCollector | None = None, *, rank: int = 20, include: Selector = None,
                 exclude: Selector = None, head: str | Sequence[str] | None = "head",
                 every_n_steps: int | None = None, start_step: int = 0, start_epoch: int = 0,
                 out: str | os.PathLike | None = None, metadata: dict[str, Any] | None = None,
                 dtype: str | None = None) -> None:
        self.options = {"rank": rank, "include": include, "exclude": exclude, "head": head}
        self.schedule = {"every_steps": every_n_steps, "start_step": start_step, "start_epoch": start_epoch}
        self.out = Path(out) if out is not None else None
        self.metadata, self.dtype = dict(metadata or {}), dtype
        self.collection = SWAGCollection(collector, **self.schedule) if collector is not None else None
        self.posterior: SourcePosterior | None = None
        self._pending: dict[str, Any] | None = None

    def start(self, model: nn.Module) -> None:
        """Build the collector on ``model`` (first call only) and restore a checkpointed state.

        Args:
            model: the network whose parameters are collected.
        """
        if self.collection is None:
            check_head_matches(named_parameters(model), self.options["head"], type(model).__name__)
            self.collection = SWAGCollection(SWAGCollector(model, **self.options), **self.schedule)
        if self._pending is not None:
            self.collection.load_state_dict(self._pending)
            self._pending = None

    def step(self, model: nn.Module, is_main: bool) -> None:
        """After an optimizer step (a snapshot when one is due; ranks other than the main one only count).

        Args:
            model: the network.
            is_main: whether this is the process that collects.
        """
        self.collection.step(model, collect=is_main)

    def end_epoch(self, model: nn.Module, is_main: bool) -> None:
        """After an epoch (a snapshot in per-epoch mode).

        Args:
            model: the network.
            is_main: whether this is the process that collects.
        """
        self.collection.end_epoch(model, collect=is_main)

    def finish(self, model: nn.Module, is_main: bool) -> SourcePosterior | None:
        """The posterior; written to ``out`` on the main process.

        Args:
            model: the network (its class name goes into the metadata).
            is_main: whether this process holds the snapshots and writes the file.

        Returns:
            The posterior on the main process, ``None`` elsewhere.
        """
        if not is_main:
            return None
        meta = {"architecture": type(model).__name__, "objective": "supervised", **self.metadata}
        self.posterior = self.collection.collector.posterior(metadata=meta)
        if self.out is not None and self.out.suffix == ".safetensors":
            save_posterior(self.posterior, self.out, dtype=self.dtype)
        elif self.out is not None:
            save_pretrained(self.out, self.posterior, dtype=self.dtype)
        return self.posterior

    def state_dict(self) -> dict[str, Any] | None:
        """The collection's state for a framework checkpoint (``None`` before training started)."""
        return self.collection.state_dict() if self.collection is not None else self._pending

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore ``state``; applied when the collector exists (training start)."""
        if self.collection is not None and state is not None:
            self.collection.load_state_dict(state)
        else:
            self._pending = state
