"""``fit``: the one-call front end of :class:`~ptyl.training.Trainer`.

>>> import torch
>>> from torch import nn
>>> from torch.utils.data import TensorDataset
>>> data = TensorDataset(torch.randn(32, 3), torch.randint(0, 2, (32,)))
>>> model = nn.Sequential(); model.add_module("head", nn.Linear(3, 2))
>>> result = fit(model, data, epochs=2, lr=0.1, progress=False)
>>> [record["epoch"] for record in result.history]
[1, 2]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl.errors import ConfigError
from ptyl.posterior.swag import SWAGCollector
from ptyl.priors.base import Prior
from ptyl.training.callbacks import Callback, EvalCallback
from ptyl.training.config import TrainConfig
from ptyl.training.registry import Inference
from ptyl.training.result import FitResult
from ptyl.training.strategies.base import Strategy
from ptyl.training.trainer import Objective, Trainer

__all__ = ["fit"]


def fit(
    model: nn.Module,
    data: Dataset | DataLoader,
    prior: Prior | None = None,
    config: TrainConfig | None = None,
    *,
    objective: Objective | None = None,
    num_data: int | None = None,
    head: str | Sequence[str] | None = "head",
    collector: SWAGCollector | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    callbacks: Iterable[Callback] = (),
    strategy: Strategy | None = None,
    collate_fn: Callable | None = None,
    **overrides: Any,
) -> FitResult:
    """Train ``model`` on ``data`` under ``prior`` (MAP, SGLD, cyclical SGLD or SWAG: ``config.inference``).

    Args:
        model: the model to train (in place).
        data: a Dataset (shuffled with the config's seed) or your own DataLoader.
        prior: e.g. from :func:`ptyl.priors.make_prior`; ``None`` trains by maximum likelihood.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields (``fit(..., epochs=5)``).
        objective: ``objective(model, batch) -> loss``; default mean cross-entropy.
        num_data: N in ``-log p(theta)/N`` (default: dataset size).
        head: module name(s) trained with ``head_lr``.
        collector: ``inference="swag"`` only: fill this :class:`SWAGCollector` (source-side prior learning) instead
            of drawing samples from a fresh one.
        checkpoint: file written after every epoch; with ``resume=True`` an existing one is continued.
        eval_fn: called on the model after each epoch; its numbers go into the history.
        callbacks: extra :class:`~ptyl.training.callbacks.Callback` objects.
        strategy: a :class:`~ptyl.training.strategies.base.Strategy` instance of your own (overrides
            ``config.inference`` for the loop; the config is still validated for it).
        collate_fn: how a Dataset's examples become batches.

    Returns:
        A :class:`FitResult` (``.predict(data)`` averages over the samples of sampling strategies).
    """
    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    config.validate()
    if collector is not None:
        if Inference.parse(config.inference) is not Inference.SWAG or strategy is not None:
            raise ConfigError(f"a SWAG collector is filled by inference {str(Inference.SWAG)!r}, not "
                              f"{str(config.inference)!r}")
        strategy = Inference.SWAG.strategy(config, collector=collector)
    extra = [EvalCallback(eval_fn)] if eval_fn is not None else []
    trainer = Trainer(model, data, prior, config, strategy=strategy, objective=objective, num_data=num_data,
                      head=head, callbacks=[*callbacks, *extra], checkpoint=checkpoint, collate_fn=collate_fn)
    return trainer.fit(resume=resume)
