"""The methods a transfer experiment compares: a prior kind, an inference strategy and a start.

A method is written ``<prior>[-<inference>]`` -- ``lowrank``, ``lowrank-sgld``, ``l2sp``, ``standard-swag`` -- with
the prior a :class:`~ptyl.priors.PriorKind` or the start ``scratch`` (random initialisation under the standard prior,
the source-free control) and the inference a :class:`~ptyl.training.Inference` (default ``map``). A bare inference
name means the standard prior with it (``sgld`` = ``standard-sgld``).

>>> method = parse_method("lowrank-sgld")
>>> (str(method.prior), str(method.inference), str(method.start))
('lowrank', 'sgld', 'pretrained')
>>> str(parse_method("scratch").prior)
'standard'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ptyl.errors import ConfigError
from ptyl.named_enum import NamedEnum
from ptyl.priors.registry import PriorKind
from ptyl.training.config import TrainConfig
from ptyl.training.registry import Inference

__all__ = ["DEFAULT_METHODS", "Method", "Start", "parse_method", "train_config"]


class Start(NamedEnum):
    """Where a downstream model starts: the pretrained backbone (fresh head), or a random initialisation."""

    PRETRAINED = "pretrained"
    SCRATCH = "scratch"


@dataclass(frozen=True)
class Method:
    """A compared method: its backbone prior, its inference, and where it starts.

    Attributes:
        name: how results name it (what was parsed, e.g. ``"lowrank-sgld"``).
        prior: the :class:`PriorKind` of the backbone prior.
        inference: the :class:`Inference` strategy.
        start: :class:`Start`.
    """

    name: str
    prior: PriorKind
    inference: Inference = Inference.MAP
    start: Start = Start.PRETRAINED

    @property
    def pretrained(self) -> bool:
        """Whether the model starts from the pretrained backbone."""
        return self.start is Start.PRETRAINED

    @property
    def needs_posterior(self) -> bool:
        """Whether the prior is learned (needs the source posterior)."""
        return self.prior.recipe.needs_posterior

    @classmethod
    def of(cls, prior: str | PriorKind, inference: str | Inference = Inference.MAP) -> Method:
        """A method by its parts.

        Args:
            prior: the prior kind.
            inference: the inference strategy.

        Returns:
            The :class:`Method`, named ``<prior>`` (MAP) or ``<prior>-<inference>``.
        """
        prior, inference = PriorKind.parse(prior), Inference.parse(inference)
        return cls(str(prior) if inference is Inference.MAP else f"{prior}-{inference}", prior, inference)


DEFAULT_METHODS = (Method.of(PriorKind.STANDARD), Method.of(PriorKind.L2SP), Method.of(PriorKind.DIAG),
                   Method.of(PriorKind.LOWRANK), Method.of(PriorKind.LOWRANK, Inference.SGLD))


def parse_method(name: str | Method) -> Method:
    """Parse ``name`` (``"lowrank-sgld"`` -> ``Method(prior=LOWRANK, inference=SGLD)``, see the module docstring).

    Raises:
        ConfigError: an unknown prior, start or inference, naming the choices.
    """
    if isinstance(name, Method):
        return name
    text = str(name).strip().lower()
    first, _, second = text.partition("-")
    kinds, starts, inferences = {str(k) for k in PriorKind}, {str(s) for s in Start}, {str(i) for i in Inference}
    if not second and first not in kinds | starts and first in inferences:
        first, second = str(PriorKind.STANDARD), first
    if first not in kinds | starts or (second and second not in inferences):
        examples = ", ".join(repr(m.name) for m in DEFAULT_METHODS[-2:])
        raise ConfigError(f"unknown method {name!r}: use <prior>[-<inference>] with prior in "
                          f"{tuple(str(k) for k in PriorKind) + (str(Start.SCRATCH),)} and inference in "
                          f"{tuple(str(i) for i in Inference)} (e.g. {examples}), or a bare inference name")
    inference = Inference.parse(second or Inference.MAP)
    if first == Start.SCRATCH:
        return Method(str(name), PriorKind.STANDARD, inference, Start.SCRATCH)
    return Method(str(name), PriorKind.parse(first), inference)


def train_config(inference: str | Inference, num_examples: int, *, steps: int = 1000, batch_size: int = 32,
                 num_samples: int = 10, temperature: float | None = None, lr: float | None = None,
                 stop_loss: float | None = None, stop_plateau: float | None = None, min_steps: int = 0,
                 **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of every method: a budget of ``steps`` optimiser steps whatever n is (at least 2
    epochs; the schedule spans it), the convergence rule (MAP stops early once the epoch-mean training loss is
    ``<= stop_loss`` or the objective has stopped falling by ``stop_plateau`` per ``plateau_steps``; samplers run the
    whole budget), and the strategy's own settings for that budget
    (:meth:`~ptyl.training.Strategy.adapt_to_budget`: e.g. SWAG snapshots spread over the second half).

    Args:
        inference: the strategy.
        num_examples: training-set size.
        steps: the step budget (``TrainConfig.max_steps``).
        batch_size, num_samples: as the names say.
        temperature, lr: ``None``: the :class:`TrainConfig` defaults.
        stop_loss, stop_plateau, min_steps: the convergence rule (``None``: off).
        overrides: any other :class:`TrainConfig` field, applied last.

    Returns:
        The :class:`TrainConfig` (``progress=False``).
    """
    inference = Inference.parse(inference)
    steps_per_epoch = math.ceil(num_examples / min(batch_size, num_examples))
    epochs = max(2, math.ceil(steps / steps_per_epoch))
    extra = {k: v for k, v in (("temperature", temperature), ("lr", lr)) if v is not None}
    config = TrainConfig(inference=inference, epochs=epochs, max_steps=epochs * steps_per_epoch,
                         batch_size=batch_size, num_samples=num_samples, stop_loss=stop_loss,
                         stop_plateau=stop_plateau, min_steps=min_steps, progress=False, **extra)
    inference.strategy.adapt_to_budget(config, epochs * steps_per_epoch)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"unknown training option {key!r}")
        setattr(config, key, value)
    return config
