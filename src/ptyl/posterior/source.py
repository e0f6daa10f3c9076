"""Source stage: keep training a pretrained model on the source task while SWAG collects (Shwartz-Ziv et al. 2022,
Sec. 3.1) and return the posterior that becomes the downstream prior.

The paper's recipe: start from the pretrained weights, continue the source objective (supervised cross-entropy, or a
self-supervised loss such as SimCLR) with a *high constant* or *cyclical* learning rate, and take a SWAG snapshot at
regular intervals. The task head (or SimCLR's projection head) is left out: the prior covers the backbone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl.errors import ConfigError
from ptyl.inference.trainer import Objective, TrainConfig, fit
from ptyl.params import Selector, as_name_list
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.swag import SWAGCollector


def pretrain(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 128,
    objective: Objective | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> nn.Module:
    """Ordinary training on the source task (SGD, Nesterov, cosine): produces the "pretrained" weights."""
    fit(model, data, None, TrainConfig(method="map", epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                       progress=progress), objective=objective, head=None,
        checkpoint=checkpoint, resume=resume)
    return model


def learn_prior(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    schedule: str = "constant",
    rank: int = 20,
    collect_every: int | None = None,
    head: str | Sequence[str] | None = "head",
    exclude: Selector = None,
    batch_size: int = 128,
    objective: Objective | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
) -> SourcePosterior:
    """Continue training from the current (pretrained) weights and fit SWAG over the backbone.

    Args:
        schedule: ``"constant"`` (a high constant learning rate, snapshots every ``collect_every`` steps or once per
            epoch) or ``"cyclical"`` (one cosine cycle per epoch, a snapshot at the end of each cycle).
        rank: K, deviation columns kept.
        head / exclude: parameters left out of the prior (the task head; SimCLR's ``projection``).
        objective: ``objective(model, batch) -> loss``; default cross-entropy, or
            :class:`ptyl.posterior.simclr.SimCLRObjective`.
        metadata: recorded in the prior file (source dataset, architecture, objective...).
    """
    if schedule not in ("constant", "cyclical"):
        raise ConfigError(f"source schedule must be 'constant' or 'cyclical', got {schedule!r}")
    collector = SWAGCollector(model, rank=rank, head=head, exclude=exclude)
    config = TrainConfig(
        method="swag", epochs=epochs, lr=lr, swag_lr=lr, batch_size=batch_size, burn_in_fraction=0.0,
        schedule="cyclical" if schedule == "cyclical" else "constant",
        swag_collect_every=collect_every if schedule == "constant" else None, seed=seed, progress=progress,
    )
    fit(model, data, None, config, objective=objective, head=None, collector=collector, checkpoint=checkpoint,
        resume=resume)
    meta = {
        "architecture": type(model).__name__,
        "objective": getattr(objective, "name", "supervised") if objective is not None else "supervised",
        "source_schedule": schedule,
        "source_lr": lr,
        "source_epochs": epochs,
        "excluded": as_name_list(head),
        **(metadata or {}),
    }
    return collector.posterior(metadata=meta)
